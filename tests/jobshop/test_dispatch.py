"""The dispatching core: schemes, reward identity, exhaustive optimum on tiny shops, rules, features."""

import copy

import numpy as np
import pytest

from shopfloor import SCHEMES, Dispatcher, JobShopInstance, candidate_features, check_schedule, run_rule
from shopfloor.generators import ShopSpec
from shopfloor.rules import RULES, choose
from shopfloor.validate import left_shiftable


def tiny(seed, n=3, m=3):
    return ShopSpec(n, m, low=1, high=9).sample(np.random.default_rng(seed))


def all_makespans(inst, scheme):
    """Every schedule reachable under the scheme (depth-first over the eligible choices)."""
    out = []

    def walk(d):
        if d.done:
            out.append(check_schedule(inst, d.start))
            return
        for j in np.flatnonzero(d.eligible):
            child = copy.deepcopy(d)
            child.step(int(j))
            walk(child)

    walk(Dispatcher(inst, scheme))
    return out


@pytest.mark.parametrize("seed", [0, 17, 20])  # 17, 20: a Giffler-Thompson set cut to non-delay on M* misses the optimum
def test_active_scheme_reaches_the_optimum_of_all_semi_active_schedules(seed):
    inst = tiny(seed)
    optimum = min(all_makespans(inst, "semi_active"))  # every semi-active schedule: contains an optimum
    active = all_makespans(inst, "active")
    assert min(active) == optimum
    assert len(active) < 1680  # Giffler-Thompson prunes: 9!/(3!3!3!) = 1680 semi-active sequences
    assert min(all_makespans(inst, "non_delay")) >= optimum


def test_a_non_delay_schedule_can_miss_the_optimum():
    # job 0: M2 7, M1 4, M0 9; job 1: M2 9, M0 6, M1 6. Optimum 29: job 1 first on M2, then M1 must stay
    # idle during [15, 16) for job 0 (job 1 is ready for it at 15), which a non-delay schedule never does.
    inst = JobShopInstance(np.array([[2, 1, 0], [2, 0, 1]]), np.array([[7, 4, 9], [9, 6, 6]]), 3)
    assert min(all_makespans(inst, "semi_active")) == min(all_makespans(inst, "active")) == 29
    assert min(all_makespans(inst, "non_delay")) == 32


@pytest.mark.parametrize("scheme", SCHEMES)
def test_return_is_lower_bound_minus_makespan(scheme):
    rng = np.random.default_rng(1)
    for routing in ("random", "flow", "bottleneck"):
        inst = ShopSpec(7, 5, routing=routing).sample(rng)
        d = Dispatcher(inst, scheme)
        rewards = []
        while not d.done:
            rewards.append(d.step(int(rng.choice(np.flatnonzero(d.eligible)))))
        assert sum(rewards) == inst.trivial_lower_bound() - d.makespan
        assert check_schedule(inst, d.start) == d.makespan
        if scheme != "insertion":  # append-only: the bound never decreases
            assert max(rewards) <= 0


@pytest.mark.parametrize("scheme", ["active", "insertion"])
def test_active_schemes_leave_no_operation_left_shiftable(scheme):
    inst = ShopSpec(8, 6).sample(np.random.default_rng(3))
    for rule in RULES:
        _, start = run_rule(inst, rule, scheme)
        assert left_shiftable(inst, start) == []


def test_semi_active_spt_leaves_gaps_the_validator_sees():
    inst = ShopSpec(8, 6).sample(np.random.default_rng(3))
    _, start = run_rule(inst, "SPT", "semi_active")
    check_schedule(inst, start)
    assert left_shiftable(inst, start)


def test_ineligible_job_is_refused_loudly():
    inst = tiny(0)
    d = Dispatcher(inst, "active")
    bad = int(np.flatnonzero(~d.eligible)[0]) if (~d.eligible).any() else inst.n_jobs
    with pytest.raises(ValueError, match="not eligible"):
        d.step(bad)
    with pytest.raises(ValueError, match="not eligible"):
        d.step(-1)
    with pytest.raises(RuntimeError, match="before the schedule is complete"):
        d.makespan
    with pytest.raises(ValueError, match="unknown scheme"):
        Dispatcher(inst, "greedy")


def test_rules_pick_their_key_with_lowest_index_ties():
    # three jobs on one machine at t=0, all eligible under semi_active
    inst = JobShopInstance(np.array([[0, 1, 2], [0, 2, 1], [0, 1, 2]]),
                           np.array([[5, 1, 1], [3, 9, 9], [3, 1, 1]]), 3)
    d = Dispatcher(inst, "semi_active")
    assert choose("SPT", d) == 1  # 3 == 3: lowest index
    assert choose("MWKR", d) == 1  # 21 remaining
    assert choose("MOPNR", d) == 0  # all 3 ops: tie
    assert choose("FDD/MWKR", d) == 1  # 3/21 < 5/7 < 3/5
    with pytest.raises(ValueError, match="unknown rule"):
        choose("LPT", d)


def test_features_are_size_and_time_scale_agnostic():
    inst = ShopSpec(6, 4).sample(np.random.default_rng(5))
    slow = JobShopInstance(inst.machines, inst.durations * 10, inst.n_machines)
    a, b = Dispatcher(inst), Dispatcher(slow)
    for _ in range(9):
        np.testing.assert_allclose(candidate_features(a), candidate_features(b), rtol=1e-6)
        j = choose("MWKR", a)
        a.step(j), b.step(j)
    while not a.done:
        a.step(choose("SPT", a))
        f = candidate_features(a)
        assert np.all(f[~a.candidates.unfinished] == 0) and np.all(np.isfinite(f))


def test_instance_rejects_bad_input():
    with pytest.raises(ValueError, match="integers >= 1"):
        JobShopInstance(np.array([[0]]), np.array([[0]]), 1)
    with pytest.raises(ValueError, match=r"machine ids"):
        JobShopInstance(np.array([[1]]), np.array([[3]]), 1)
    with pytest.raises(ValueError, match="same non-empty"):
        JobShopInstance(np.array([[0, 1]]), np.array([[3]]), 2)

"""Policy-gradient step on the functional core: sign, masking, size-agnostic scoring, loud failure."""

import numpy as np
import pytest
import torch

from meta_train.dispatch_rl import (ScoringPolicy, adapt_step, greedy_makespans, pg_loss, policy_gradient,
                                    rollout, self_critical)
from shopfloor import check_schedule
from shopfloor.generators import ShopSpec


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead on the shared CI cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def policy():
    torch.manual_seed(0)
    model = ScoringPolicy(hidden=16)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def test_rollouts_are_valid_schedules_and_respect_the_mask(policy):
    model, params = policy
    for n, m in [(4, 3), (9, 5)]:  # one network, two shop sizes
        inst = ShopSpec(n, m).sample(np.random.default_rng(n))
        ep = rollout(model, params, inst, "active", greedy=False, gen=torch.Generator().manual_seed(0))
        assert ep.feats.shape[1:] == (n, 9) and ep.masks[torch.arange(len(ep.actions)), ep.actions].all()
        assert check_schedule(inst, ep.start) == ep.makespan >= inst.trivial_lower_bound()
        assert 0 < len(ep.actions) < inst.n_jobs * inst.n_ops  # forced single-candidate steps are skipped


def test_positive_advantage_raises_the_chosen_actions_probability(policy):
    model, params = policy
    inst = ShopSpec(6, 4).sample(np.random.default_rng(1))
    ep = rollout(model, params, inst, "semi_active", greedy=False, gen=torch.Generator().manual_seed(1))

    def mean_logp(p):  # computed here, not by the loss under test
        logits = torch.func.functional_call(model, p, (ep.feats,)).masked_fill(~ep.masks, float("-inf"))
        return torch.log_softmax(logits, -1)[torch.arange(len(ep.actions)), ep.actions].mean()

    before = mean_logp(params)
    assert torch.isclose(pg_loss(model, params, [ep], [2.0]), -2.0 * before)
    assert mean_logp(adapt_step(model, params, [ep], [1.0], lr=0.5)) > before
    assert mean_logp(adapt_step(model, params, [ep], [-1.0], lr=0.5)) < before


def test_a_few_adaptation_steps_improve_a_fixed_instance():
    torch.manual_seed(0)
    model = ScoringPolicy(hidden=16)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    inst = ShopSpec(6, 4, routing="bottleneck").sample(np.random.default_rng(3))
    gen = torch.Generator().manual_seed(0)  # seeded throughout: deterministic, not flaky
    start = np.mean([rollout(model, params, inst, "active", False, gen).makespan for _ in range(16)])
    for _ in range(10):
        eps, advs, _ = self_critical(model, params, [inst] * 3, "active", gen)
        params = adapt_step(model, params, eps, advs, lr=10.0)  # advantages are relative (~0.05): big rate
    end = np.mean([rollout(model, params, inst, "active", False, gen).makespan for _ in range(16)])
    assert end < 0.9 * start  # 811 -> 664 when written
    mk = greedy_makespans(model, params, [inst], "active")[0]
    assert mk >= inst.trivial_lower_bound()


def test_non_finite_gradient_stops_loudly(policy):
    model, params = policy
    inst = ShopSpec(4, 3).sample(np.random.default_rng(0))
    ep = rollout(model, params, inst, "semi_active", greedy=True)
    with pytest.raises(FloatingPointError, match="non-finite"):
        policy_gradient(model, params, [ep], [float("nan")])

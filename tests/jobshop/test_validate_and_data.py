"""The independent validator, the Taillard loader, the shop generators and the torch-free import graph."""

import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest

from shopfloor import JobShopInstance, ScheduleError, check_schedule, run_rule
from shopfloor.generators import ShopFamily, ShopSpec
from shopfloor.taillard import load_bounds, load_instances, load_l2d, read_instance

REPO = Path(__file__).resolve().parents[2]


def test_validator_catches_each_kind_of_infeasibility():
    inst = ShopSpec(5, 4).sample(np.random.default_rng(0))
    makespan, start = run_rule(inst, "MOPNR")
    assert check_schedule(inst, start) == makespan
    unscheduled = start.copy()
    unscheduled[2, 3] = -1
    with pytest.raises(ScheduleError, match="not scheduled"):
        check_schedule(inst, unscheduled)
    early = start.copy()
    early[1, 2] = start[1, 1]  # starts with its predecessor
    with pytest.raises(ScheduleError, match="job 1: operation 2 starts"):
        check_schedule(inst, early)
    # two jobs on machine 1 overlapping by one unit, each job's own order kept
    two = JobShopInstance(np.array([[0, 1], [1, 0]]), np.array([[2, 3], [4, 1]]), 2)
    assert check_schedule(two, np.array([[0, 4], [0, 4]])) == 7
    with pytest.raises(ScheduleError, match=r"machine 1: an operation starts at 3 while another runs \[0, 4\)"):
        check_schedule(two, np.array([[0, 3], [0, 4]]))
    with pytest.raises(ScheduleError, match="shape"):
        check_schedule(inst, start[:, :2])


def test_taillard_loader_reads_the_published_layout(taillard_dir):
    ta = load_instances(taillard_dir, ["ta01", "ta41"])
    assert ta["ta01"].machines.shape == (15, 15) and ta["ta41"].machines.shape == (30, 20)
    assert (ta["ta01"].machines[0, 0], ta["ta01"].durations[0, 0]) == (6, 94)  # README's example
    assert all(sorted(row) == list(range(15)) for row in ta["ta01"].machines.tolist())
    bounds, l2d = load_bounds(taillard_dir), load_l2d(taillard_dir)
    assert len(bounds) == 80 and bounds["ta01"]["upper_bound"] == 1231 and bounds["ta01"]["optimal"]
    assert l2d["ta01"]["SPT"] == 1872 and l2d["ta13"]["UB_used"] == 1343


def test_non_delay_rules_match_job_shop_lib_on_ta01(taillard_dir):
    # The data README quotes job_shop_lib 1.7.2's default dispatcher on ta01 (an independent implementation):
    # SPT 1462, MWKR 1491, MOPNR 1438. Our non-delay scheme with lowest-index ties gives exactly those.
    inst = load_instances(taillard_dir, ["ta01"])["ta01"]
    got = {rule: run_rule(inst, rule, "non_delay")[0] for rule in ("SPT", "MWKR", "MOPNR")}
    assert got == {"SPT": 1462, "MWKR": 1491, "MOPNR": 1438}


def test_bad_instance_file_is_refused(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("2 2\n0 5 1 3\n")
    with pytest.raises(ValueError, match="expected 2 job lines"):
        read_instance(p)
    with pytest.raises(FileNotFoundError, match="no instances/ folder"):
        load_instances(tmp_path)


def test_generators_shape_routing_and_speed():
    rng = np.random.default_rng(0)
    flow = ShopSpec(40, 8, routing="flow", flow_swaps=1).sample(rng)
    first = np.bincount(flow.machines[:, 0], minlength=8)
    assert first.max() >= 20  # one shop-wide order: most jobs start on the same machine
    rand = ShopSpec(40, 8).sample(rng)
    assert np.bincount(rand.machines[:, 0], minlength=8).max() < 20
    for inst in (flow, rand):
        assert all(sorted(r) == list(range(8)) for r in inst.machines.tolist())
    neck = ShopSpec(40, 8, routing="bottleneck", bottleneck_machine=3, bottleneck_factor=3.0).sample(rng)
    load = np.bincount(neck.machines.ravel(), weights=neck.durations.ravel())
    assert int(np.argmax(load)) == 3 and load[3] > 2 * np.median(load)
    slow = ShopSpec(40, 2, speeds=(1.0, 0.25), low=10, high=10).sample(rng)
    assert set(slow.durations[slow.machines == 1].tolist()) == {40}
    for dist in ("lognormal", "bimodal"):
        d = ShopSpec(30, 5, duration_dist=dist, low=5, high=50).sample(rng).durations
        assert d.min() >= 5 and d.max() <= 50
    with pytest.raises(ValueError, match="routing"):
        ShopSpec(3, 3, routing="loop")
    with pytest.raises(ValueError, match="speeds"):
        ShopSpec(3, 3, speeds=(1.0, 1.0))


def test_family_splits_are_disjoint_and_reproducible():
    fam = ShopFamily()
    train, test = fam.shops("train", 20, seed=0), fam.shops("test", 20, seed=0)
    key = lambda s: (s.n_jobs, s.n_machines, s.duration_dist, s.routing, s.speeds)  # noqa: E731
    assert not {key(s) for s in train} & {key(s) for s in test}
    assert [key(s) for s in train] == [key(s) for s in fam.shops("train", 20, seed=0)]
    assert len({s.routing for s in train}) == 3
    with pytest.raises(ValueError, match="split"):
        fam.shops("val", 1)


CHECK = """
import sys
import shopfloor, shopfloor.dispatch, shopfloor.features, shopfloor.rules, shopfloor.validate
import shopfloor.taillard, shopfloor.generators
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'meta_train', 'export', 'gymnasium'))
print(bad)
sys.exit(1 if bad else 0)
"""


def test_core_imports_neither_torch_nor_gymnasium():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for path in (REPO / "shopfloor").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if words[:1] in (["import"], ["from"]):
                assert not {"torch", "meta_train", "export"} & {w.split(".")[0] for w in words[1:2]}, path.name


def test_rules_benchmark_prints_our_gaps_next_to_l2d(taillard_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import jobshop_rules

    out = tmp_path / "r.json"
    assert jobshop_rules.main(["--data-dir", str(taillard_dir), "--sizes", "15x15", "--schemes", "non_delay",
                               "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 15x15 | 25.9 | 54.8 |" in text  # SPT ours (non-delay) | SPT in the L2D paper (its Table 3)
    import json

    saved = json.loads(out.read_text())
    assert saved["makespans"]["non_delay"]["SPT"]["ta01"] == 1462

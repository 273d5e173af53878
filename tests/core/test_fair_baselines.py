"""Honest comparisons (issue 11): the pooled baseline's budget, rates chosen on validation tasks, the 0-step row,
skipped Ks kept, significant digits."""

import math

import pytest
import torch

from meta_train.baselines import matched_iterations, meta_budget, pretrain
from meta_train.config import BaselineConfig, EvalConfig, load_config
from meta_train.errors import DataError
from meta_train.evaluate import evaluate, markdown_table
from meta_train.numbers import mean_ci
from meta_train.tasks import TaskBatch
from meta_train.train import train
from meta_train.trained import load_trained

FAST = ["train.iterations=20", "train.meta_batch=5", "train.progress=false", "model.hidden=[16]", "train.threads=1"]


class ShiftSource:
    """1-d regression whose validation and test tasks want different fine-tune rates: validation targets are
    pure noise (fitting the support set only hurts: the smallest rate wins), test targets a constant offset of 3
    (the largest stable rate wins). Tasks with fewer than `max_rows` rows cannot form a K >= max_rows episode."""

    kind, loss = "regression", "mse"

    def __init__(self, max_rows: int = 1000):
        self.max_rows = max_rows

    def sample(self, split, batch, shots, query, generator):
        if shots + 1 > self.max_rows:
            raise DataError(f"no {split} task can make a K={shots} episode (tasks have {self.max_rows} rows)")
        x = torch.rand(batch, shots + query, 1, generator=generator) * 2 - 1
        if split == "val":
            y = torch.randn(batch, shots + query, generator=generator)
        elif split == "test":
            y = torch.full((batch, shots + query), 3.0)
        else:
            y = x[..., 0] * torch.rand(batch, 1, generator=generator)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def pretrain_batch(self, size, generator):
        b = self.sample("train", size, 1, 1, generator)
        return b.support_x[:, 0], b.support_y[:, 0]

    def model_spec_defaults(self):
        return {"in_features": 1, "out_features": 1, "input_transform": None}

    def describe(self):
        return {"name": "shift", "kind": self.kind}


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shift") / "run"
    train(load_config(None, FAST), out, source=ShiftSource())
    return load_trained(out)


def test_pooled_baseline_gets_at_least_the_meta_runs_budget(shift_run):
    ecfg = EvalConfig(tasks=20, shots=[5], steps=[1], query=10, chunk=20)
    res = evaluate(shift_run, ShiftSource(), ecfg, BaselineConfig(pretrain_batch=32, val_tasks=20))
    meta, pooled = res["budgets"]["meta"], res["budgets"]["pretrain"]
    # 20 iterations x 5 tasks x (1 inner step + 1 query gradient), over 10 support + 10 query rows per task
    assert meta["task_gradient_evals"] == 20 * 5 * 2
    assert meta["sample_gradient_evals"] == 20 * 5 * (1 * 10 + 10)
    assert pooled["iterations_budget"] == math.ceil(2000 / 32) == matched_iterations(meta, 32)
    assert pooled["sample_gradient_evals_budget"] >= meta["sample_gradient_evals"] and pooled["budget_fair"]
    assert pooled["early_stopping"]
    md = markdown_table(res)
    assert "2,000 rows" in md and "budget 63 iterations x 32 rows" in md
    # an explicit smaller budget is flagged in the table, never silently accepted
    res = evaluate(shift_run, ShiftSource(), ecfg, BaselineConfig(pretrain_iterations=5, pretrain_batch=32, val_tasks=20))
    assert not res["budgets"]["pretrain"]["budget_fair"]
    assert "below the meta run's budget" in markdown_table(res)


def test_early_stopping_keeps_the_best_checked_network():
    scores = iter([5.0, 4.0, 3.0] + [9.0] * 100)  # improves twice, then never again
    seen = []

    def val_score(params):
        seen.append({n: p.clone() for n, p in params.items()})
        return next(scores)

    spec = {"in_features": 1, "out_features": 1, "hidden": [8], "activation": "relu", "input_transform": None}
    params, info = pretrain(spec, ShiftSource(), 1000, 16, 1e-2, 0, val_score=val_score, val_every=10, patience=3)
    assert info["stopped_early"] and info["iterations_run"] == 50 and info["best_iteration"] == 20
    assert all(torch.equal(params[n], seen[2][n]) for n in params)  # the iteration-20 network, not the last one


def test_finetune_rates_are_chosen_on_validation_tasks_not_test(shift_run):
    grid = [0.001, 0.1]
    ecfg = EvalConfig(tasks=40, shots=[5], steps=[1, 5], query=10, chunk=40)
    base = dict(pretrain_batch=32, val_tasks=40)
    best = {}
    for split in ("val", "test"):  # each split's own best rate, measured at each single rate
        per_rate = {r: evaluate(shift_run, ShiftSource(), ecfg, BaselineConfig(finetune_lrs=[r], **base),
                                which=("scratch",), split=split)["by_shots"]["5"]["scratch"]["loss"]["5"]["mean"]
                    for r in grid}
        best[split] = min(per_rate, key=per_rate.get)
    assert best["val"] != best["test"]  # the fixture does separate the two
    res = evaluate(shift_run, ShiftSource(), ecfg, BaselineConfig(finetune_lrs=grid, **base), which=("scratch",))
    assert res["by_shots"]["5"]["scratch"]["lr"]["5"] == best["val"]
    assert res["selection"]["split"] == "val"


def test_every_method_reports_its_unadapted_initialisation(shift_run):
    ecfg = EvalConfig(tasks=10, shots=[5], steps=[1, 5], query=10, chunk=10)
    res = evaluate(shift_run, ShiftSource(), ecfg, BaselineConfig(pretrain_batch=32, val_tasks=10))
    assert res["steps"] == [0, 1, 5]
    for m in ("meta", "scratch", "pretrain"):
        assert res["by_shots"]["5"][m]["loss"]["0"]["n"] == 10
    # 0 steps is the init itself: same query loss whatever the rate
    assert res["by_shots"]["5"]["meta"]["loss"]["0"]["mean"] == pytest.approx(res["by_shots"]["5"]["meta"]["loss_curve"][0])
    assert "| 0 steps | 1 step | 5 steps |" in markdown_table(res)


def test_a_k_that_cannot_form_an_episode_is_skipped_and_the_others_kept(shift_run):
    ecfg = EvalConfig(tasks=10, shots=[5, 50], steps=[1], query=10, chunk=10)
    res = evaluate(shift_run, ShiftSource(max_rows=30), ecfg, BaselineConfig(pretrain_batch=32, val_tasks=10))
    assert list(res["by_shots"]) == ["5"] and "K=50" in res["skipped"]["50"]
    md = markdown_table(res)
    assert "| meta | 5 |" in md and "K=50: no test task can make a K=50 episode" in md


def test_significant_digits_and_diverged_cells():
    assert mean_ci(0.0015, 0.00012) == "0.00150 ± 0.00012"
    assert mean_ci(95.24, 0.31) == "95.2 ± 0.3"
    assert mean_ci(119.83, 5.2) == "120 ± 5"
    assert mean_ci(float("inf"), float("nan"), diverged=3, n=1000, median=0.1523) == "inf (3 of 1000 diverged, median 0.152)"
    res = {"kind": "regression", "split": "test", "tasks": 4, "algorithm": "maml", "steps": [0, 1], "skipped": {},
           "by_shots": {"5": {"meta": {"loss": {
               "0": {"mean": 0.00205, "ci95": 0.00031, "n": 4, "median": 0.002, "diverged": 0},
               "1": {"mean": 1.75e32, "ci95": 3.4e32, "n": 4, "median": 0.0012, "diverged": 0}}},
               "scratch": {"loss": {
               "0": {"mean": 0.5, "ci95": 0.1, "n": 4, "median": 0.5, "diverged": 0},
               "1": {"mean": float("inf"), "ci95": float("nan"), "n": 4, "median": 0.0012, "diverged": 1}}}}}}
    md = markdown_table(res)
    assert "0.00205 ± 0.00031" in md and "1.75e+32 ± 3.40e+32" in md
    assert "inf (1 of 4 diverged, median 0.00120)" in md and "175000000" not in md

"""The TorchScript kernels (meta_train/fast_script.py) and the split of a meta-batch's tasks over threads.

The kernels take every fast-path call whose inner rates are fixed numbers, so test_fast_path.py's comparisons
with the generic path (and test_meta_gradients.py's with per-task autograd loops) already run through them for
MAML / FOMAML; here they are compared with the Python hand-derived path they stand in for, split and unsplit.
"""

import pytest
import torch

from meta_train import fast_mlp, fast_script
from meta_train.algorithms import meta_gradient, splits_tasks
from meta_train.config import Config, load_config
from meta_train.errors import ConfigError
from meta_train.tasks import TaskBatch
from meta_train.train import meta_threads, train

from tests.core.test_fast_path import rel_diff, setup

CASES = {
    "maml-1": dict(name="maml", steps=1),
    "maml-5": dict(name="maml", steps=5),
    "fomaml-5": dict(name="fomaml", steps=5),
    "maml-4-deep-tanh": dict(name="maml", steps=4, spec={"in_features": 1, "hidden": [12, 20, 6], "out_features": 1,
                                                          "activation": "tanh"}),
    "fomaml-3-deep-relu": dict(name="fomaml", steps=3, spec={"in_features": 1, "hidden": [16, 24, 8],
                                                              "out_features": 1}),
    "maml-standardize": dict(name="maml", steps=2, transform={"kind": "standardize", "mean": [0.5], "std": [2.0]}),
    "maml-no-hidden": dict(name="maml", steps=3, spec={"in_features": 1, "hidden": [], "out_features": 1}),
    "mamlpp-fixed-rates": dict(name="mamlpp", steps=3, multi_step_loss=False, learn_inner_lr=False),
}


def vector_batch(b=12, k=6, inputs=3, outputs=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(b, k, inputs, generator=gen), torch.randn(b, k, outputs, generator=gen),
                     torch.randn(b, k + 3, inputs, generator=gen), torch.randn(b, k + 3, outputs, generator=gen))


CASES["maml-3-vector"] = dict(name="maml", steps=3, batch=vector_batch(),
                              spec={"in_features": 3, "hidden": [9, 7], "out_features": 2, "activation": "tanh"})
CASES["fomaml-2-vector"] = dict(name="fomaml", steps=2, batch=vector_batch(),
                                spec={"in_features": 3, "hidden": [9], "out_features": 2})


def spread(lrs, seed=11):
    """Distinct fixed rates per layer and step, so a rate used at the wrong layer or step would show."""
    gen = torch.Generator().manual_seed(seed)
    return {n: r.detach() * (1 + torch.rand(r.shape, generator=gen)) for n, r in lrs.items()}


def gradients(model, alg, params, lrs, batch, scripted, threads=1, monkeypatch=None):
    monkeypatch.setattr(fast_mlp, "SCRIPTED", scripted)
    calls = []
    real = fast_script.gradient
    monkeypatch.setattr(fast_script, "gradient", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads, lr_grads = meta_gradient(model, alg, params, lrs, batch, threads=threads)
    assert bool(calls) == scripted
    assert lr_grads == {}
    return loss, grads


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_python_fast_path(case, monkeypatch):
    model, alg, params, lrs, batch = setup(**CASES[case])
    lrs = spread(lrs)
    assert splits_tasks(model, alg, params, lrs, batch)
    lp, gp = gradients(model, alg, params, lrs, batch, False, monkeypatch=monkeypatch)
    ls, gs = gradients(model, alg, params, lrs, batch, True, monkeypatch=monkeypatch)
    assert abs(float(ls - lp)) < 1e-6
    for n in params:
        assert gs[n].shape == params[n].shape
        assert rel_diff(gs[n], gp[n]) < 1e-6, n
        assert float(gp[n].abs().max()) > 0, n


@pytest.mark.parametrize("case", ["maml-5", "fomaml-5", "maml-4-deep-tanh", "maml-3-vector", "fomaml-2-vector"])
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_split_over_threads_matches_unsplit(case, threads, monkeypatch):
    model, alg, params, lrs, batch = setup(**CASES[case])
    monkeypatch.setattr(fast_script, "MIN_CHUNK_WORK", 1.0)  # split even these small batches
    assert fast_script.chunks_for(batch.support_x.shape[0], 1e3, threads) == threads
    compiled = []
    real = fast_script._script
    monkeypatch.setattr(fast_script, "_script", lambda fn: compiled.append(fn.__name__) or real(fn))
    l1, g1, _ = meta_gradient(model, alg, params, lrs, batch, threads=1)
    ln, gn, _ = meta_gradient(model, alg, params, lrs, batch, threads=threads)
    assert compiled[-1] == "chunked"
    assert abs(float(ln - l1)) < 1e-6
    for n in params:
        assert rel_diff(gn[n], g1[n]) < 1e-6, n
    again = meta_gradient(model, alg, params, lrs, batch, threads=threads)[1]
    assert all(torch.equal(again[n], gn[n]) for n in params)  # a fixed split sums in a fixed order


def test_chunks_follow_threads_tasks_and_work():
    assert fast_script.chunks_for(100, 1e6, 2) == 2
    assert fast_script.chunks_for(100, 1e6, 1) == 1
    assert fast_script.chunks_for(3, 1e9, 8) == 3  # never more chunks than tasks
    # 25 tasks x 1 second-order step of the 1-40-40-1 net: measured slower split (under MIN_CHUNK_WORK per chunk)
    small = fast_script.work_per_task([torch.empty(40, 1), torch.empty(40, 40), torch.empty(1, 40)], 10, 10, 1, True)
    assert fast_script.chunks_for(25, small, 2) == 1
    assert fast_script.chunks_for(100, small, 2) == 2


@pytest.mark.parametrize("case,expected", [
    (dict(name="maml", steps=2), True),
    (dict(name="fomaml", steps=2), True),
    (dict(name="metasgd", steps=2), False),  # learned per-parameter rates: the Python path
    (dict(name="mamlpp", steps=2, multi_step_loss=False), False),  # learned rates
    (dict(name="reptile", steps=2), False),
    (dict(name="anil", steps=2), False),  # not on the fast path at all
])
def test_which_runs_split_tasks(case, expected):
    model, alg, params, lrs, batch = setup(**case)
    assert splits_tasks(model, alg, params, lrs, batch) is expected
    assert not splits_tasks(model, alg, params, lrs, batch, fast=False)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_meta_threads_policy(restore_threads):
    cfg = Config()
    cfg.train.threads = 3
    model, alg, params, lrs, batch = setup("maml", 2)
    assert meta_threads(cfg, model, alg, params, lrs, batch, torch.device("cpu")) == 3
    assert torch.get_num_threads() == 1  # the tasks are the parallelism; no intra-op threads beside them
    model, alg, params, lrs, batch = setup("metasgd", 2)
    assert meta_threads(cfg, model, alg, params, lrs, batch, torch.device("cpu")) == 1
    assert torch.get_num_threads() == 3
    cfg.train.threads = 1
    model, alg, params, lrs, batch = setup("maml", 2)
    assert meta_threads(cfg, model, alg, params, lrs, batch, torch.device("cpu")) == 1
    assert torch.get_num_threads() == 1


def test_train_with_threads_is_reproducible_and_restores_settings(tmp_path, restore_threads):
    torch.set_num_threads(2)
    overrides = ["task.name=sinusoid", "algorithm.inner_steps=3", "train.iterations=6", "train.meta_batch=64",
                 "train.progress=false", "train.checkpoint_every=0"]
    runs = {}
    for label, threads in (("a", 2), ("b", 2), ("one", 1)):
        cfg = load_config(None, overrides + [f"train.threads={threads}"])
        ckpt = train(cfg, tmp_path / label)
        assert torch.get_num_threads() == 2  # train() gives the caller its intra-op setting back
        runs[label] = torch.load(ckpt, weights_only=True)["params"]
    for n in runs["a"]:
        assert torch.equal(runs["a"][n], runs["b"][n]), n  # same threads: bit for bit
        assert rel_diff(runs["a"][n], runs["one"][n]) < 1e-5, n  # split or not: the same training up to rounding


def test_threads_config_validated():
    with pytest.raises(ConfigError, match="train.threads"):
        load_config(None, ["task.name=sinusoid", "train.threads=-1"])

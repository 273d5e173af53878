"""The 1D-CNN through the generic (vmap) meta-gradient path, against a per-task autograd reference loop."""

import pytest
import torch
from torch.func import functional_call

from meta_train.algorithms import meta_gradient, resolve, uses_fast_path
from meta_train.config import AlgorithmConfig, ConfigError, load_config
from meta_train.inner import init_inner_lrs
from meta_train.model import build_model, init_params
from meta_train.tasks import TaskBatch

SPEC = {"kind": "cnn1d", "in_features": 4, "window": 12, "channels": [5, 5], "kernel": 4, "hidden": [8],
        "activation": "tanh", "out_features": 1}


@pytest.fixture
def cnn_setup():
    torch.manual_seed(0)
    model = build_model(SPEC).double()
    params = {n: p.double().requires_grad_() for n, p in init_params(model, torch.Generator().manual_seed(0)).items()}
    b, k, q = 3, 6, 5
    batch = TaskBatch(torch.randn(b, k, 12, 4, dtype=torch.float64), torch.rand(b, k, dtype=torch.float64),
                      torch.randn(b, q, 12, 4, dtype=torch.float64), torch.rand(b, q, dtype=torch.float64))
    return model, params, batch


def mse(model, params, x, y):
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()


def reference(model, params, lrs, batch, steps, first_order):
    """Plain autograd, one task at a time, rates broadcast as the inner loop does."""
    total = 0.0
    for i in range(batch.support_x.shape[0]):
        fast = dict(params)
        for s in range(steps):
            loss = mse(model, fast, batch.support_x[i], batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lrs[n][min(s, lrs[n].shape[0] - 1)] * g for (n, p), g in zip(fast.items(), grads)}
        total = total + mse(model, fast, batch.query_x[i], batch.query_y[i])
    total = total / batch.support_x.shape[0]
    leaves = list(params.values()) + [r for r in lrs.values() if r.requires_grad]
    return torch.autograd.grad(total, leaves)


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name,steps", [("maml", 2), ("fomaml", 2), ("metasgd", 1)])
def test_cnn_meta_gradient_matches_reference_loop(cnn_setup, name, steps):
    model, params, batch = cnn_setup
    alg = resolve(AlgorithmConfig(name=name, inner_steps=steps, inner_lr=0.05), "mse")
    lrs = {n: r.double().requires_grad_(alg.inner.learn_lr) for n, r in init_inner_lrs(params, alg.inner).items()}
    assert not uses_fast_path(model, alg, params, batch)  # the generic vmap path, not the MLP kernels
    _, grads, lr_grads = meta_gradient(model, alg, params, lrs, batch)
    ref = reference(model, params, lrs, batch, steps, first_order=alg.first_order)
    ours = flat(list(grads.values()) + list(lr_grads.values()))
    assert float((ours - flat(ref)).abs().max()) < 1e-5
    assert float(flat(ref).abs().max()) > 1e-3  # the gradients are not all ~0
    if name == "maml":  # second order really differs from first order here, so the comparison has teeth
        fo = reference(model, params, lrs, batch, steps, first_order=True)
        assert float((flat(fo) - flat(ref)).abs().max()) > 1e-5


def test_cnn_init_uses_the_conv_fan_in():
    params = init_params(build_model(SPEC), torch.Generator().manual_seed(0))
    w = params["conv.1.weight"]  # [5 out, 4 in, kernel 4]: fan-in 16, bound 0.25
    assert w.shape == (5, 4, 4)
    assert 0.2 < float(w.abs().max()) <= 0.25
    assert float(params["conv.1.bias"].abs().max()) <= 0.25
    assert 0.26 < float(params["body.0.weight"].abs().max()) <= 12 ** -0.5  # Linear: fan-in = in_features


def test_cnn_keeps_the_window_length_and_batches_leading_dims():
    model = build_model(SPEC)
    params = init_params(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 12, 4)
    out = functional_call(model, params, (x,))
    assert out.shape == (2, 3)
    assert torch.allclose(out[1, 2], functional_call(model, params, (x[1, 2:3],))[0], atol=1e-6)


def test_model_kind_is_validated(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {kind: lstm}\n")
    with pytest.raises(ConfigError, match="model.kind must be mlp or cnn1d"):
        load_config(cfg)


def test_shipped_cmapss_config_trains_and_evaluates_a_cnn(cmapss_dir, tmp_path, capsys):
    from pathlib import Path

    from meta_train.cli import main
    from meta_train.trained import load_trained

    cfg = str(Path(__file__).resolve().parents[2] / "configs" / "cmapss.yaml")
    small = [f"task.data_dir={cmapss_dir}", "task.sources=[FD001]", "task.target=FD003", "task.window=16",
             "task.windows_per_unit=4", "model.channels=[4,4]", "model.kernel=5", "model.hidden=[16]",
             "train.iterations=3", "train.meta_batch=2", "train.shots=2", "train.query=8", "train.progress=false",
             "train.threads=1"]
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "run"), *small]) == 0
    run = load_trained(tmp_path / "run")
    assert run.spec["kind"] == "cnn1d" and run.spec["window"] == 16 and run.spec["channels"] == [4, 4]
    assert run.params["conv.1.weight"].shape == (4, 14, 5)
    assert run.spec["target_transform"] == {"kind": "affine", "center": 0.0, "scale": 125.0}
    assert all(torch.isfinite(p).all() for p in run.params.values())
    assert main(["eval", "--run", str(tmp_path / "run"), "eval.tasks=2", "eval.shots=[1]", "eval.steps=[1]",
                 "eval.query=8", "eval.chunk=2", "baselines.pretrain_iterations=2", "baselines.pretrain_batch=8",
                 "baselines.val_tasks=2", "baselines.finetune_lrs=[0.1]"]) == 0
    assert "| meta | 1 |" in capsys.readouterr().out

"""The trainer's flat outer optimizer against torch.optim.Adam over the separate tensors (the old layout)."""

import pytest
import torch

from meta_train.inner import InnerConfig, init_inner_lrs
from meta_train.model import build_model, init_params
from meta_train.train import OuterOptimizer, _leaves


def fresh(learn_lr=True):
    model = build_model({"in_features": 1, "hidden": [8, 6], "out_features": 1})
    params = {n: p.requires_grad_() for n, p in init_params(model, torch.Generator().manual_seed(0)).items()}
    lrs = init_inner_lrs(params, InnerConfig(steps=2, lr_mode="per_param"))
    lrs = {n: r.requires_grad_(learn_lr) for n, r in lrs.items()}
    return params, lrs


def grads_for(step, leaves):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(t.shape, generator=gen) for t in leaves]


def step_both(ref_opt, ref_leaves, outer, n_steps, start=0):
    for s in range(start, start + n_steps):
        grads = grads_for(s, ref_leaves)
        for leaf, g in zip(ref_leaves, grads):
            leaf.grad = g.clone()
        ref_opt.step()
        outer.step(torch.cat([g.reshape(-1) for g in grads]), ref_opt.param_groups[0]["lr"])


def assert_same_tensors(a: dict, b: dict, atol=1e-7):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, n
        assert torch.allclose(a[n].detach(), b[n].detach(), atol=atol), n


@pytest.mark.parametrize("fused", [True, None])  # True: the fused kernel called directly; None: Adam.step()
def test_flat_adam_matches_per_tensor_adam_and_views_are_leaves(fused):
    p_ref, l_ref = fresh()
    p_flat, l_flat = fresh()
    ref_opt = torch.optim.Adam(_leaves(p_ref, l_ref), lr=1e-2, fused=fused)
    outer = OuterOptimizer(p_flat, l_flat, 1e-2, fused=fused)
    for t in _leaves(p_flat, l_flat):
        assert t.is_leaf and t.requires_grad and t.untyped_storage().data_ptr() == outer.flat.untyped_storage().data_ptr()
    step_both(ref_opt, _leaves(p_ref, l_ref), outer, 5)
    assert_same_tensors(p_flat, p_ref)
    assert_same_tensors(l_flat, l_ref)
    with torch.no_grad():  # in-place updates through a view land in the flat store (the trainer's lr clamp)
        next(iter(l_flat.values())).clamp_(min=1.0)
    assert float(outer.flat.detach().max()) >= 1.0


def test_state_dict_is_the_per_tensor_adam_format_both_ways():
    p_ref, l_ref = fresh()
    p_flat, l_flat = fresh()
    ref_opt = torch.optim.Adam(_leaves(p_ref, l_ref), lr=1e-2, fused=True)
    outer = OuterOptimizer(p_flat, l_flat, 1e-2, fused=True)
    empty = outer.state_dict()
    assert empty["state"] == {} and empty["param_groups"][0]["params"] == list(range(len(_leaves(p_ref, l_ref))))
    step_both(ref_opt, _leaves(p_ref, l_ref), outer, 3)
    ours, theirs = outer.state_dict(), ref_opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for i in theirs["state"]:
        assert ours["state"][i].keys() == theirs["state"][i].keys()
        for k in theirs["state"][i]:
            assert ours["state"][i][k].shape == theirs["state"][i][k].shape
            assert torch.allclose(ours["state"][i][k], theirs["state"][i][k], atol=1e-7), (i, k)

    # a checkpoint written by the per-tensor Adam resumes in the flat optimizer (and the reverse), exactly
    p_a, l_a = fresh()
    p_b, l_b = fresh()
    with torch.no_grad():
        for src, dst in ((p_ref, p_a), (l_ref, l_a), (p_flat, p_b), (l_flat, l_b)):
            for n in src:
                dst[n].copy_(src[n])
    resumed_flat = OuterOptimizer(p_a, l_a, 1e-2, fused=True)
    resumed_flat.load_state_dict(theirs)
    resumed_ref = torch.optim.Adam(_leaves(p_b, l_b), lr=1e-2, fused=True)
    resumed_ref.load_state_dict(ours)
    step_both(resumed_ref, _leaves(p_b, l_b), resumed_flat, 4, start=3)
    step_both(ref_opt, _leaves(p_ref, l_ref), outer, 4, start=3)
    for d in (p_a, p_b, p_flat):
        assert_same_tensors(d, p_ref)
    for d in (l_a, l_b, l_flat):
        assert_same_tensors(d, l_ref)


def test_fixed_rates_stay_outside_the_optimizer():
    params, lrs = fresh(learn_lr=False)
    outer = OuterOptimizer(params, lrs, 1e-3)
    assert outer.flat.numel() == sum(p.numel() for p in params.values())
    assert all(not r.requires_grad for r in lrs.values())

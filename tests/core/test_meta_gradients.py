"""The vectorised meta-gradients against plain per-task reference loops written with torch.autograd."""

import pytest
import torch
from torch.func import functional_call

from meta_train.algorithms import meta_gradient, resolve
from meta_train.config import AlgorithmConfig
from meta_train.inner import adapt, init_inner_lrs


def mse(model, params, x, y):
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()


def reference_maml(model, params, batch, steps, lr, first_order):
    total = 0.0
    for i in range(batch.support_x.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            loss = mse(model, fast, batch.support_x[i], batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        total = total + mse(model, fast, batch.query_x[i], batch.query_y[i])
    total = total / batch.support_x.shape[0]
    return dict(zip(params, torch.autograd.grad(total, list(params.values()))))


def max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_maml_matches_reference_loop(sinusoid_setup, steps):
    model, params, batch = sinusoid_setup
    alg = resolve(AlgorithmConfig(name="maml", inner_steps=steps, inner_lr=0.01), "mse")
    _, grads, _ = meta_gradient(model, alg, params, init_inner_lrs(params, alg.inner), batch)
    ref = reference_maml(model, params, batch, steps, 0.01, first_order=False)
    assert max_diff(grads, ref) < 1e-5
    # and second order really differs from first order here, so the comparison has teeth
    assert max_diff(ref, reference_maml(model, params, batch, steps, 0.01, first_order=True)) > 1e-5


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_maml_matches_reference_loop(sinusoid_setup, steps):
    model, params, batch = sinusoid_setup
    alg = resolve(AlgorithmConfig(name="fomaml", inner_steps=steps, inner_lr=0.01), "mse")
    _, grads, _ = meta_gradient(model, alg, params, init_inner_lrs(params, alg.inner), batch)
    assert max_diff(grads, reference_maml(model, params, batch, steps, 0.01, first_order=True)) < 1e-5


def test_reptile_matches_reference_loop(sinusoid_setup):
    model, params, batch = sinusoid_setup
    alg = resolve(AlgorithmConfig(name="reptile", inner_steps=4, reptile_inner_lr=0.02), "mse")
    _, grads, _ = meta_gradient(model, alg, params, init_inner_lrs(params, alg.inner), batch)
    displacement = {n: torch.zeros_like(p) for n, p in params.items()}
    tasks = batch.support_x.shape[0]
    for i in range(tasks):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        fast = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        for _ in range(4):
            g = torch.autograd.grad(mse(model, fast, x, y), list(fast.values()))
            fast = {n: (p - 0.02 * gi).detach().requires_grad_() for (n, p), gi in zip(fast.items(), g)}
        for n in params:
            displacement[n] += (params[n].detach() - fast[n].detach()) / tasks
    assert max_diff(grads, displacement) < 1e-5
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_learned_inner_rates_receive_gradients(sinusoid_setup, name):
    model, params, batch = sinusoid_setup
    alg = resolve(AlgorithmConfig(name=name, inner_steps=2), "mse")
    lrs = {n: r.requires_grad_() for n, r in init_inner_lrs(params, alg.inner).items()}
    _, _, lr_grads = meta_gradient(model, alg, params, lrs, batch)
    assert set(lr_grads) == set(params)
    for n, g in lr_grads.items():
        assert g.shape == lrs[n].shape
        assert float(g.abs().sum()) > 0, n
    if name == "metasgd":  # per-parameter rates, shared over steps
        assert lrs["body.0.weight"].shape == (1, *params["body.0.weight"].shape)
    else:  # per-layer, per-step rates
        assert lrs["body.0.weight"].shape == (2, 1, 1)


def test_metasgd_rate_gradient_matches_finite_difference(sinusoid_setup):
    model, params, batch = sinusoid_setup
    alg = resolve(AlgorithmConfig(name="metasgd", inner_steps=1), "mse")
    lrs = {n: r.double().requires_grad_() for n, r in init_inner_lrs(params, alg.inner).items()}
    p64 = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    b64 = type(batch)(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    model = model.double()
    _, _, lr_grads = meta_gradient(model, alg, p64, lrs, b64)
    from meta_train.algorithms import meta_loss

    eps = 1e-6
    bumped = {n: r.detach().clone() for n, r in lrs.items()}
    bumped["head.bias"] += eps
    lower = {n: r.detach().clone() for n, r in lrs.items()}
    lower["head.bias"] -= eps
    fd = (meta_loss(model, alg, p64, bumped, b64) - meta_loss(model, alg, p64, lower, b64)) / (2 * eps)
    assert abs(float(fd.detach()) - float(lr_grads["head.bias"].sum())) < 1e-6


def test_anil_leaves_the_body_untouched(sinusoid_setup):
    model, params, batch = sinusoid_setup
    alg = resolve(AlgorithmConfig(name="anil", inner_steps=3, inner_lr=0.1), "mse")
    adapted = adapt(model, params, init_inner_lrs(params, alg.inner), batch.support_x[0], batch.support_y[0], alg.inner)
    for n in params:
        if n.startswith("head."):
            assert not torch.equal(adapted[n], params[n]), n
        else:
            assert adapted[n] is params[n], n
    # yet the body still learns in the outer loop, through the head's adaptation
    _, grads, _ = meta_gradient(model, alg, params, init_inner_lrs(params, alg.inner), batch)
    assert float(grads["body.0.weight"].abs().sum()) > 0


def test_msl_weights_anneal_onto_the_last_step():
    from meta_train.algorithms import msl_weights

    early, late = msl_weights(5, 0, 100), msl_weights(5, 100, 100)
    assert torch.allclose(early, torch.full((5,), 0.2))
    assert abs(float(late.sum()) - 1) < 1e-6 and float(late[-1]) > 0.95

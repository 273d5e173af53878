"""The batched-MLP fast path (meta_train/fast_mlp.py) against the generic vmap path it replaces.

Both are switchable per call (`fast=True/False`); the generic path is itself checked against plain
per-task reference loops in test_meta_gradients.py.
"""

import pytest
import torch

from meta_train import fast_mlp
from meta_train.algorithms import meta_gradient, resolve, uses_fast_path
from meta_train.config import AlgorithmConfig
from meta_train.inner import init_inner_lrs
from meta_train.model import build_model, init_params
from meta_train.tasks import TaskBatch
from meta_train.tasks.sinusoid import SinusoidOptions, SinusoidSource

TOL = 1e-5


def setup(name="maml", steps=1, activation="relu", transform=None, loss="mse", spec=None, batch=None, **alg_kw):
    spec = spec or {"in_features": 1, "hidden": [40, 40], "out_features": 1, "activation": activation,
                    "input_transform": transform}
    model = build_model(spec)
    gen = torch.Generator().manual_seed(0)
    params = {k: v.requires_grad_() for k, v in init_params(model, gen).items()}
    if batch is None:
        batch = SinusoidSource(SinusoidOptions()).sample("train", 6, 10, 10, gen)
    alg = resolve(AlgorithmConfig(name=name, inner_steps=steps, **alg_kw), loss)
    lrs = {n: r.requires_grad_(alg.inner.learn_lr) for n, r in init_inner_lrs(params, alg.inner).items()}
    if alg.inner.learn_lr:  # move off the uniform initial rates, so a mixed-up rate would show
        with torch.no_grad():
            for r in lrs.values():
                r.mul_(1 + torch.rand(r.shape, generator=gen))
    return model, alg, params, lrs, batch


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def assert_same(model, alg, params, lrs, batch, iteration=0):
    lf, pf, rf = meta_gradient(model, alg, params, lrs, batch, iteration, fast=True)
    lg, pg, rg = meta_gradient(model, alg, params, lrs, batch, iteration, fast=False)
    assert set(pf) == set(pg) == set(params) and set(rf) == set(rg)
    assert abs(float(lf - lg)) < TOL
    for n in pg:
        assert pf[n].shape == pg[n].shape
        assert rel_diff(pf[n], pg[n]) < TOL, n
        assert float(pg[n].abs().max()) > 0, n
    for n in rg:
        assert rf[n].shape == rg[n].shape == lrs[n].shape
        assert rel_diff(rf[n], rg[n]) < TOL, f"lr:{n}"
        assert float(rg[n].abs().max()) > 0, f"lr:{n}"
    return pf, rf


SUPPORTED = {
    "maml-1": dict(name="maml", steps=1),
    "maml-3": dict(name="maml", steps=3),
    "fomaml-3": dict(name="fomaml", steps=3),
    "metasgd-2": dict(name="metasgd", steps=2),
    "metasgd-first-order": dict(name="metasgd", steps=2, first_order=True),
    "mamlpp-no-msl": dict(name="mamlpp", steps=3, multi_step_loss=False),
    "maml-tanh": dict(name="maml", steps=2, activation="tanh"),
    "maml-standardize": dict(name="maml", steps=2, transform={"kind": "standardize", "mean": [0.5], "std": [2.0]}),
    "maml-no-hidden": dict(name="maml", steps=2, spec={"in_features": 1, "hidden": [], "out_features": 1}),
}


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_fast_path_matches_generic_path(case):
    model, alg, params, lrs, batch = setup(**SUPPORTED[case])
    assert uses_fast_path(model, alg, params, batch)
    _, lr_grads = assert_same(model, alg, params, lrs, batch)
    assert set(lr_grads) == (set(params) if alg.inner.learn_lr else set())


def test_fast_path_second_order_differs_from_first_order():
    model, alg, params, lrs, batch = setup("maml", 3)
    _, second, _ = meta_gradient(model, alg, params, lrs, batch, fast=True)
    fo = resolve(AlgorithmConfig(name="maml", inner_steps=3, first_order=True), "mse")
    _, first, _ = meta_gradient(model, fo, params, lrs, batch, fast=True)
    assert max(rel_diff(second[n], first[n]) for n in params) > 1e-4


def test_mamlpp_phases_after_msl_and_first_order_annealing():
    # multi-step loss over (iteration >= msl_iterations) and first order until iteration 50: both fast
    model, alg, params, lrs, batch = setup("mamlpp", 3, msl_iterations=10, first_order_until=50)
    for iteration in (20, 60):
        assert uses_fast_path(model, alg, params, batch, iteration)
        assert_same(model, alg, params, lrs, batch, iteration)


def test_spectrum_transform_and_vector_output():
    gen = torch.Generator().manual_seed(3)
    b, k, window = 4, 8, 32
    batch = TaskBatch(torch.randn(b, k, window, generator=gen), torch.randn(b, k, 2, generator=gen),
                      torch.randn(b, k, window, generator=gen), torch.randn(b, k, 2, generator=gen))
    spec = {"in_features": window, "hidden": [16], "out_features": 2, "activation": "tanh",
            "input_transform": {"kind": "spectrum", "window": window, "bins": 6}}
    model, alg, params, lrs, batch = setup("metasgd", 2, spec=spec, batch=batch)
    assert uses_fast_path(model, alg, params, batch)
    assert_same(model, alg, params, lrs, batch)


def test_reptile_fast_path_matches_generic_path():
    model, alg, params, lrs, batch = setup("reptile", 4)
    assert uses_fast_path(model, alg, params, batch)
    lf, gf, _ = meta_gradient(model, alg, params, lrs, batch, fast=True)
    lg, gg, _ = meta_gradient(model, alg, params, lrs, batch, fast=False)
    assert abs(float(lf - lg)) < TOL
    for n in params:
        assert rel_diff(gf[n], gg[n]) < TOL, n
    assert max(float(g.abs().max()) for g in gg.values()) > 1e-4


UNSUPPORTED = {
    "anil": dict(name="anil", steps=2),
    "mamlpp-multi-step-loss": dict(name="mamlpp", steps=3),  # msl on at iteration 0
    "gelu": dict(name="maml", steps=2, activation="gelu"),
}


def _forbid_fast(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fast path taken for an unsupported config")

    monkeypatch.setattr(fast_mlp, "query_losses", boom)
    monkeypatch.setattr(fast_mlp, "reptile", boom)
    monkeypatch.setattr(fast_mlp, "first_order_gradient", boom)
    monkeypatch.setattr(fast_mlp, "second_order_gradient", boom)


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_configs_take_the_generic_path(monkeypatch, case):
    model, alg, params, lrs, batch = setup(**UNSUPPORTED[case])
    assert not uses_fast_path(model, alg, params, batch)
    _forbid_fast(monkeypatch)
    _, grads, _ = meta_gradient(model, alg, params, lrs, batch)  # default: fast if supported
    assert float(grads["head.weight"].abs().sum()) > 0


def test_cross_entropy_takes_the_generic_path(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    batch = TaskBatch(torch.randn(4, 6, 3, generator=gen), torch.randint(0, 3, (4, 6), generator=gen),
                      torch.randn(4, 6, 3, generator=gen), torch.randint(0, 3, (4, 6), generator=gen))
    spec = {"in_features": 3, "hidden": [8], "out_features": 3, "activation": "relu"}
    model, alg, params, lrs, batch = setup("maml", 1, spec=spec, batch=batch, loss="cross_entropy")
    assert not uses_fast_path(model, alg, params, batch)
    _forbid_fast(monkeypatch)
    _, grads, _ = meta_gradient(model, alg, params, lrs, batch)
    assert float(grads["head.weight"].abs().sum()) > 0


def test_supported_config_takes_the_fast_path_and_the_switch_turns_it_off(monkeypatch):
    model, alg, params, lrs, batch = setup("maml", 1)
    calls = []
    # second order on the fast path: the hand-derived meta-gradient (meta_loss would go through query_losses)
    real = fast_mlp.second_order_gradient
    monkeypatch.setattr(fast_mlp, "second_order_gradient", lambda *a, **k: calls.append(1) or real(*a, **k))
    meta_gradient(model, alg, params, lrs, batch)
    assert calls == [1]
    meta_gradient(model, alg, params, lrs, batch, fast=False)
    monkeypatch.setattr(fast_mlp, "ENABLED", False)
    assert not uses_fast_path(model, alg, params, batch)
    meta_gradient(model, alg, params, lrs, batch)
    assert calls == [1]


@pytest.mark.parametrize("name", ["fomaml", "metasgd"])
def test_first_order_meta_loss_through_autograd_matches(name):
    # meta_gradient's first order on the fast path skips autograd; meta_loss's fast path must still be right
    from meta_train.algorithms import meta_loss

    model, alg, params, lrs, batch = setup(name, 2, first_order=True)
    leaves = list(params.values()) + [r for r in lrs.values() if r.requires_grad]
    fast = meta_loss(model, alg, params, lrs, batch, fast=True)
    generic = meta_loss(model, alg, params, lrs, batch, fast=False)
    assert abs(float((fast - generic).detach())) < TOL
    reference = torch.autograd.grad(generic, leaves)
    for a, b in zip(torch.autograd.grad(fast, leaves), reference):
        assert rel_diff(a, b) < TOL
    _, pf, rf = meta_gradient(model, alg, params, lrs, batch, fast=True)
    assert len(rf) == (len(params) if name == "metasgd" else 0)
    for a, b in zip(list(pf.values()) + list(rf.values()), reference):
        assert rel_diff(a, b) < TOL


# The hand-derived second-order meta-gradient (fast_mlp.second_order_gradient) in more shapes: deeper nets,
# per-layer-per-step rates shared beyond their steps, vector targets, and in float64 (where the only difference
# from autograd is rounding, so the tolerance can be much tighter).

SECOND_ORDER = {
    "maml-5-deep-relu": dict(name="maml", steps=5, spec={"in_features": 1, "hidden": [16, 24, 8], "out_features": 1}),
    "maml-4-deep-tanh": dict(name="maml", steps=4, spec={"in_features": 1, "hidden": [12, 20, 6], "out_features": 1,
                                                          "activation": "tanh"}),
    "metasgd-5": dict(name="metasgd", steps=5),
    "mamlpp-4-tanh": dict(name="mamlpp", steps=4, multi_step_loss=False, activation="tanh"),
    # one step: the query gradient of hidden-to-hidden weights stays factored (scalar, fixed rate), or not (learned)
    "maml-1-deep-relu": dict(name="maml", steps=1, spec={"in_features": 1, "hidden": [16, 24, 8], "out_features": 1}),
    "maml-1-deep-tanh": dict(name="maml", steps=1, spec={"in_features": 1, "hidden": [12, 20, 6], "out_features": 1,
                                                          "activation": "tanh"}),
    "mamlpp-1-learned-scalar-rates": dict(name="mamlpp", steps=1, multi_step_loss=False),
    "metasgd-1": dict(name="metasgd", steps=1),
}


@pytest.mark.parametrize("case", list(SECOND_ORDER))
def test_hand_derived_second_order_matches_generic_path(case):
    model, alg, params, lrs, batch = setup(**SECOND_ORDER[case])
    assert uses_fast_path(model, alg, params, batch) and not alg.first_order
    assert_same(model, alg, params, lrs, batch)


def test_hand_derived_second_order_more_steps_than_learned_rates():
    # MAML++ rates trained for 2 steps, run for 4: the last rate is reused and collects gradient from 3 steps
    model, alg, params, lrs, batch = setup("mamlpp", 2, multi_step_loss=False)
    alg4 = resolve(AlgorithmConfig(name="mamlpp", inner_steps=4, multi_step_loss=False), "mse")
    assert assert_same(model, alg4, params, lrs, batch)[1].keys() == params.keys()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("name", ["maml", "metasgd"])
def test_hand_derived_second_order_float64(name, activation, steps):
    gen = torch.Generator().manual_seed(7)
    b, k = 5, 7
    batch = TaskBatch(torch.randn(b, k, 3, generator=gen, dtype=torch.float64),
                      torch.randn(b, k, 2, generator=gen, dtype=torch.float64),
                      torch.randn(b, k + 2, 3, generator=gen, dtype=torch.float64),
                      torch.randn(b, k + 2, 2, generator=gen, dtype=torch.float64))
    spec = {"in_features": 3, "hidden": [9, 11], "out_features": 2, "activation": activation}
    model, alg, params, lrs, batch = setup(name, steps, spec=spec, batch=batch, inner_lr=0.1)
    model = model.double()
    params = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    lrs = {n: r.detach().double().requires_grad_(r.requires_grad) for n, r in lrs.items()}
    assert uses_fast_path(model, alg, params, batch)
    lf, pf, rf = meta_gradient(model, alg, params, lrs, batch, fast=True)
    lg, pg, rg = meta_gradient(model, alg, params, lrs, batch, fast=False)
    assert pf["head.weight"].dtype == torch.float64
    assert abs(float(lf - lg)) < 1e-12
    for n in pg:
        assert rel_diff(pf[n], pg[n]) < 1e-10, n
    assert set(rf) == set(rg) == (set(params) if name == "metasgd" else set())
    for n in rg:
        assert rel_diff(rf[n], rg[n]) < 1e-10, f"lr:{n}"


def _spread_rates(lrs, learned, seed=3):
    """Distinct rates per layer and step (so a rate reused for the wrong step or layer would show); only the
    names in `learned` keep requires_grad."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (r.detach() * (1 + torch.rand(r.shape, generator=gen))).requires_grad_(n in learned)
            for n, r in lrs.items()}


@pytest.mark.parametrize("steps", [2, 5])
def test_hand_derived_second_order_fixed_per_step_rates(steps):
    # MAML++ per-layer-per-step rates that do not learn, trained for 2 steps and run for `steps`: the weight
    # updates are fused into the gradient matmuls (a different one-number rate per step) and the bias rates
    # folded into the Hessian-vector products' matmuls; the rates of the last trained step carry on
    model, alg, params, lrs, batch = setup("mamlpp", 2, multi_step_loss=False,
                                           spec={"in_features": 1, "hidden": [16, 24, 8], "out_features": 1})
    lrs = _spread_rates(lrs, learned=())
    alg_s = resolve(AlgorithmConfig(name="mamlpp", inner_steps=steps, multi_step_loss=False), "mse")
    assert uses_fast_path(model, alg_s, params, batch) and not alg_s.first_order
    assert assert_same(model, alg_s, params, lrs, batch)[1] == {}


@pytest.mark.parametrize("learned", [("body.2.weight", "body.4.weight"), ("body.2.weight",)])
@pytest.mark.parametrize("steps", [1, 4])
def test_hand_derived_second_order_some_rates_learned(steps, learned):
    # only some hidden weights' rates learn: those weights keep their per-task inner gradients (for the rates'
    # gradients), every other weight takes the fused update (with one step, the other hidden-to-hidden weight
    # stays low-rank beside the learned one), the biases' folded rates
    model, alg, params, lrs, batch = setup("mamlpp", steps, multi_step_loss=False,
                                           spec={"in_features": 1, "hidden": [16, 24, 8], "out_features": 1})
    learned = set(learned)
    lrs = _spread_rates(lrs, learned)
    _, rf = assert_same(model, alg, params, lrs, batch)
    assert set(rf) == learned

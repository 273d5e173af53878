"""export/optimize.py's rewrites change the node count, never the result (checked per algorithm here,
fast, without exporting; the export tests then check ORT and TorchScript against eager `adapt`)."""

from __future__ import annotations

import onnx
import pytest
import torch
from export_helpers import QUALITY_SPEC, SPECTRUM_SPEC, write_checkpoint

from export.bundle import export_bundle
from export.onnx_export import export_adapt
from export.trace import Functions, trace
from meta_train.trained import load_trained

SINE_SPEC = {"in_features": 1, "hidden": [40, 40], "out_features": 1, "activation": "relu", "input_transform": None}
LINEAR_SPEC = {"in_features": 4, "hidden": [], "out_features": 1, "activation": "relu", "input_transform": None}


@pytest.mark.parametrize(
    "spec,algorithm,loss",
    [
        (SINE_SPEC, "maml", "mse"),
        (QUALITY_SPEC, "metasgd", "mse"),
        (QUALITY_SPEC, "mamlpp", "mse"),
        (SINE_SPEC, "anil", "mse"),
        (QUALITY_SPEC, "maml", "mse"),  # first layer [W^T; b] with in = 4 (split and transposed at the end)
        (SINE_SPEC, "fomaml", "mse"),  # first layer [W^T; b] with in = 1 (no split)
        (LINEAR_SPEC, "maml", "mse"),  # the first layer is the output layer
        (SPECTRUM_SPEC, "maml", "cross_entropy"),
        (SPECTRUM_SPEC, "metasgd", "cross_entropy"),
    ],
)
def test_rewrites_preserve_adapt(spec, algorithm, loss, tmp_path):
    run = write_checkpoint(tmp_path, spec, algorithm=algorithm, steps=3, loss=loss, lr=0.05, perturb_lrs=True)
    fns = Functions(load_trained(run))
    plain, _ = trace(fns, 16, optimize=False)
    fast, _ = trace(fns, 16, optimize=True)
    assert len(fast.graph.nodes) < len(plain.graph.nodes)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 5, 16):
        x = torch.randn(n, *fns.input_shape, generator=gen)
        if "mean" in (spec.get("input_transform") or {}):
            x = x * torch.tensor(spec["input_transform"]["std"]) + torch.tensor(spec["input_transform"]["mean"])
        y = torch.randint(0, 5, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, generator=gen)
        w = (torch.rand(n, generator=gen) > 0.3).float()
        ref = fns.adapt(x, y, w)
        assert (ref - fns.init_state()).abs().max() > 0 or w.sum() == 0
        assert torch.allclose(fast(x, y, w), ref, atol=1e-5, rtol=0), (n, (fast(x, y, w) - ref).abs().max())
        assert torch.allclose(plain(x, y, w), ref, atol=1e-6, rtol=0)


def test_sine_5_step_graph_is_small(tmp_path):
    """The latency lever: 1-40-40-1, 5 steps. Verbatim autograd exports to ~238 nodes."""
    run = write_checkpoint(tmp_path / "run", SINE_SPEC, steps=5, lr=0.01)
    fns = Functions(load_trained(run))
    adapt_gm, _ = trace(fns, 64)
    args, _ = fns.example_inputs(64)
    model = export_adapt(adapt_gm, args, 64, tmp_path / "adapt.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert len(ops) <= 104, len(ops)
    assert "Transpose" not in ops and "Pow" not in ops and "Squeeze" not in ops and "MatMul" not in ops
    # ReLU's backward is a 0/1 mask times the gradient (not LessOrEqual + Where), one mask per hidden layer
    # and step, the mask a HardSigmoid of the (scaled) activations (Sign in the fx graph and TorchScript)
    assert "Where" not in ops and "LessOrEqual" not in ops and "Sign" not in ops and ops.count("HardSigmoid") == 10
    # per step: 3 forward, 2 backprop, 5 updates (the first layer's W and b in one Gemm)
    assert ops.count("Gemm") == 50, ops.count("Gemm")
    reloaded = onnx.load(str(tmp_path / "adapt.onnx"))
    assert [d.dim_param for d in reloaded.graph.input[0].type.tensor_type.shape.dim][:1] == ["N"]


@pytest.mark.parametrize(
    "spec,steps",
    [(SINE_SPEC, 5), (QUALITY_SPEC, 4), (LINEAR_SPEC, 3)],
    ids=["sine-in1", "quality-in4", "linear-in4"],
)
def test_rewritten_bundle_parity_on_held_out_tasks(spec, steps, tmp_path):
    """The rewritten graphs (HardSigmoid masks, the first layer as one [W^T; b] matrix, row-wise state) under
    ONNX Runtime with the device's settings against eager `adapt`: 20 held-out tasks at support sizes 1, K
    and max, plus a padded support set (export_bundle raises ParityError beyond 1e-4)."""
    run = write_checkpoint(tmp_path / "run", spec, steps=steps, lr=0.05, seed=3)
    result = export_bundle(run, tmp_path / "bundle", max_support=16, log=lambda *_: None)
    parity = result.manifest["parity"]
    assert parity["tasks"] >= 20 and parity["padded_case"] and parity["support_sizes"] == [1, 10, 16]
    assert parity["onnx_max_abs"] <= 1e-4 and parity["onnx_state_max_abs"] <= 1e-4
    assert parity["torchscript_max_abs"] <= 1e-4 and parity["torchscript_state_max_abs"] <= 1e-4
    model = onnx.load(str(result.path / "adapt.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ("HardSigmoid" in ops) == bool(spec["hidden"]) and "Where" not in ops and "Sign" not in ops
    assert any(init.name.startswith("_first_layer_aug") for init in model.graph.initializer)


def test_hardsigmoid_mask_is_exactly_the_relu_mask():
    """relu_masks_to_hardsigmoid: the same mask and the same downstream products as Sign, down to the
    smallest denormal activation, on a Gemm -> Relu -> {Sign -> Mul, Gemm} graph."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_export import relu_masks_to_hardsigmoid

    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["z"]),
        helper.make_node("Relu", ["z"], ["h"]),
        helper.make_node("Sign", ["h"], ["m"]),
        helper.make_node("Mul", ["g", "m"], ["masked"]),
        helper.make_node("Gemm", ["h", "w2"], ["next"], alpha=0.5),
    ]
    inits = [numpy_helper.from_array(np.ones((1, 4), np.float32), "w"),
             numpy_helper.from_array(np.full((4, 1), 3.0, np.float32), "w2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1]),
                     helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("masked", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("next", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    x = np.array([0.0, -0.0, 2.0**-149, 2.0**-130, 2.0**-126, -1e-30, 1e-30, 1.0, -1.0, 1e30], np.float32)[:, None]
    g = np.random.default_rng(0).standard_normal((len(x), 4)).astype(np.float32)

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x, "g": g})

    before = run(model)
    assert relu_masks_to_hardsigmoid(model) == 1
    assert [n.op_type for n in model.graph.node].count("HardSigmoid") == 1
    after = run(model)
    for b, a in zip(before, after):
        assert np.array_equal(b, a), (b, a)

"""export/optimize.py's rewrites change the node count, never the result (checked per algorithm here,
fast, without exporting; the export tests then check ORT and TorchScript against eager `adapt`)."""

from __future__ import annotations

import onnx
import pytest
import torch
from export_helpers import QUALITY_SPEC, SPECTRUM_SPEC, write_checkpoint

from export.onnx_export import export_adapt
from export.trace import Functions, trace
from meta_train.trained import load_trained

SINE_SPEC = {"in_features": 1, "hidden": [40, 40], "out_features": 1, "activation": "relu", "input_transform": None}


@pytest.mark.parametrize(
    "spec,algorithm,loss",
    [
        (SINE_SPEC, "maml", "mse"),
        (QUALITY_SPEC, "metasgd", "mse"),
        (QUALITY_SPEC, "mamlpp", "mse"),
        (SINE_SPEC, "anil", "mse"),
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
    assert len(ops) <= 120, len(ops)
    assert "Transpose" not in ops and "Pow" not in ops and "Squeeze" not in ops
    reloaded = onnx.load(str(tmp_path / "adapt.onnx"))
    assert [d.dim_param for d in reloaded.graph.input[0].type.tensor_type.shape.dim][:1] == ["N"]

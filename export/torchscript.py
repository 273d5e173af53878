"""The traced graphs as one TorchScript module with `adapt` and `predict` methods (model.pt).

Scripting the aten graphs, not the eager adapt, keeps autograd out of TorchScript (its autograd.grad
support is deprecated) and keeps N and M dynamic, which `jit.trace` would freeze.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from .errors import ExportError


def _scriptable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    # TorchScript resolves `torch.ops.aten.t(x)` by schema but cannot parse the `.default` overload
    # attribute that make_fx records; the overload packet names the same kernel.
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    gm.recompile()
    return gm


class Bundle(torch.nn.Module):
    def __init__(self, adapt_gm, predict_gm):
        super().__init__()
        self.adapt_graph = _scriptable(adapt_gm)
        self.predict_graph = _scriptable(predict_gm)

    @torch.jit.export
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, support_w: torch.Tensor) -> torch.Tensor:
        return self.adapt_graph(support_x, support_y, support_w)

    @torch.jit.export
    def predict(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.predict_graph(state, x)

    def forward(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.predict_graph(state, x)


def export_torchscript(adapt_gm, predict_gm, path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # `torch.jit.script is deprecated`: the bundle format still asks for TorchScript.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.*")
            module = torch.jit.script(Bundle(adapt_gm, predict_gm))
            torch.jit.save(module, str(path))
            return torch.jit.load(str(path))
    except Exception as e:  # TorchScript frontend errors come in many types
        raise ExportError(f"TorchScript export failed: {type(e).__name__}: {e}") from e

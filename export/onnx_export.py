"""Traced graphs -> ONNX files, checked by onnx.checker before anything else trusts them."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from .errors import ExportError

OPSET = 20
ADAPT_INPUTS = ["support_x", "support_y", "support_w"]
ADAPT_OUTPUTS = ["state"]
PREDICT_INPUTS = ["state", "x"]
PREDICT_OUTPUTS = ["y"]


@contextlib.contextmanager
def _quiet():
    # The dynamo exporter reports progress and harmless notices (torchvision absent, deprecations of
    # its own internals) on stdout, stderr and logging; a CLI run should show only our own lines.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(gm: torch.fx.GraphModule, args: tuple, dynamic_shapes, input_names, output_names, path: Path):
    try:
        with _quiet():
            program = torch.onnx.export(
                gm, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
            # One self-contained file: the verifier refuses any file the manifest does not list.
            program.save(str(path), external_data=False)
    except Exception as e:  # the exporter raises a zoo of types; all mean "this graph cannot be exported"
        raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e
    model = onnx.load(str(path))
    if fuse_gemm_transposes(model):
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {e}") from e
    if dynamic_shapes is not None:
        for value, dims in zip(model.graph.input, dynamic_shapes):
            if dims and not value.type.tensor_type.shape.dim[0].dim_param:
                raise ExportError(f"{path.name}: input {value.name} came out with a fixed first dimension "
                                  f"{value.type.tensor_type.shape.dim[0].dim_value}, not a dynamic one")
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != input_names or names_out != output_names:
        raise ExportError(f"{path.name} has inputs {names_in} / outputs {names_out}, expected {input_names} / {output_names}")
    return model


def fuse_gemm_transposes(model: onnx.ModelProto) -> int:
    """Gemm(Transpose(A), B) -> Gemm(A, B, transA=1), likewise for B: one node less per weight update.

    Autograd writes every weight gradient as `G^T A`; ONNX Runtime 1.32 leaves these Transposes as
    separate nodes, and in this overhead-bound graph each node costs about as much as a small Gemm.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    dead, fused = set(), 0
    for node in graph.node:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        for index, flag in ((0, "transA"), (1, "transB")):
            t = producers.get(node.input[index])
            if t is None or t.op_type != "Transpose" or consumers.get(t.output[0]) != 1 or t.output[0] in outputs:
                continue
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
            if perm and perm[0] != [1, 0]:
                continue
            node.input[index] = t.input[0]
            current = attrs[flag].i if flag in attrs else 0
            if flag in attrs:
                attrs[flag].i = 1 - current
            else:
                node.attribute.append(onnx.helper.make_attribute(flag, 1))
            dead.add(id(t))
            fused += 1
    if fused:
        keep = [n for n in graph.node if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    return fused


def export_adapt(gm, example_args, max_support: int, path: Path) -> onnx.ModelProto:
    if max_support == 1:  # a one-element range cannot be a dynamic dimension
        return _export(gm, example_args, None, ADAPT_INPUTS, ADAPT_OUTPUTS, path)
    n = torch.export.Dim("N", min=1, max=max_support)
    return _export(gm, example_args, ({0: n}, {0: n}, {0: n}), ADAPT_INPUTS, ADAPT_OUTPUTS, path)


def export_predict(gm, example_args, path: Path) -> onnx.ModelProto:
    m = torch.export.Dim("M", min=1)
    return _export(gm, example_args, (None, {0: m}), PREDICT_INPUTS, PREDICT_OUTPUTS, path)

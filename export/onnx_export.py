"""Traced graphs -> ONNX files, checked by onnx.checker before anything else trusts them."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
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
    # in this order: a MatMul's Transpose folds too
    if matmuls_to_gemm(model) + fuse_gemm_transposes(model) + ones_row(model) + relu_masks_to_hardsigmoid(model):
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


def _graph_index(graph) -> tuple[dict, dict, set]:
    """(tensor name -> producing node, tensor name -> [(consuming node, input index)], graph output names)."""
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    return producers, uses, {o.name for o in graph.output}


def fuse_gemm_transposes(model: onnx.ModelProto) -> int:
    """Gemm(Transpose(A), B) -> Gemm(A, B, transA=1), likewise for B: one node less per weight update.

    Autograd writes every weight gradient as `G^T A`; ONNX Runtime 1.32 leaves these Transposes as
    separate nodes, and in this overhead-bound graph each node costs about as much as a small Gemm.
    A Transpose that feeds several Gemms (a step-invariant input) is folded into each of them.
    """
    graph = model.graph
    producers, uses, outputs = _graph_index(graph)

    def is_gemm(node):
        return node.op_type == "Gemm" and node.domain in ("", "ai.onnx")

    dead, fused = set(), 0
    for t in graph.node:
        if t.op_type != "Transpose" or t.output[0] in outputs:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            continue
        consumers = uses.get(t.output[0], [])
        if not consumers or not all(is_gemm(node) and index in (0, 1) for node, index in consumers):
            continue
        for node, index in consumers:
            flag = ("transA", "transB")[index]
            attrs = {a.name: a for a in node.attribute}
            node.input[index] = t.input[0]
            if flag in attrs:
                attrs[flag].i = 1 - attrs[flag].i
            else:
                node.attribute.append(onnx.helper.make_attribute(flag, 1))
            fused += 1
        dead.add(id(t))
    if dead:
        keep = [n for n in graph.node if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    return fused


def ones_row(model: onnx.ModelProto) -> int:
    """Unsqueeze(Expand(c, Shape(v)), [0]) of a scalar c and a vector v -> Expand(c as [1, 1], Shape(v)):
    broadcasting [1, 1] against [N] gives the [1, N] row itself, one node less (the bias updates' ones row)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.input) + list(graph.value_info)
             if v.type.tensor_type.HasField("shape")}
    dead, changed = set(), 0
    for node in graph.node:
        if node.op_type != "Unsqueeze" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        if list(onnx.numpy_helper.to_array(inits[node.input[1]]).reshape(-1)) != [0]:
            continue
        expand = producers.get(node.input[0])
        if expand is None or expand.op_type != "Expand" or uses.get(expand.output[0]) != 1 or expand.output[0] in outputs:
            continue
        value, shape = inits.get(expand.input[0]), producers.get(expand.input[1])
        if value is None or list(value.dims) != [] or shape is None or shape.op_type != "Shape":
            continue
        if any(a.name != "start" or a.i != 0 for a in shape.attribute):  # the whole shape only
            continue
        if ranks.get(shape.input[0]) != 1:
            continue
        name = expand.output[0] + "_row_value"
        graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(value).reshape(1, 1), name))
        expand.input[0] = name
        expand.output[0] = node.output[0]
        dead.add(id(node))
        changed += 1
    if dead:
        keep = [n for n in graph.node if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    return changed


# ReLU masks: HardSigmoid(x) = clip(MASK_ALPHA * x, 0, 1) is exactly sign(x) for every float x >= 2^-127;
# activations carry a factor ACT_SCALE so that this holds for every activation down to the smallest
# denormal (ACT_SCALE * 2^-149 = 2^-127). Both are powers of two: scaling by them is exact.
MASK_ALPHA = 2.0**127
ACT_SCALE = 2.0**22


def _scale_attribute(node, name: str, factor: float) -> None:
    for a in node.attribute:
        if a.name == name:
            a.f = float(np.float32(a.f * factor))
            return
    node.attribute.append(onnx.helper.make_attribute(name, float(np.float32(factor))))


def relu_masks_to_hardsigmoid(model: onnx.ModelProto) -> int:
    """Sign(h) of a ReLU output h (the mask of ReLU's backward, see optimize.py) -> HardSigmoid: ONNX
    Runtime vectorises HardSigmoid and not Sign, about 0.25 us less per mask on [10, 40].

    The ReLU's activations become h' = ACT_SCALE * h: the Gemm producing them gets alpha and beta times
    ACT_SCALE, every Gemm reading them alpha / ACT_SCALE, so every product is the one before, scaled by a
    power of two and scaled back (exact). HardSigmoid(h', alpha=MASK_ALPHA, beta=0) is then 0 where h' is 0
    and 1 for every h' >= 2^-127, i.e. every h >= 2^-149, the smallest positive float: the 0/1 mask of
    sign(h). (Only a pre-activation within 2^-149 of zero, where float rounding decides the ReLU anyway,
    or an activation above 2^106, which overflows, could differ.) Applied only where every reader of h is
    a Gemm (as A or B) or the mask."""
    graph = model.graph
    producers, uses, outputs = _graph_index(graph)

    def standard(node, op):
        return node.op_type == op and node.domain in ("", "ai.onnx")

    changed = 0
    for relu in list(graph.node):
        if not standard(relu, "Relu") or relu.output[0] in outputs or relu.input[0] in outputs:
            continue
        gemm = producers.get(relu.input[0])
        if gemm is None or not standard(gemm, "Gemm") or len(uses.get(relu.input[0], [])) != 1:
            continue
        readers = uses.get(relu.output[0], [])
        masks = [node for node, _ in readers if standard(node, "Sign")]
        if not masks or not all(standard(node, "Sign") or (standard(node, "Gemm") and index in (0, 1))
                                for node, index in readers):
            continue
        _scale_attribute(gemm, "alpha", ACT_SCALE)
        if len(gemm.input) > 2 and gemm.input[2]:
            _scale_attribute(gemm, "beta", ACT_SCALE)
        for node, _ in readers:
            if standard(node, "Gemm"):
                _scale_attribute(node, "alpha", 1.0 / ACT_SCALE)
        for mask in masks:
            mask.op_type = "HardSigmoid"
            mask.attribute.extend([onnx.helper.make_attribute("alpha", MASK_ALPHA),
                                   onnx.helper.make_attribute("beta", 0.0)])
        changed += 1
    return changed


def matmuls_to_gemm(model: onnx.ModelProto) -> int:
    """MatMul of two matrices -> Gemm (the same product): ONNX Runtime fuses a Gemm, not a MatMul, with
    the Relu that follows it (FusedGemm), and its Gemm kernel is no slower."""
    float_matrices = set()
    for v in list(model.graph.value_info) + list(model.graph.input):
        t = v.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and t.HasField("shape") and len(t.shape.dim) == 2:
            float_matrices.add(v.name)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            float_matrices.add(init.name)
    scalars = {i.name for i in model.graph.initializer if math.prod(i.dims) == 1}
    scalars |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    scaled = set()  # MatMuls whose output a scalar multiplies: ORT folds that into the MatMul, not a Gemm
    for node in model.graph.node:
        if node.op_type in ("Mul", "Div") and any(i in scalars for i in node.input):
            scaled.update(node.input)
    changed = 0
    for node in model.graph.node:
        if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.output[0] not in scaled
                and all(i in float_matrices for i in node.input)):
            node.op_type = "Gemm"
            changed += 1
    return changed


def export_adapt(gm, example_args, max_support: int, path: Path) -> onnx.ModelProto:
    if max_support == 1:  # a one-element range cannot be a dynamic dimension
        return _export(gm, example_args, None, ADAPT_INPUTS, ADAPT_OUTPUTS, path)
    n = torch.export.Dim("N", min=1, max=max_support)
    return _export(gm, example_args, ({0: n}, {0: n}, {0: n}), ADAPT_INPUTS, ADAPT_OUTPUTS, path)


def export_predict(gm, example_args, path: Path) -> onnx.ModelProto:
    m = torch.export.Dim("M", min=1)
    return _export(gm, example_args, (None, {0: m}), PREDICT_INPUTS, PREDICT_OUTPUTS, path)

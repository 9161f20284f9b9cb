"""Model-local ONNX functions for graphopt's custom ops, and the helpers that install them.

Every graphopt op is a function in the `graphopt` domain whose body uses only standard ops, so stock
onnxruntime runs a model that carries the function. Parameters are attributes referenced from the
body (`ref_attr_name`), so one function serves every parameter set. Bodies are written for the
model's default-domain opset (13 or later: ReduceSum takes its axes as an input from 13, and
CastLike needs 15; below 15 the constants are float32).
"""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

DOMAIN = "graphopt"
MIN_OPSET = 13


def constant_attr(output: str, attribute: str, kind: int) -> onnx.NodeProto:
    """A Constant node whose value is the function attribute `attribute` (value_float, value_int or value_ints)."""
    name = {onnx.AttributeProto.FLOAT: "value_float", onnx.AttributeProto.INTS: "value_ints"}.get(kind, "value_int")
    node = helper.make_node("Constant", [], [output])
    ref = onnx.AttributeProto(name=name, ref_attr_name=attribute, type=kind)
    node.attribute.append(ref)
    return node


def like(name: str, reference: str, output: str, opset: int) -> onnx.NodeProto:
    """Cast constant `name` to the dtype of `reference` (float32 below opset 15)."""
    if opset >= 15:
        return helper.make_node("CastLike", [name, reference], [output])
    return helper.make_node("Cast", [name], [output], to=onnx.TensorProto.FLOAT)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def declared_attributes(function: onnx.FunctionProto) -> set[str]:
    """Attribute names a function accepts: required ones and those with a default."""
    return set(function.attribute) | {a.name for a in function.attribute_proto}


def ensure_function(model: onnx.ModelProto, name: str, build: Callable[[int], onnx.FunctionProto]) -> None:
    """Add graphopt function `name` (built for the model's opset) and the domain import, if missing.

    A copy written by an older graphopt that lacks an attribute the current body declares with a
    default (RMSNorm's `axis`, ExPrune's `checkpoints`) is replaced: those defaults keep the old
    meaning, so the nodes it served still compute what they did."""
    current = build(default_opset(model))
    defaults = {a.name for a in current.attribute_proto}
    existing = [i for i, f in enumerate(model.functions) if f.domain == DOMAIN and f.name == name]
    stale = [i for i in existing
             if not declared_attributes(current) <= declared_attributes(model.functions[i])
             and declared_attributes(current) - declared_attributes(model.functions[i]) <= defaults]
    for index in reversed(stale):
        del model.functions[index]
    if len(stale) == len(existing):
        model.functions.append(current)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def ensure_functions(model: onnx.ModelProto) -> None:
    """Install the function of every graphopt op the main graph uses but the model does not define."""
    from graphopt.ops.exprune import build_exprune_function
    from graphopt.ops.exprune_conv import build_exprune_conv_function
    from graphopt.ops.rms_norm import build_rms_norm_function
    from graphopt.ops.tsra import build_tsra_function

    builders = {"TSRA": build_tsra_function, "RMSNorm": build_rms_norm_function,
                "ExPruneLinearRelu": build_exprune_function, "ExPruneConvRelu": build_exprune_conv_function}
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    for op in sorted(used & builders.keys()):
        ensure_function(model, op, builders[op])

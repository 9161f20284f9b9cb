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

from graphopt.ir.graph import supersedes

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


def axis_dispatch(output: str, branch: Callable[[str, int | None], tuple[list[onnx.NodeProto], str]]) -> list[
        onnx.NodeProto]:
    """Nodes computing `output` by the body for the function attribute `axis`: `branch(prefix, axis)`
    returns (nodes, their output) for a static axis (1 or -1: reductions over that axis, as fast as a
    hand-written graph) or for None (any axis, read from the attribute with ops that take
    it as an attribute reference or a tensor). An If on axis == 1, then on axis == -1, picks the branch
    at run time; every branch keeps the input's shape, so shape inference keeps it too. Branches read
    the outer values (X, constants) by name; their own names carry the prefix."""
    def graph(prefix: str, axis: int | None) -> onnx.GraphProto:
        nodes, result = branch(prefix, axis)
        return helper.make_graph(nodes, f"{prefix}body", [], [onnx.ValueInfoProto(name=result)])

    other = helper.make_graph([helper.make_node("If", ["axis_is_last"], ["other_out"], then_branch=graph("last_", -1),
                                                else_branch=graph("any_", None))],
                              "other_axis", [], [onnx.ValueInfoProto(name="other_out")])
    return [
        constant_attr("axis_scalar", "axis", onnx.AttributeProto.INT),
        helper.make_node("Constant", [], ["axis_one"], value_int=1),
        helper.make_node("Constant", [], ["axis_minus_one"], value_int=-1),
        helper.make_node("Equal", ["axis_scalar", "axis_one"], ["axis_is_one"]),
        helper.make_node("Equal", ["axis_scalar", "axis_minus_one"], ["axis_is_last"]),
        helper.make_node("If", ["axis_is_one"], [output], then_branch=graph("first_", 1), else_branch=other),
    ]


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
    existing = [i for i, f in enumerate(model.functions) if f.domain == DOMAIN and f.name == name]
    stale = [i for i in existing if supersedes(current, declared_attributes(model.functions[i]))]
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

"""Building blocks of the model-local ONNX functions of graphopt's custom ops (graphopt.ops.library installs them).

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

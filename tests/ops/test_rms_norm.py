"""graphopt.RMSNorm's `axis`: body against the reference on every axis, the default, stale functions upgraded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.ir import graph as ir
from graphopt.ops.functions import constant_attr, like
from graphopt.ops.library import declared_attributes, ensure_functions
from graphopt.ops.rms_norm import build_rms_norm_function, make_rms_norm_node, rms_norm_reference
from tests.conftest import run_ort

SHAPE = [2, 5, 6, 7]


def _model(node: onnx.NodeProto, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ensure_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _stale_function(opset: int) -> onnx.FunctionProto:
    """The body graphopt wrote before `axis` existed: ReduceSum over the constant axes [1]."""
    nodes = [
        helper.make_node("Constant", [], ["axes"], value_ints=[1]),
        helper.make_node("Mul", ["X", "X"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "axes"], ["total"], keepdims=1),
        constant_attr("channels_i", "channels", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["channels_i"], ["channels_f"], to=onnx.TensorProto.FLOAT),
        like("channels_f", "X", "channels_c", opset),
        constant_attr("eps_f", "eps", onnx.AttributeProto.FLOAT),
        like("eps_f", "X", "eps_c", opset),
        helper.make_node("Div", ["total", "channels_c"], ["mean"]),
        helper.make_node("Add", ["mean", "eps_c"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["rms"]),
        helper.make_node("Div", ["X", "rms"], ["Y"]),
    ]
    return helper.make_function("graphopt", "RMSNorm", ["X"], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=["channels", "eps"])


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("axis", [1, -1, 3, 2, -3])
def test_body_normalises_over_the_axis_and_keeps_shapes_inferable(opset: int, axis: int) -> None:
    model = _model(make_rms_norm_node("x", "y", channels=9, eps=1e-3, axis=axis), opset)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 3.0
    want = rms_norm_reference(x, 9, 1e-3, axis=axis)
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], want, rtol=1e-5, atol=1e-6)
    inner = helper.make_node("Identity", ["y"], ["z"])  # the RMSNorm's output is then an inferred value
    model.graph.node.append(inner)
    model.graph.output[0].name = "z"
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = [d.dim_value for d in inferred.graph.value_info[0].type.tensor_type.shape.dim]
    assert dims == SHAPE


def test_a_node_without_axis_normalises_axis_1() -> None:
    node = make_rms_norm_node("x", "y", channels=5)
    assert "axis" not in {a.name for a in node.attribute}
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(run_ort(_model(node), {"x": x})["y"], rms_norm_reference(x), rtol=1e-5, atol=1e-6)


def test_a_stale_function_is_replaced_only_when_a_node_needs_axis() -> None:
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    old = _model(make_rms_norm_node("x", "y", channels=5))
    old.functions[0].CopyFrom(_stale_function(17))
    np.testing.assert_allclose(run_ort(old, {"x": x})["y"], rms_norm_reference(x), rtol=1e-5, atol=1e-6)
    new_node = make_rms_norm_node("x", "y", channels=7, axis=-1)
    old.graph.node[0].CopyFrom(new_node)
    ensure_functions(old)  # the stale copy would ignore axis=-1
    assert [declared_attributes(f) for f in old.functions] == [{"channels", "eps", "axis"}]
    np.testing.assert_allclose(run_ort(old, {"x": x})["y"], rms_norm_reference(x, axis=-1), rtol=1e-5, atol=1e-6)
    graph = ir.import_graph(_model(make_rms_norm_node("x", "y", channels=5)))
    graph.functions[0].attrs.pop("axis")  # as imported from a model with the stale function
    stale = graph.functions[0]
    ir.add_function(graph, build_rms_norm_function(17))
    assert len(graph.functions) == 1 and graph.functions[0] is not stale and "axis" in graph.functions[0].attrs
    ir.add_function(graph, build_rms_norm_function(17))
    assert len(graph.functions) == 1


def test_equivariant_to_rotations_of_the_normalised_axis_only() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 8))
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    np.testing.assert_allclose(rms_norm_reference(x @ rotation.T, axis=-1), rms_norm_reference(x, axis=-1) @ rotation.T,
                               atol=1e-12)
    tokens, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    mixed = np.einsum("st,ntc->nsc", tokens, x)
    assert np.abs(rms_norm_reference(mixed, axis=-1) - np.einsum("st,ntc->nsc", tokens,
                                                                 rms_norm_reference(x, axis=-1))).max() > 1e-3

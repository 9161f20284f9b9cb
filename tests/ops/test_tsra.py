"""graphopt.TSRA and graphopt.RMSNorm: function bodies against the numpy references, equivariance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.ops.functions import DOMAIN, constant_attr
from graphopt.ops.library import declared_attributes, ensure_functions
from graphopt.ops.rms_norm import make_rms_norm_node, rms_norm_reference
from graphopt.ops.tsra import DEFAULTS, make_tsra_node, tsra_reference
from tests.conftest import run_ort


def _model(nodes: list[onnx.NodeProto], shape: list[int | str], opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ensure_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("shape", [[5, 7], [2, 7, 3, 4]])
def test_tsra_function_matches_reference(opset: int, shape: list[int]) -> None:
    params = {"alpha_u": 3.0, "alpha_v": 6.0, "beta_u": 0.4, "beta_v": 0.8, "eps": 1e-5}
    model = _model([make_tsra_node("x", "y", 3, **params)], shape, opset)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = run_ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got, tsra_reference(x, 3, **params), rtol=1e-5, atol=1e-6)
    defaults = run_ort(_model([make_tsra_node("x", "y", 3)], shape, opset), {"x": x})["y"]
    np.testing.assert_allclose(defaults, tsra_reference(x, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 17])
def test_rms_norm_function_keeps_its_divisor(opset: int) -> None:
    x = np.random.default_rng(1).standard_normal((2, 6, 3, 3)).astype(np.float32)
    model = _model([make_rms_norm_node("x", "y", channels=10, eps=1e-3)], [2, 6, 3, 3], opset)
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], rms_norm_reference(x, 10, 1e-3), rtol=1e-5, atol=1e-6)


def test_tsra_is_equivariant_to_block_rotations_only() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 6))
    q_u, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    q_v, _ = np.linalg.qr(rng.standard_normal((2, 2)))
    block = np.zeros((6, 6))
    block[:4, :4], block[4:, 4:] = q_u, q_v
    np.testing.assert_allclose(tsra_reference(x @ block.T, 4), tsra_reference(x, 4) @ block.T, atol=1e-12)
    full, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert np.abs(tsra_reference(x @ full.T, 4) - tsra_reference(x, 4) @ full.T).max() > 1e-3
    np.testing.assert_allclose(rms_norm_reference(x @ full.T), rms_norm_reference(x) @ full.T, atol=1e-12)


TOKEN_SHAPE = [2, 5, 6, 7]


def _stale_tsra_function(opset: int) -> onnx.FunctionProto:
    """The function as graphopt wrote it before `axis` existed (Slices and ReduceSums on axis 1)."""
    ints = onnx.AttributeProto.INT
    nodes = [helper.make_node("Constant", [], ["axes"], value_ints=[1]),
             helper.make_node("Constant", [], ["start"], value_ints=[0]),
             helper.make_node("Constant", [], ["end"], value_ints=[np.iinfo(np.int64).max]),
             constant_attr("split_scalar", "split", ints),
             helper.make_node("Unsqueeze", ["split_scalar", "start"], ["split_at"]),
             helper.make_node("Slice", ["X", "start", "split_at", "axes"], ["u"]),
             helper.make_node("Slice", ["X", "split_at", "end", "axes"], ["v"]),
             helper.make_node("Mul", ["u", "u"], ["u2"]), helper.make_node("Mul", ["v", "v"], ["v2"]),
             helper.make_node("ReduceSum", ["u2", "axes"], ["su2"], keepdims=1),
             helper.make_node("ReduceSum", ["v2", "axes"], ["sv2"], keepdims=1),
             helper.make_node("Sqrt", ["su2"], ["su"]), helper.make_node("Add", ["su2", "sv2"], ["s2"]),
             helper.make_node("Sqrt", ["s2"], ["s"])]
    for key in ("alpha_u", "alpha_v", "beta_u", "beta_v", "eps"):
        nodes += [constant_attr(f"{key}_c", key, onnx.AttributeProto.FLOAT)]
    nodes += [helper.make_node("Add", ["s", "eps_c"], ["denominator"]),
              helper.make_node("Div", ["su", "denominator"], ["r"])]
    for part in ("u", "v"):
        nodes += [helper.make_node("Sub", ["r", f"beta_{part}_c"], [f"shifted_{part}"]),
                  helper.make_node("Mul", [f"alpha_{part}_c", f"shifted_{part}"], [f"logit_{part}"]),
                  helper.make_node("Sigmoid", [f"logit_{part}"], [f"gate_{part}"]),
                  helper.make_node("Mul", [f"gate_{part}", part], [f"y_{part}"])]
    nodes.append(helper.make_node("Concat", ["y_u", "y_v"], ["Y"], axis=1))
    return helper.make_function(DOMAIN, "TSRA", ["X"], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=["split", "alpha_u", "alpha_v", "beta_u", "beta_v", "eps"])


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("axis", [1, -1, 3, 2, -3])
def test_tsra_splits_its_axis_and_keeps_shapes_inferable(opset: int, axis: int) -> None:
    params = {"alpha_u": 3.0, "alpha_v": 6.0, "beta_u": 0.4, "beta_v": 0.8, "eps": 1e-5}
    node = make_tsra_node("x", "y", 2, axis=axis, **params)
    model = _model([node, helper.make_node("Identity", ["y"], ["z"])], TOKEN_SHAPE, opset)
    model.graph.output[0].name = "z"
    x = np.random.default_rng(4).standard_normal(TOKEN_SHAPE).astype(np.float32)
    want = tsra_reference(x, 2, axis=axis, **params)
    np.testing.assert_allclose(run_ort(model, {"x": x})["z"], want, rtol=1e-5, atol=1e-6)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the TSRA's output is now inferred
    assert [d.dim_value for d in inferred.graph.value_info[0].type.tensor_type.shape.dim] == TOKEN_SHAPE


def test_a_tsra_without_axis_splits_axis_1_and_a_stale_function_is_upgraded() -> None:
    node = make_tsra_node("x", "y", 2)
    assert "axis" not in {a.name for a in node.attribute}
    x = np.random.default_rng(5).standard_normal(TOKEN_SHAPE).astype(np.float32)
    model = _model([node], TOKEN_SHAPE, 17)
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], tsra_reference(x, 2), rtol=1e-5, atol=1e-6)
    model.functions[0].CopyFrom(_stale_tsra_function(17))  # a model written before `axis` existed
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], tsra_reference(x, 2), rtol=1e-5, atol=1e-6)
    model.graph.node[0].CopyFrom(make_tsra_node("x", "y", 3, axis=-1))
    ensure_functions(model)  # the stale copy would ignore axis=-1
    assert [declared_attributes(f) for f in model.functions] == [{"split", *DEFAULTS, "axis"}]
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], tsra_reference(x, 3, axis=-1), rtol=1e-5, atol=1e-6)


def test_last_axis_tsra_is_equivariant_to_block_rotations_of_that_axis_only() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 6, 5))
    block = np.zeros((5, 5))
    block[:2, :2], _ = np.linalg.qr(rng.standard_normal((2, 2)))
    block[2:, 2:], _ = np.linalg.qr(rng.standard_normal((3, 3)))
    np.testing.assert_allclose(tsra_reference(x @ block.T, 2, axis=-1), tsra_reference(x, 2, axis=-1) @ block.T,
                               atol=1e-12)
    tokens, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    mixed = np.einsum("st,ntc->nsc", tokens, x)
    assert np.abs(tsra_reference(mixed, 2, axis=-1)
                  - np.einsum("st,ntc->nsc", tokens, tsra_reference(x, 2, axis=-1))).max() > 1e-3

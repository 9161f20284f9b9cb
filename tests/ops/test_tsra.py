"""graphopt.TSRA and graphopt.RMSNorm: function bodies against the numpy references, equivariance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.ops.functions import ensure_functions
from graphopt.ops.rms_norm import make_rms_norm_node, rms_norm_reference
from graphopt.ops.tsra import make_tsra_node, tsra_reference
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

"""SNP's fits and bias-free MatMul consumers: a constant term there would cost an Add node of its own, so the
consumer is fitted without one (least squares on second moments) and stays a bare MatMul; consumers with a
bias input or a bias Add keep the centred fit and its constant."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from tests.conftest import run_ort


def _mlp(with_bias: bool, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,16] -> MatMul -> Relu -> MatMul (+ Add of a bias) -> y[N,8]; the hidden units have large means."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((16, 48)) * 0.5, rng.standard_normal((48, 8)) * 0.3
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["z" if with_bias else "y"], name="fc2")]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")]
    if with_bias:
        nodes.append(helper.make_node("Add", ["z", "b2"], ["y"], name="fc2_bias"))
        inits.append(numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = (rng.standard_normal((512, 16)) + 0.8).astype(np.float32)
    return model, {"x": x}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("target", ["self", "original"])
def test_a_bias_free_matmul_is_fitted_without_a_constant_and_gets_no_add(target: str) -> None:
    model, data = _mlp(with_bias=False)
    result = graphopt.optimize(model, method="snp", target_macs=0.6, calib=data, round_to=1,
                               reconstruct_target=target)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Relu", "MatMul"]
    pruned = _weights(result.model)
    original = _weights(model)
    kept = [int(np.argmin(np.abs(original["w1"] - column[:, None]).sum(axis=0))) for column in pruned["w1"].T]
    np.testing.assert_array_equal(original["w1"][:, kept], pruned["w1"])  # whole hidden units were kept
    # the original output's least-squares fit from the kept units, with no constant term (the refit to the
    # original reads the kept units as the original computes them, so it is the same fit)
    hidden = np.maximum(data["x"].astype(np.float64) @ original["w1"], 0.0)
    fitted = np.linalg.lstsq(hidden[:, kept], hidden @ original["w2"], rcond=None)[0]
    np.testing.assert_allclose(pruned["w2"], fitted, rtol=1e-3, atol=1e-4)
    error = np.linalg.norm(run_ort(result.model, data)["y"] - run_ort(model, data)["y"])
    assert error < 0.2 * np.linalg.norm(run_ort(model, data)["y"])


def test_a_matmul_with_a_bias_add_keeps_the_centred_fit_and_its_constant() -> None:
    model, data = _mlp(with_bias=True)
    result = graphopt.optimize(model, method="snp", target_macs=0.6, calib=data, round_to=1,
                               reconstruct_target="self")
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Relu", "MatMul", "Add"]
    pruned, original = _weights(result.model), _weights(model)
    kept = [int(np.argmin(np.abs(original["w1"] - column[:, None]).sum(axis=0))) for column in pruned["w1"].T]
    hidden = np.maximum(data["x"].astype(np.float64) @ original["w1"], 0.0)
    design = np.hstack([hidden[:, kept], np.ones((hidden.shape[0], 1))])
    solution = np.linalg.lstsq(design, hidden @ original["w2"] + original["b2"], rcond=None)[0]
    np.testing.assert_allclose(pruned["w2"], solution[:-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(pruned["b2"], solution[-1], rtol=1e-3, atol=1e-4)
    assert not np.allclose(pruned["b2"], original["b2"], atol=1e-3)  # the constant term went into the bias

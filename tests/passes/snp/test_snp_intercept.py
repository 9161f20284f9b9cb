"""SNP's fits and bias-free MatMul consumers: a constant term there costs an Add node of its own, so such a
consumer is fitted without one (least squares on second moments) where that leaves at most 1% more error,
and stays a bare MatMul; where the constant term matters (a constant unit, an affine relation) it keeps it and
the Add. Consumers with a bias input or a bias Add always keep the centred fit and its constant."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.snp.maths import bare_fit, consumer_reconstruction, intercept_pays
from tests.conftest import run_ort


def _net(*, relu: bool, hidden_bias: np.ndarray | None = None, output_bias: bool = False, offset: float = 0.0,
         seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,64] -> MatMul (+ Add hidden_bias) (-> Relu) -> MatMul (+ Add of a bias) -> y[N,8], 48 hidden units."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((64, 48)) * 0.25, rng.standard_normal((48, 8)) * 0.3
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")]
    last = "h"
    if hidden_bias is not None:
        nodes.append(helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"))
        inits.append(numpy_helper.from_array(hidden_bias.astype(np.float32), "b1"))
        last = "hb"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["a"]))
        last = "a"
    nodes.append(helper.make_node("MatMul", [last, "w2"], ["z" if output_bias else "y"], name="fc2"))
    if output_bias:
        nodes.append(helper.make_node("Add", ["z", "b2"], ["y"], name="fc2_bias"))
        inits.append(numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"))
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": (rng.standard_normal((512, 64)) + offset).astype(np.float32)}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _kept_units(original: np.ndarray, pruned: np.ndarray) -> list[int]:
    return [int(np.argmin(np.abs(original - column[:, None]).sum(axis=0))) for column in pruned.T]


def _keeps_constant(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray, pruned: np.ndarray,
                    weight: np.ndarray) -> bool:
    """Whether a bias-free consumer's reconstruction keeps its constant term."""
    return bool(np.any(consumer_reconstruction(cov, mean, kept, pruned, weight)[1]))


def test_intercept_pays_only_where_dropping_it_adds_error() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((200, 5))
    rows[:, 4] = 2.0 * rows[:, 0] - rows[:, 1] + 7.0  # affine in the kept features: exact only with a constant
    cov, mean = np.cov(rows, rowvar=False, bias=True), rows.mean(axis=0)
    kept, pruned, weight = np.arange(4), np.array([4]), np.array([[1.5], [-0.5]])
    assert _keeps_constant(cov, mean, kept, pruned, weight)
    # the error the constant saves, ‖W (μ_x − M μ_y)‖² / E[u²], is the difference of the two fits' errors
    second = cov + np.outer(mean, mean)
    coupling, spare = bare_fit(second[np.ix_(pruned, kept)], second[np.ix_(kept, kept)], mean[kept])
    bare_residual = rows[:, pruned] - rows[:, kept] @ coupling.T
    design = np.hstack([rows[:, kept], np.ones((200, 1))])
    centred_residual = rows[:, pruned] - design @ np.linalg.lstsq(design, rows[:, pruned], rcond=None)[0]
    shortfall = weight @ (mean[pruned] - coupling @ mean[kept])
    saved = float(shortfall @ shortfall) / spare
    exact = (np.sum((bare_residual @ weight.T) ** 2) - np.sum((centred_residual @ weight.T) ** 2)) / 200
    assert saved == pytest.approx(exact, rel=1e-6)
    rows[:, 4] = 2.0 * rows[:, 0] - rows[:, 1]  # linear: the fit needs no constant
    cov, mean = np.cov(rows, rowvar=False, bias=True), rows.mean(axis=0)
    assert not _keeps_constant(cov, mean, kept, pruned, weight)
    rows[:, 4] += 0.3 * rng.standard_normal(200) + 0.01  # a small offset in a noisy unit: not worth an Add
    cov, mean = np.cov(rows, rowvar=False, bias=True), rows.mean(axis=0)
    assert not _keeps_constant(cov, mean, kept, pruned, weight)
    assert not intercept_pays(1.0, 1.005, 10.0) and intercept_pays(1.0, 1.02, 10.0) and intercept_pays(0.0, 1e-6, 1.0)
    assert not intercept_pays(1e-8, 5e-8, 10.0)  # both exact up to the ridge


@pytest.mark.parametrize("target", ["self", "original"])
def test_a_bias_free_matmul_whose_inputs_centre_near_zero_gets_no_add(target: str) -> None:
    model, data = _net(relu=False)  # linear hidden units of a zero-mean input: the constant term is worth little
    result = graphopt.optimize(model, method="snp", target_macs=0.6, calib=data, round_to=1,
                               reconstruct_target=target)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul"]
    pruned, original = _weights(result.model), _weights(model)
    kept = _kept_units(original["w1"], pruned["w1"])
    np.testing.assert_array_equal(original["w1"][:, kept], pruned["w1"])
    # the original output's least-squares fit from the kept units with no constant term (the refit to the
    # original reads the kept units as the original computes them: the same fit)
    hidden = data["x"].astype(np.float64) @ original["w1"]
    fitted = np.linalg.lstsq(hidden[:, kept], hidden @ original["w2"], rcond=None)[0]
    np.testing.assert_allclose(pruned["w2"], fitted, rtol=1e-3, atol=1e-4)


def test_a_constant_unit_before_a_bias_free_matmul_is_removed_exactly_with_an_add() -> None:
    bias = np.zeros(48)
    model, data = _net(relu=True, hidden_bias=bias, offset=0.5)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[:, 5] = 0.0  # unit 5 is the constant ReLU(3) = 3: exactly affine in the others, not linear
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.where(np.arange(48) == 5, 3.0, 0.0)
                                                                .astype(np.float32), "b1"))
    result = graphopt.optimize(model, method="snp", calib=data, keep_variance=1.0, round_to=1,
                               reconstruct_target="self")
    assert result.report["passes"][-1]["history"][0]["removed"] == [5]
    assert [n.op_type for n in result.model.graph.node].count("Add") == 2  # the hidden bias and the new one
    np.testing.assert_allclose(run_ort(result.model, data)["y"], run_ort(model, data)["y"], rtol=1e-4, atol=1e-4)


def test_a_matmul_with_a_bias_add_keeps_the_centred_fit_and_its_constant() -> None:
    model, data = _net(relu=True, output_bias=True, offset=0.8)
    result = graphopt.optimize(model, method="snp", target_macs=0.6, calib=data, round_to=1,
                               reconstruct_target="self")
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Relu", "MatMul", "Add"]
    pruned, original = _weights(result.model), _weights(model)
    kept = _kept_units(original["w1"], pruned["w1"])
    hidden = np.maximum(data["x"].astype(np.float64) @ original["w1"], 0.0)
    design = np.hstack([hidden[:, kept], np.ones((hidden.shape[0], 1))])
    solution = np.linalg.lstsq(design, hidden @ original["w2"] + original["b2"], rcond=None)[0]
    np.testing.assert_allclose(pruned["w2"], solution[:-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(pruned["b2"], solution[-1], rtol=1e-3, atol=1e-4)
    assert not np.allclose(pruned["b2"], original["b2"], atol=1e-3)  # the constant term went into the bias

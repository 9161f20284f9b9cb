"""--exprune-timed: each linear layer timed alone against its dense form; the one-layer models it times compute
what the layer computes; the decision follows the measured times (never asserted: only its consistency)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.calibration.data import load_data
from graphopt.ops.exprune import exprune_reference
from graphopt.passes.exprune.calib import layer_arrays
from graphopt.passes.exprune.layers import discover, scorings
from graphopt.passes.exprune.timing import layer_models, typical_row
from graphopt.ir import graph as ir
from graphopt.passes import PassContext
from tests.conftest import op_types, run_ort, run_pass


def _mlp(d: int = 48, hidden: int = 96, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.standard_normal((hidden, d)) / np.sqrt(d), "b1": rng.standard_normal(hidden) * 0.1 - 0.3,
              "w2": rng.standard_normal((10, hidden)) / np.sqrt(hidden), "b2": np.zeros(10)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu1"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(rows: int = 400, d: int = 48, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)}


def test_the_timed_models_compute_the_layer_and_its_op() -> None:
    model, data = _mlp(), _data()
    graph = ir.import_graph(model)
    layers, _ = discover(graph, "linear")
    ctx = PassContext(template=model, data=load_data(data, model), options={"exprune_rows": 4096})
    options = {"probes": (0.25,), "rule": "threshold"}
    scoring = scorings(ctx, model, layers, {**options, "kinds": "linear"}, load_data(data, model))[0][0]
    found = scoring.calibrate(0.05)
    dense, exprune = layer_models(layers[0], found, "threshold", 17)
    x = data["x"][:32]
    want = np.maximum(x.astype(np.float64) @ layers[0].weight.T + layers[0].bias, 0)
    np.testing.assert_allclose(run_ort(dense, {"x": x})["y"], want, rtol=1e-5, atol=1e-5)
    arrays = layer_arrays(layers[0], found)
    reference, skipped = exprune_reference(x, arrays["W"], arrays["B"], arrays["Tau"], arrays["Perm"], found.m)
    np.testing.assert_allclose(run_ort(exprune, {"x": x})["y"], reference, rtol=1e-5, atol=1e-5)
    row = typical_row(layers[0], found, x)
    counts = skipped.sum(axis=1)
    assert row.shape == (1, x.shape[1]) and np.median(counts) - 1 <= counts[(x == row).all(axis=1)][0] <= np.median(counts) + 1


def test_every_timed_layer_is_replaced_exactly_when_its_op_was_faster() -> None:
    model, data = _mlp(), _data()
    rewritten, result = run_pass(model, "exprune", data=load_data(data, model),
                                 options={"exprune_fnr": 0.05, "exprune_probe": 0.25, "exprune_timed": True})
    stats = result.stats
    assert {"fc1.dense_ms", "fc1.op_ms", "fc1.speedup", "fc1.speedup_p10", "fc1.speedup_p90"} <= set(stats)
    assert stats["fc1.dense_ms"] > 0 and stats["fc1.op_ms"] > 0
    assert stats["fc1.speedup_p10"] <= stats["fc1.speedup"] <= stats["fc1.speedup_p90"]
    replaced = "ExPruneLinearRelu" in op_types(rewritten)
    assert replaced == (stats["fc1.speedup"] > 1.0)
    assert replaced == (not any(reason.startswith("fc1: left dense") for reason in result.skipped))
    assert stats["layers_left_dense"] == (0 if replaced else 1)
    np.testing.assert_allclose(run_ort(rewritten, data)["y"], run_ort(model, data)["y"], atol=0.5)

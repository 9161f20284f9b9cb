"""--exprune-timed: each linear layer timed alone against its dense form; the one-layer models it times compute
what the layer computes; the decisions (replace or not, the row count from which it runs dense) follow the
measured times (never asserted: only their consistency)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.calibration.data import load_data
from graphopt.ops.exprune import exprune_reference
from graphopt.passes.exprune.calib import layer_arrays
from graphopt.passes.exprune.layers import discover, scorings
from graphopt.passes.exprune.dispatch import dense_rows_of
from graphopt.passes.exprune.timing import MIN_SPEEDUP, ROW_GRID, layer_models, typical_row
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
    assert 0 < stats["fc1.op_ms_predicted"] < stats["fc1.dense_ms"]
    assert stats["fc1.speedup_p10"] <= stats["fc1.speedup"] <= stats["fc1.speedup_p90"]
    replaced = "If" in op_types(rewritten)
    # faster alone, then (timed) faster in the model too: the whole model's check can send it back to dense
    in_model = stats.get("model_speedup")
    assert (in_model is None) == (stats["fc1.speedup"] < MIN_SPEEDUP)
    assert replaced == (stats["fc1.speedup"] >= MIN_SPEEDUP and in_model >= MIN_SPEEDUP)
    assert replaced == (not any(reason.startswith("fc1: left dense") for reason in result.skipped))
    assert stats["layers_left_dense"] == (0 if replaced else 1)
    np.testing.assert_allclose(run_ort(rewritten, data)["y"], run_ort(model, data)["y"], atol=0.5)
    assert replaced == ("fc1.dense_rows" in stats)
    if replaced:  # the layer runs dense from the first row count at which the bare op was not faster
        assert stats["fc1.op_ms_predicted"] == pytest.approx(stats["fc1.dense_ms"] * (1 - stats["fc1.macs_skipped"]))
        timed = [r for r in ROW_GRID if f"fc1.rows_{r}_speedup" in stats]
        assert timed == list(ROW_GRID[:len(timed)]) and timed
        assert all(stats[f"fc1.rows_{r}_speedup"] > 1.0 for r in timed[:-1])
        last = stats[f"fc1.rows_{timed[-1]}_speedup"]
        assert stats["fc1.dense_rows"] == (timed[-1] if last <= 1.0 else 2 * ROW_GRID[-1])
        assert dense_rows_of(rewritten) == stats["fc1.dense_rows"]


def test_without_the_row_dispatch_the_bare_op_is_timed() -> None:
    model, data = _mlp(), _data()
    rewritten, result = run_pass(model, "exprune", data=load_data(data, model),
                                 options={"exprune_fnr": 0.05, "exprune_probe": 0.25, "exprune_timed": True,
                                          "exprune_dense_rows": 0})
    assert "fc1.speedup" in result.stats and "fc1.dense_rows" not in result.stats
    assert "If" not in op_types(rewritten) and dense_rows_of(rewritten) is None


def test_each_layer_runs_dense_from_the_first_row_count_where_its_op_lost(monkeypatch) -> None:
    """A scripted timer (dense time / op time by the rows timed): the op wins at 1, 2 and 4 rows and loses at 8,
    so the layer's If switches to the dense layer from 8 rows, and the fidelity check runs at 7."""
    import graphopt
    from graphopt.passes.exprune import timing

    wins = {1: 1.5, 2: 1.2, 4: 1.1, 8: 0.9, 16: 0.8, 32: 0.7}
    seen = []

    def scripted(dense: onnx.ModelProto, op: onnx.ModelProto, x: np.ndarray, threads: int) -> dict[str, float]:
        seen.append((x.shape[0], "If" in op_types(op)))
        ratio = wins[x.shape[0]]
        return {"reference_ms": ratio, "candidate_ms": 1.0, "speedup": ratio, "speedup_p10": ratio,
                "speedup_p90": ratio}

    monkeypatch.setattr(timing, "_pair", scripted)
    monkeypatch.setattr(timing, "time_models", lambda reference, candidate, feed, threads: {  # the whole model wins
        "reference_ms": 1.3, "candidate_ms": 1.0, "speedup": 1.3, "speedup_p10": 1.3, "speedup_p90": 1.3})
    model, data = _mlp(), _data()
    result = graphopt.optimize(model, method="exprune", calib=data, exprune_fnr=0.05, exprune_probe=0.25,
                               exprune_timed=True)
    stats = result.report["passes"][-1]["stats"]
    assert seen == [(1, True), (2, False), (4, False), (8, False)]  # batch 1 as written, then the bare op
    assert stats["fc1.dense_rows"] == 8 and stats["fc1.rows_4_speedup"] == 1.1 and "fc1.rows_16_speedup" not in stats
    assert stats["fc1.op_ms_predicted"] == pytest.approx(1.5 * (1 - stats["fc1.macs_skipped"]))
    assert dense_rows_of(result.model) == 8 and result.report["fidelity"]["batch_size"] == 7
    assert stats["dense_rows"] == 8 and result.report["exprune_macs_skipped"]["dense_from_rows"] == 8
    x = data["x"][:8]
    dense, written = run_ort(model, {"x": x})["y"], run_ort(result.model, {"x": x})["y"]
    np.testing.assert_allclose(written, dense, rtol=1e-5, atol=1e-5)  # 8 rows: the dense layer

"""ExPrune layers that run dense over several rows (graphopt.passes.exprune.dispatch): by default a replaced
linear layer is the op for single-row calls and the dense layer from 2 rows on; layers that every call sends
several rows through stay dense; the model stores the weight once and counts its MACs in full; the
fidelity check measures the op's path."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import api
from graphopt.calibration.data import load_data
from graphopt.calibration.session import make_session
from graphopt.calibration.shapes import count_cost
from graphopt.ops.native import library_path, uses_graphopt_ops
from graphopt.passes.exprune.dispatch import dense_rows_of
from tests.conftest import run_pass
from tests.passes.exprune.test_exprune import _data, _gemm_relu


def _float_count(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    return make_session(model, optimize=optimize).run(None, {"x": x})[0]


@pytest.mark.parametrize("optimize", [False, True])  # function body unoptimised; full optimisation (the kernel)
def test_single_rows_run_the_op_and_batches_the_dense_layer(optimize: bool) -> None:
    model = _gemm_relu(d=48, n=40)
    data = _data(model, rows=600, d=48)
    options = {"exprune_fnr": 0.05, "exprune_probe": 0.25, "exprune_layers": "all"}
    wrapped, result = run_pass(model, "exprune", data=load_data(data, model), options=options)
    bare, _ = run_pass(model, "exprune", data=load_data(data, model), options={**options, "exprune_dense_rows": 0})
    onnx.checker.check_model(wrapped, full_check=True)
    assert result.stats["dense_rows"] == 2 and dense_rows_of(wrapped) == 2 and dense_rows_of(bare) is None
    assert [n.op_type for n in wrapped.graph.node].count("If") == 1 and uses_graphopt_ops(wrapped)
    # the weight is stored once: the dense copy replaces the op's permuted one
    assert _float_count(wrapped) == _float_count(bare)
    assert count_cost(wrapped, {"x": (1, 48)}).macs == count_cost(model, {"x": (1, 48)}).macs == 48 * 40
    x = data["x"][:64]
    dense = _run(model, x, optimize)
    single = np.concatenate([_run(wrapped, x[i:i + 1], optimize) for i in range(len(x))])
    per_row_op = np.concatenate([_run(bare, x[i:i + 1], optimize) for i in range(len(x))])
    np.testing.assert_allclose(single, per_row_op, rtol=1e-5, atol=1e-6)  # one row: the op's decisions
    skipped = (dense > 1e-6) & (single == 0)
    assert 0 < skipped.sum() < 0.15 * (dense > 0).sum()  # it does skip positive units (5% per neuron on calibration)
    np.testing.assert_allclose(_run(wrapped, x, optimize), dense, rtol=1e-5, atol=1e-5)  # 64 rows: dense
    np.testing.assert_allclose(_run(wrapped, x[:2], optimize), dense[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(library_path() is None, reason="the native kernel is not built (graphopt ops build)")
def test_the_op_inside_the_branch_runs_the_native_kernel() -> None:
    import ctypes

    model = _gemm_relu(d=48, n=40)
    data = _data(model, rows=600, d=48)
    wrapped, _ = run_pass(model, "exprune", data=load_data(data, model),
                          options={"exprune_fnr": 0.05, "exprune_layers": "all"})
    calls = ctypes.CDLL(str(library_path())).graphopt_exprune_calls
    calls.restype = ctypes.c_int64
    session = make_session(wrapped, optimize=True)
    before = calls()
    session.run(None, {"x": data["x"][:1]})
    assert calls() == before + 1
    session.run(None, {"x": data["x"][:8]})
    assert calls() == before + 1  # several rows: the dense branch


def test_layers_with_several_rows_per_sample_stay_dense_by_default() -> None:
    rng = np.random.default_rng(3)
    d, n = 32, 24
    weight = (rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, n])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = load_data({"x": _data(model, rows=400, d=d)["x"].reshape(80, 5, d)}, model)
    _, kept = run_pass(model, "exprune", data=data, options={"exprune_fnr": 0.0, "exprune_layers": "all"})
    assert not kept.modified
    assert kept.skipped == ["mm: left dense, each call sends at least 5 rows through it and calls of 2 rows or "
                            "more run dense (--exprune-dense-rows; 0 replaces it anyway)"]
    _, more = run_pass(model, "exprune", data=data, options={"exprune_fnr": 0.0, "exprune_dense_rows": 6,
                                                              "exprune_layers": "all"})
    assert more.modified and more.stats["dense_rows"] == 6


def test_the_fidelity_check_measures_the_op_not_the_dense_branch() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "samples"
    model = onnx.load(str(root / "digits_cnn.onnx"))
    calib = dict(np.load(root / "digits_calib.npz"))
    results = [graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.1, exprune_dense_rows=rows,
                                  exprune_layers="all")
               for rows in (2, 0)]
    (wrapped, bare) = (r.report for r in results)
    assert wrapped["fidelity"]["batch_size"] == 1 and bare["fidelity"]["batch_size"] == 32
    assert wrapped["fidelity"]["rel_l2"] > 1e-3  # skipped units show: the op's path was measured
    assert wrapped["fidelity"]["rel_l2"] == pytest.approx(bare["fidelity"]["rel_l2"], rel=1e-4)
    assert wrapped["exprune_macs_skipped"]["dense_from_rows"] == 2
    assert bare["exprune_macs_skipped"]["dense_from_rows"] is None
    assert wrapped["macs_after"] == bare["macs_after"] == wrapped["macs_before"]


def test_a_negative_row_count_is_refused() -> None:
    model = _gemm_relu()
    with pytest.raises(graphopt.errors.OptionError, match="--exprune-dense-rows"):
        graphopt.optimize(model, method="exprune", calib=_data(model), exprune_dense_rows=-1)


def test_optimizing_a_dispatched_model_again_keeps_one_copy_of_its_weights() -> None:
    """The normalising pre-passes leave the main-graph values the branches read where they are: folding them
    would write a copy into each branch (and the op's permuted weight beside the dense one)."""
    model = _gemm_relu(d=48, n=40)
    data = _data(model, rows=600, d=48)
    once = graphopt.optimize(model, method="exprune", calib=data, exprune_fnr=0.05, exprune_layers="all").model
    again = graphopt.optimize(once, method="none").model
    branches = [attr.g for node in again.graph.node for attr in node.attribute if attr.HasField("g")]
    assert len(branches) == 2 and all(len(branch.initializer) == 0 for branch in branches)
    assert _float_count(again) == _float_count(once)
    x = data["x"][:1]
    np.testing.assert_allclose(_run(again, x, True), _run(once, x, True), rtol=1e-6, atol=1e-6)


def test_verify_measures_the_op_unless_told_a_batch_size(caplog) -> None:
    model = _gemm_relu(d=48, n=40)
    data = _data(model, rows=600, d=48)
    written = graphopt.optimize(model, method="exprune", calib=data, exprune_fnr=0.05, exprune_layers="all").model
    held = {"x": data["x"][:96]}
    default = api.verify(model, written, held).to_json()
    assert default["batch_size"] == 1 and default["rel_l2"] > 1e-3  # the op's skipped units show
    with caplog.at_level("WARNING"):
        dense = api.verify(model, written, held, batch_size=32).to_json()
    assert dense["batch_size"] == 32 and dense["rel_l2"] < 1e-5  # 32 rows: the dense layer
    assert "run dense from 2 rows" in caplog.text
    assert api.verify(model, model, held).to_json()["batch_size"] == 32

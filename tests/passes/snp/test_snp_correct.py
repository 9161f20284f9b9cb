"""SNP's error-correcting reconstruction: paired statistics, the cross-Gram solve, and consumers refitted to the
original model beating the self reconstruction where pruning upstream changes a consumer's input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits

import graphopt
from graphopt.api import calibrate
from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import load_data
from graphopt.calibration.paired import PairedStats, PairRequest
from graphopt.cli import main
from graphopt.errors import GraphoptError, OptionError
from graphopt.passes.snp.maths import cross_reconstruction
from graphopt.passes.snp.padding import paired_read_moments
from tests.conftest import run_ort


def _paired(x: np.ndarray, y: np.ndarray, chunk: int = 37) -> PairedStats:
    stats = PairedStats.empty(PairRequest("x", "y"), x.shape[1], y.shape[1])
    for start in range(0, x.shape[0], chunk):  # streamed in uneven chunks
        stats.update(x[start:start + chunk], y[start:start + chunk])
    return stats


def test_cross_gram_solve_matches_numpy_least_squares() -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((500, 6)) * rng.uniform(0.5, 3.0, 6) + 40.0  # a large mean: centring must hold
    x = y @ rng.standard_normal((6, 9)) + 0.3 * rng.standard_normal((500, 9)) - 7.0
    stats = _paired(x, y)
    np.testing.assert_allclose(stats.cross_covariance(), np.cov(x.T, y.T, bias=True)[:9, 9:], atol=1e-9)
    np.testing.assert_allclose(stats.covariance(), np.cov(y, rowvar=False, bias=True), atol=1e-9)
    coupling, constant = cross_reconstruction(stats.cross_covariance(), stats.covariance(), stats.reference_mean,
                                              stats.mean)
    solution = np.linalg.lstsq(np.hstack([y, np.ones((500, 1))]), x, rcond=None)[0]
    np.testing.assert_allclose(coupling, solution[:6].T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(constant, solution[6], rtol=1e-6, atol=1e-5)


def test_cross_gram_solve_keeps_the_prior_where_the_rows_do_not_reach() -> None:
    rng = np.random.default_rng(2)
    y = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 6)) + 1.5  # rank 3 in 6 features
    x = y @ rng.standard_normal((6, 5)) + 0.1 * rng.standard_normal((40, 5))
    stats, prior = _paired(x, y), rng.standard_normal((5, 6))
    coupling, constant = cross_reconstruction(stats.cross_covariance(), stats.covariance(), stats.reference_mean,
                                              stats.mean, prior)
    unseen = np.linalg.svd(y - y.mean(axis=0))[2][3:].T  # directions of y no row excites
    np.testing.assert_allclose(coupling @ unseen, prior @ unseen, atol=1e-6)
    features = np.hstack([y, np.ones((40, 1))])
    best = x - features @ np.linalg.lstsq(features, x, rcond=None)[0]
    assert np.sum((x - y @ coupling.T - constant) ** 2) == pytest.approx(np.sum(best ** 2), rel=1e-6)


def test_padded_paired_moments_are_the_moments_of_the_reads() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((300, 4)) + 2.0, rng.standard_normal((300, 3)) - 1.0
    inside = 300 / 400  # a quarter of the reads land in the zero padding
    reads_x, reads_y = np.vstack([x, np.zeros((100, 4))]), np.vstack([y, np.zeros((100, 3))])
    cross, cov, mean_x, mean_y = paired_read_moments(_paired(x, y), inside)
    np.testing.assert_allclose(cross, np.cov(reads_x.T, reads_y.T, bias=True)[:4, 4:], atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(reads_y, rowvar=False, bias=True), atol=1e-12)
    np.testing.assert_allclose(mean_x, reads_x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(mean_y, reads_y.mean(axis=0), atol=1e-12)


def _mlp(widths: tuple[int, ...], seed: int) -> onnx.ModelProto:
    """x[N, 64] -> (Gemm -> Relu) per hidden width -> Gemm -> y[N, 10]; hidden outputs h{i}."""
    rng = np.random.default_rng(seed)
    nodes, inits, source, width = [], [], "x", 64
    for index, out in enumerate((*widths, 10)):
        weight = rng.standard_normal((out, width)) / np.sqrt(width)
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"w{index}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(out)).astype(np.float32), f"b{index}")]
        output = "y" if index == len(widths) else f"z{index}"
        nodes.append(helper.make_node("Gemm", [source, f"w{index}", f"b{index}"], [output], name=f"fc{index}",
                                      transB=1))
        if index < len(widths):
            nodes.append(helper.make_node("Relu", [output], [f"h{index}"], name=f"act{index}"))
        source, width = f"h{index}", out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["N", 64])],
                              [helper.make_tensor_value_info("y", 1, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _digits(start: int, stop: int) -> dict[str, np.ndarray]:
    return {"x": (load_digits().data[start:stop] / 16.0).astype(np.float32)}


def test_paired_calibration_matches_numpy_within_any_memory_bound() -> None:
    reference, model = _mlp((24,), seed=0), _mlp((16,), seed=1)
    data = _digits(0, 200)
    request = PairRequest("h0", "h0", 1)
    x = np.maximum(data["x"] @ numpy_helper.to_array(reference.graph.initializer[0]).T
                   + numpy_helper.to_array(reference.graph.initializer[1]), 0.0).astype(np.float64)
    y = np.maximum(data["x"] @ numpy_helper.to_array(model.graph.initializer[0]).T
                   + numpy_helper.to_array(model.graph.initializer[1]), 0.0).astype(np.float64)
    found = [Calibrator(load_data(data, reference), memory_limit=limit).paired(reference, model, [request])[request]
             for limit in ("64MB", 12_000)]  # the small bound runs the pair a few samples at a time
    for stats in found:
        assert stats.count == 200
        np.testing.assert_allclose(stats.cross_covariance(), np.cov(x.T, y.T, bias=True)[:24, 24:], atol=1e-5)
        np.testing.assert_allclose(stats.mean, y.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(found[0].covariance(), found[1].covariance(), atol=1e-10)


def _errors(model: onnx.ModelProto, pruned: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    reference = run_ort(model, data)["y"]
    return float(np.linalg.norm(run_ort(pruned, data)["y"] - reference) / np.linalg.norm(reference))


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(helper.make_tensor_value_info(name, 1, None))
    return exposed


def test_error_correction_beats_self_reconstruction_when_upstream_pruning_changes_the_input() -> None:
    model = _mlp((48, 48, 48), seed=2)
    calib, held_out = _digits(0, 600), _digits(600, 1000)
    runs = {name: graphopt.optimize(model, method="snp", target_macs=0.3, calib=calib, round_to=1,
                                    criterion="variance", **options)
            for name, options in {"original": {"reconstruct_target": "original"}, "self": {"reconstruct_target": "self"},
                                  "sequential": {"sequential": True}}.items()}
    assert runs["original"].report["passes"][-1]["stats"]["consumers_error_corrected"] == 3
    assert runs["self"].report["passes"][-1]["stats"]["consumers_error_corrected"] == 0
    assert runs["original"].report["macs_ratio"] == pytest.approx(runs["self"].report["macs_ratio"])
    errors = {name: _errors(model, run.model, calib) for name, run in runs.items()}
    assert errors["original"] < 0.97 * errors["self"] and errors["original"] < errors["sequential"]
    assert _errors(model, runs["original"].model, held_out) < 0.97 * _errors(model, runs["self"].model, held_out)
    # the bound: the last consumer's output error on the calibration data is the least-squares residual of
    # the original output on the pruned model's last hidden features (no affine readout of them does better)
    last = next(n for n in runs["original"].model.graph.node if n.name == "fc3").input[0]
    outputs = run_ort(_with_output(runs["original"].model, last), calib)
    features = np.hstack([outputs[last].astype(np.float64), np.ones((600, 1))])
    reference = run_ort(model, calib)["y"].astype(np.float64)
    best = reference - features @ np.linalg.lstsq(features, reference, rcond=None)[0]
    achieved = outputs["y"] - reference
    assert np.sum(achieved ** 2) <= np.sum(best ** 2) * (1 + 1e-3) + 1e-6


def _cnn(seed: int) -> onnx.ModelProto:
    """x[N,1,8,8] -> 3 x (3x3 Conv, pad 1 -> Relu) -> GlobalAveragePool -> Flatten -> Gemm -> y[N,10]."""
    rng = np.random.default_rng(seed)
    nodes, inits, source, width = [], [], "x", 1
    for index in range(3):
        weight = rng.standard_normal((16, width, 3, 3)) / np.sqrt(9 * width)
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"k{index}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(16)).astype(np.float32), f"c{index}")]
        nodes += [helper.make_node("Conv", [source, f"k{index}", f"c{index}"], [f"v{index}"], name=f"conv{index}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"v{index}"], [f"r{index}"], name=f"relu{index}")]
        source, width = f"r{index}", 16
    inits += [numpy_helper.from_array((rng.standard_normal((10, 16)) / 4).astype(np.float32), "w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "b")]
    nodes += [helper.make_node("GlobalAveragePool", [source], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "w", "b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", 1, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_error_correction_beats_self_reconstruction_on_a_padded_cnn() -> None:
    model = _cnn(seed=3)
    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    calib, held_out = {"x": images[:300]}, {"x": images[300:600]}
    corrected = graphopt.optimize(model, method="snp", target_macs=0.4, calib=calib, round_to=1,
                                  reconstruct_target="original")
    assert corrected.report["passes"][-1]["stats"]["consumers_error_corrected"] == 3  # conv1, conv2, fc
    for old in ({"reconstruct_target": "self"}, {"sequential": True}):
        own = graphopt.optimize(model, method="snp", target_macs=0.4, calib=calib, round_to=1, **old)
        for data in (calib, held_out):
            assert _errors(model, corrected.model, data) < 0.92 * _errors(model, own.model, data)


def test_reconstruct_target_is_validated() -> None:
    model, calib = _mlp((16,), seed=4), _digits(0, 100)
    with pytest.raises(GraphoptError, match="--reconstruct-target must be original or self"):
        graphopt.optimize(model, method="snp", target_macs=0.6, calib=calib, reconstruct_target="both")
    with pytest.raises(OptionError, match="--sequential"):
        graphopt.optimize(model, method="snp", target_macs=0.6, calib=calib, reconstruct_target="original",
                          sequential=True)
    with pytest.raises(OptionError, match="--no-reconstruct"):
        graphopt.optimize(model, method="snp", target_macs=0.6, calib=calib, reconstruct_target="original",
                          reconstruct=False)
    stats = calibrate(model, calib)
    alone = graphopt.optimize(model, method="snp", target_macs=0.6, stats=stats)  # no data: the self fit
    assert alone.report["passes"][-1]["stats"]["consumers_error_corrected"] == 0
    with pytest.raises(GraphoptError, match="give --calib"):
        graphopt.optimize(model, method="snp", target_macs=0.6, stats=stats, reconstruct_target="original")


def test_with_data_the_defaults_are_the_output_ordering_and_the_refit() -> None:
    model, calib = _mlp((48, 48, 48), seed=2), _digits(0, 600)
    default = graphopt.optimize(model, method="snp", target_macs=0.3, calib=calib, round_to=1)
    explicit = graphopt.optimize(model, method="snp", target_macs=0.3, calib=calib, round_to=1, criterion="output",
                                 reconstruct_target="original")
    assert default.report["passes"][-1]["stats"]["consumers_error_corrected"] == 3
    assert {entry["ordering"] for entry in default.report["passes"][-1]["history"]} == {"output"}
    weights = {t.name: numpy_helper.to_array(t) for t in explicit.model.graph.initializer}
    for tensor in default.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])
    for one_shot in ({"sequential": True}, {"reconstruct": False}):  # these cut group by group or refit nothing
        found = graphopt.optimize(model, method="snp", target_macs=0.3, calib=calib, round_to=1, **one_shot)
        assert found.report["passes"][-1]["stats"]["consumers_error_corrected"] == 0


def test_cli_flag_is_declared_with_its_choices(tmp_path) -> None:
    path, data = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(_mlp((16,), seed=5), path)
    np.savez(data, **_digits(0, 100))
    assert main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--method", "snp", "--calib", str(data),
                 "--target-macs", "0.6", "--reconstruct-target", "self", "--quiet"]) == 0
    with pytest.raises(SystemExit) as refused:
        main(["optimize", str(path), "-o", str(tmp_path / "bad.onnx"), "--method", "snp", "--calib", str(data),
              "--target-macs", "0.6", "--reconstruct-target", "both", "--quiet"])
    assert refused.value.code == 2


def test_matmul_consumers_fold_the_correction_into_their_bias_add() -> None:
    """Linear layers exported as MatMul + Add(bias): the refit's constant goes into that Add, no node is added."""
    rng = np.random.default_rng(6)
    nodes, inits, source, width = [], [], "x", 64
    for index, out in enumerate((32, 32, 10)):
        inits += [numpy_helper.from_array((rng.standard_normal((width, out)) / 8).astype(np.float32), f"w{index}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(out)).astype(np.float32), f"b{index}")]
        nodes += [helper.make_node("MatMul", [source, f"w{index}"], [f"m{index}"], name=f"matmul{index}"),
                  helper.make_node("Add", [f"m{index}", f"b{index}"], ["y" if index == 2 else f"z{index}"],
                                   name=f"bias{index}")]
        if index < 2:
            nodes.append(helper.make_node("Relu", [f"z{index}"], [f"h{index}"], name=f"act{index}"))
        source, width = f"h{index}", out
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", 1, ["N", 64])],
                              [helper.make_tensor_value_info("y", 1, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = _digits(0, 400)
    corrected = graphopt.optimize(model, method="snp", target_macs=0.5, calib=calib, round_to=1,
                                  reconstruct_target="original")
    own = graphopt.optimize(model, method="snp", target_macs=0.5, calib=calib, round_to=1, reconstruct_target="self")
    assert corrected.report["passes"][-1]["stats"]["consumers_error_corrected"] == 2
    assert [n.op_type for n in corrected.model.graph.node] == [n.op_type for n in model.graph.node]
    assert _errors(model, corrected.model, calib) < _errors(model, own.model, calib)


def test_self_is_the_default_and_too_few_rows_per_feature_keep_the_self_fit() -> None:
    """A Gemm read by 100 rows for 48 features (fewer than MIN_ROWS_PER_FEATURE per feature) is not refitted."""
    from graphopt.passes.snp.correct import MIN_ROWS_PER_FEATURE

    model, calib = _mlp((48, 48, 48), seed=2), _digits(0, 100)
    assert 100 < MIN_ROWS_PER_FEATURE * 48
    default = graphopt.optimize(model, method="snp", target_macs=0.3, calib=calib, round_to=1)
    assert default.report["passes"][-1]["stats"]["consumers_error_corrected"] == 0
    assert default.report["options"]["reconstruct_target"] is None
    few = graphopt.optimize(model, method="snp", target_macs=0.3, calib=calib, round_to=1, reconstruct_target="original")
    assert few.report["passes"][-1]["stats"]["consumers_error_corrected"] == 0
    np.testing.assert_array_equal(run_ort(few.model, calib)["y"], run_ort(default.model, calib)["y"])

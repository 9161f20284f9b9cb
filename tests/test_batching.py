"""A model that declares a dynamic batch but runs on one sample only: optimize and calibrate run it one sample
at a time and say why; a model that fails on one sample too is the user's error (exit 2), nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import cli
from graphopt.api import calibrate
from graphopt.errors import DataError
from tests.conftest import init, run_ort, tiny, weights


def one_sample_model(baked: int = 1) -> onnx.ModelProto:
    """x [N, 6] -> MatMul -> Relu -> Reshape to [baked, 16] (the batch the exporter traced) -> MatMul -> y."""
    return tiny("""h = MatMul (x, w1)
                   r = Relu (h)
                   f = Reshape (r, target)
                   y = MatMul (f, w2)""",
                inputs="float[N, 6] x", outputs="float[N, 3] y",
                inits=", ".join([init("w1", weights(6, 16)), init("w2", weights(16, 3, seed=1)),
                                 f"int64[2] target = {{{baked}, 16}}"]))


def test_a_model_that_runs_one_sample_at_a_time_is_optimized_one_sample_at_a_time(tmp_path: Path, caplog) -> None:
    model = one_sample_model()
    with pytest.raises(Exception):  # what the run would meet at the default batch size
        run_ort(model, {"x": np.ones((2, 6), np.float32)})
    source, output, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, source)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32))
    code = cli.main(["optimize", str(source), "-o", str(output), "--method", "snp", "--target-macs", "0.7",
                     "--calib", str(tmp_path / "calib.npz"), "--report", str(report), "--quiet"])
    assert code == 0
    found = json.loads(report.read_text())
    assert found["batch_fallback"]["batch_size"] == 1 and found["options"]["batch_size"] == 1
    assert "2 samples at once" in found["batch_fallback"]["reason"] and "Reshape" in found["batch_fallback"]["reason"]
    assert any("runs one sample at a time" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert found["macs_ratio"] <= 0.7 * 1.02 and found["fidelity"]["samples"] == 12
    pruned = onnx.load(str(output))
    assert run_ort(pruned, {"x": np.ones((1, 6), np.float32)})["y"].shape == (1, 3)

    plain = graphopt.optimize(model, method="magnitude", target_macs=0.7)  # no data: seeded random inputs
    assert plain.report["batch_fallback"]["batch_size"] == 1 and plain.report["fidelity"]["samples"] == 1


def test_a_model_that_runs_at_any_batch_is_not_slowed_down() -> None:
    model = one_sample_model()
    model.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(np.array([-1, 16], np.int64), "target"))
    report = graphopt.optimize(model, method="magnitude", target_macs=0.7).report
    assert "batch_fallback" not in report and report["options"]["batch_size"] == 32


def test_a_model_that_fails_on_one_sample_too_is_refused_with_the_node(tmp_path: Path, capfd) -> None:
    model = one_sample_model(baked=4)  # runs on exactly four samples: fails on two and on one
    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    np.savez(tmp_path / "calib.npz", x=np.ones((3, 6), np.float32))
    with pytest.raises(DataError, match="fails in onnxruntime on the calibration data: a Reshape node"):
        graphopt.optimize(model, method="magnitude", target_macs=0.7, calib=tmp_path / "calib.npz")
    code = cli.main(["optimize", str(source), "-o", str(output), "--method", "magnitude", "--target-macs", "0.7",
                     "--quiet"])
    assert code == 2 and not output.exists()
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "seeded random inputs" in lines[0]


def test_calibrate_runs_one_sample_at_a_time_where_the_model_does() -> None:
    data = {"x": np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)}
    stats = calibrate(one_sample_model(), data)
    assert stats.samples == 5


def test_verify_and_sweep_run_a_one_sample_model_one_sample_at_a_time(tmp_path: Path) -> None:
    from graphopt.api import verify
    from graphopt.sweep import sweep

    model = one_sample_model()
    data = {"x": np.random.default_rng(2).standard_normal((6, 6)).astype(np.float32)}
    report = verify(model, model, data)
    assert report.batch_size == 1 and report.samples == 6 and report.to_json()["rel_l2"] == 0.0
    found = sweep(model, data, methods=["magnitude"], targets=[0.8], held_out=0.5)  # timed at one sample only
    (row,) = found["rows"]
    assert not row["refused"] and not row["failed"] and row["target_reached"], row
    assert list(row["latency"]) == ["batch_1", "slower"] and row["fidelity"]["samples"] == 3


def test_bench_at_a_batch_the_model_cannot_run_is_one_line_exit_2(tmp_path: Path, capfd) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(one_sample_model(), source)
    for argv in (["bench", str(source), "--batch", "4", "--repeat", "2"],
                 ["bench", str(source), str(source), "--batch", "4", "--repeat", "2"]):
        assert cli.main(argv) == 2
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "fails in onnxruntime at batch 4: a Reshape node" in lines[0], lines
    assert cli.main(["bench", str(source), "--batch", "1", "--repeat", "2", "--json"]) == 0

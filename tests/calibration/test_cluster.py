"""Calibration sharded over Ray (graphopt/calibration/cluster.py, distributed.py): merged statistics equal
one process's, the same pruned model, the same samples, retries, lost shards, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.api import calibrate
from graphopt.calibration.cluster import Cluster, ClusterError, split_shards
from graphopt.calibration.data import load_data
from graphopt.calibration.distributed import gather_maps, gather_rows
from graphopt.calibration.sample import finish_rows, keyed_rows, merge_rows, sample_rows
from graphopt.calibration.stats import KINDS, TensorStats
from graphopt.cli import main
from tests.calibration.test_collect import conv_data, conv_model, token_data, token_model

RELATIVE = 1e-12


def _assert_same_statistics(merged: dict[str, TensorStats], single: dict[str, TensorStats]) -> None:
    """Every statistic equal to RELATIVE of its own scale (max norm); counts and negative counts exactly."""
    assert merged.keys() == single.keys()
    for name, expected in single.items():
        got = merged[name]
        assert got.count == expected.count and got.masked == expected.masked, name
        wanted = {"mean": expected.mean, "var": expected.var, "abs_mean": expected.abs_mean}
        if expected.has_gram:
            wanted.update(gram=expected.gram(), covariance=expected.covariance())
        for kind, value in wanted.items():
            actual = getattr(got, kind)
            actual = actual() if callable(actual) else actual
            scale = float(np.abs(value).max())
            assert float(np.abs(actual - value).max()) <= RELATIVE * scale, f"{name} {kind}"
        np.testing.assert_array_equal(got.negatives, expected.negatives)


def _one_pass(rows: np.ndarray, kinds: frozenset[str]) -> TensorStats:
    stats = TensorStats.empty("t", kinds, 1, 2, rows.shape[1])
    stats.update(rows)
    return stats


@pytest.mark.parametrize("kinds", [KINDS, KINDS - {"gram"}])
def test_merge_of_row_blocks_equals_one_pass_over_all_rows(kinds: frozenset[str]) -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((900, 6)) * [1, 2, 3, 0.5, 1e-3, 4] + [1e3, -5, 0, 2, 7, -1e2]  # |μ| ≫ σ too
    whole = _one_pass(rows, kinds)
    merged = TensorStats.empty("t", kinds, 1, 2, 6)
    for part in (rows[:0], rows[:250], rows[250:251], rows[251:]):  # an empty part and a one-row part
        merged.merge(_one_pass(part, kinds))
    _assert_same_statistics({"t": merged}, {"t": whole})
    with pytest.raises(ValueError, match="taken differently"):
        merged.merge(TensorStats.empty("u", kinds, 1, 2, 5))


def test_shards_hold_whole_batches_and_merge_to_the_same_sample() -> None:
    model = conv_model()
    data = load_data(conv_data(11), model)
    shards = split_shards(data, 4, 3)
    assert [(s.start, s.stop, s.first_batch) for s, _ in shards] == [(0, 4, 0), (4, 8, 1), (8, 11, 2)]
    assert shards[2][0].describe() == "shard 3 of 3 (samples 8-10)"
    tensors = {"c": 1, "r": 1}
    whole = sample_rows(model, data, tensors, max_rows=50, batch_size=4, seed=5)
    parts = [keyed_rows(model, part, tensors, max_rows=50, batch_size=4, seed=5, first_batch=shard.first_batch)
             for shard, part in shards]
    merged = finish_rows(merge_rows(parts, 50))
    for name in tensors:
        assert whole[name].shape == (50, 5)
        np.testing.assert_array_equal(merged[name], whole[name])


def test_calibrate_with_workers_equals_one_process(ray_local, tmp_path: Path) -> None:
    for model, data in [(conv_model(), conv_data(11)), (token_model(), token_data(11))]:
        single = calibrate(model, data, batch_size=4)
        sharded = calibrate(model, data, batch_size=4, workers=2)
        assert sharded.data_fingerprint == single.data_fingerprint and sharded.samples == 11
        assert sharded.mask_input == single.mask_input
        _assert_same_statistics(sharded.stats, single.stats)
    stream = [{"x": part} for part in np.array_split(conv_data(11)["x"], 4)]  # a stream: shards of whole feeds
    single = calibrate(conv_model(), stream, batch_size=4)
    _assert_same_statistics(calibrate(conv_model(), stream, batch_size=4, workers=3).stats, single.stats)


def _cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        cnn (float[N, 3, 8, 8] x) => (float[N, 5] y) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            r1 = Relu(c1)
            c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
            r2 = Relu(c2)
            p = GlobalAveragePool(r2)
            f = Flatten(p)
            y = Gemm <transB = 1> (f, fc)
        }""")
    weights = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (8, 8, 3, 3), "b2": (8,), "fc": (5, 8)}
    model.graph.initializer.extend(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                                   for name, shape in weights.items())
    return model


def test_sequential_snp_with_workers_gives_the_same_model(ray_local) -> None:
    model, data = _cnn(), {"x": np.random.default_rng(8).standard_normal((20, 3, 8, 8)).astype(np.float32)}
    options = {"method": "snp", "calib": data, "target_macs": 0.5, "sequential": True, "batch_size": 4,
               "round_to": 1}
    single = graphopt.optimize(model, **options)
    sharded = graphopt.optimize(model, workers=2, **options)
    assert single.report["macs_ratio"] < 0.6 and sharded.report["options"]["workers"] == 2
    expected = {t.name: numpy_helper.to_array(t) for t in single.model.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in sharded.model.graph.initializer}
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6 * float(np.abs(value).max()), err_msg=name)
    def removed(result: graphopt.OptimizeResult) -> list[tuple[int, list[int]]]:
        return [(entry["group"], entry["removed"]) for record in result.report["passes"]
                for entry in record.get("history", [])]

    assert removed(sharded) == removed(single) and removed(single)


def test_exprune_samples_on_workers_are_the_same_rows_and_maps(ray_local) -> None:
    model = conv_model()
    data = load_data(conv_data(11), model)
    with Cluster(2, None) as cluster:
        rows = gather_rows(cluster, model, data, {"c": 1}, max_rows=40, batch_size=4, seed=1)
        maps = gather_maps(cluster, model, data, ["r"], max_items=6, batch_size=4)
    np.testing.assert_array_equal(rows["c"], sample_rows(model, data, {"c": 1}, max_rows=40, batch_size=4, seed=1)["c"])
    np.testing.assert_array_equal(maps["r"], gather_maps(None, model, data, ["r"], max_items=6, batch_size=4)["r"])
    assert maps["r"].shape == (6, 5, 6, 6)


def test_a_dead_worker_is_retried_and_a_lost_shard_is_named(ray_local, tmp_path: Path) -> None:
    data = load_data(conv_data(8), conv_model())
    marker = str(tmp_path / "crashed-once")

    def crash_once(part, shard, path):  # the worker process dies the first time shard 2 runs
        if shard.index == 1 and not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return part.num_samples

    def always_crash(part, shard):
        if shard.index == 1:
            os._exit(1)
        return part.num_samples

    with Cluster(2, None, retries=1) as cluster:
        assert [count for _, count in cluster.map(crash_once, data, 4, marker)] == [4, 4]
        assert os.path.exists(marker)
        with pytest.raises(ClusterError, match=r"shard 2 of 2 \(samples 4-7\) was lost after 1 retries"):
            cluster.map(always_crash, data, 4)


def _files(tmp_path: Path) -> list[str]:
    onnx.save_model(conv_model(), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "data.npz", **conv_data(6))
    return [str(tmp_path / "model.onnx"), "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "stats.npz")]


def _one_error_line(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ") and fragment in lines[0], err


def test_workers_without_ray_installed_is_one_line(monkeypatch: pytest.MonkeyPatch, capfd, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    args = _files(tmp_path)
    assert main(["calibrate", *args, "--workers", "2", "--quiet"]) == 2
    _one_error_line(capfd.readouterr().err, "pip install 'graphopt[ray]'")
    calib = ["--calib", args[2], "--method", "snp", "--target-macs", "0.7", "--quiet"]
    assert main(["optimize", args[0], "-o", str(tmp_path / "out.onnx"), *calib, "--workers", "2"]) == 2
    _one_error_line(capfd.readouterr().err, "pip install 'graphopt[ray]'")
    assert not (tmp_path / "stats.npz").exists() and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("address, fragment", [("127.0.0.1:1", "cannot reach the Ray cluster at '127.0.0.1:1'"),
                                               ("not an address", "--ray-address expects host:port")])
def test_a_bad_ray_address_is_one_line(capfd, tmp_path: Path, address: str, fragment: str) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'graphopt[ray]')")
    assert main(["calibrate", *_files(tmp_path), "--ray-address", address, "--quiet"]) == 2
    _one_error_line(capfd.readouterr().err, fragment)
    assert not (tmp_path / "stats.npz").exists()


def test_ray_is_imported_only_when_asked_for() -> None:
    code = ("import sys, graphopt, graphopt.cli, graphopt.api, graphopt.calibration.collect; "
            "graphopt.cli.build_parser(); print('ray' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert found.stdout.strip() == "False"

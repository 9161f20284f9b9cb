"""Grams of wide feature maps from sampled positions (graphopt/calibration/stats.py: sampled_positions,
position_subset, row_blocks), through the calibrator, paired statistics and statistics files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import load_data
from graphopt.calibration.paired import PairRequest
from graphopt.calibration.stats import StatRequest, TensorStats, position_subset, row_blocks, sampled_positions
from graphopt.calibration.store import StatsFile, load_stats, save_stats
from graphopt.cli import main
from tests.calibration.test_collect import _model, reference_values

SAMPLES = 20


def wide_conv_model() -> onnx.ModelProto:
    """A 1x1 conv on a 16x16 map: 256 positions per sample, 4 channels, the third a copy of the first."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    weight[2] = weight[0]
    return _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        wide (float[N, 3, 16, 16] x) => (float[N, 4, 16, 16] y) {
            c = Conv(x, w)
            y = Relu(c)
        }""", w=weight)


def wide_data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(8).standard_normal((SAMPLES, 3, 16, 16)).astype(np.float32)}


def test_the_rule_samples_only_tensors_with_many_more_rows_than_channels() -> None:
    # 20 samples x 256 positions = 5120 rows for 4 channels
    assert sampled_positions((1, 4, 16, 16), 1, SAMPLES, 16) == 4          # 64 rows wanted: 4 per sample
    assert sampled_positions((1, 4, 16, 16), 1, SAMPLES, 1000) == 0        # 4000 wanted of 5120: keep all
    assert sampled_positions((1, 4, 16, 16), 1, SAMPLES, 0) == 0           # 0: every row
    assert sampled_positions((1, 4, 16, 16), 1, None, 16) == 0             # a stream of unknown length
    assert sampled_positions((1, 4), 1, SAMPLES, 1) == 0                   # no positions to sample
    assert sampled_positions((4, 1, 16), 0, SAMPLES, 1) == 0               # channels leading
    assert sampled_positions((1, 16, 16, 4), 3, SAMPLES, 100) == 20        # channels last: 400 of 5120


def test_the_subset_is_fixed_sorted_and_distinct() -> None:
    chosen = position_subset(256, 10)
    assert np.array_equal(chosen, position_subset(256, 10)) and np.array_equal(chosen, np.unique(chosen))
    assert chosen.size == 10 and chosen.min() >= 0 and chosen.max() < 256
    assert not np.array_equal(position_subset(256, 10), position_subset(255, 10)[:10])


@pytest.mark.parametrize("max_rows", [1, 7, 10_000])
def test_row_blocks_keep_the_same_positions_of_every_sample(max_rows: int) -> None:
    values = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    kept = position_subset(30, 7)
    expected = np.moveaxis(values, 1, -1).reshape(3, 30, 4)[:, kept].reshape(-1, 4)
    got = np.concatenate(list(row_blocks(values, 1, None, max_rows, positions=7)))
    np.testing.assert_array_equal(got, expected)
    # a mask that applies keeps every unmasked row instead
    mask = np.ones((3, 4 * 5 * 6 // 4), dtype=np.int64)
    tokens = values.reshape(3, 30, 4)
    masked = np.concatenate(list(row_blocks(tokens, 2, mask, max_rows, positions=7)))
    assert masked.shape == (90, 4)


def test_calibrated_grams_are_those_of_the_sampled_rows_and_keep_exact_duplicates() -> None:
    model, data = wide_conv_model(), wide_data()
    calibrator = Calibrator(load_data(data, model), batch_size=6, rows_per_channel=16)
    stats = calibrator.statistics(model, [StatRequest("y"), StatRequest("c", frozenset({"mean", "var"}))])
    y = stats["y"]
    assert y.positions == 4 and y.count == SAMPLES * 4
    value = reference_values(model, data, ["y"])["y"]
    rows = np.moveaxis(value, 1, -1).reshape(SAMPLES, 256, 4)[:, position_subset(256, 4)].reshape(-1, 4)
    rows = rows.astype(np.float64)
    np.testing.assert_allclose(y.gram(), rows.T @ rows, rtol=1e-6, atol=1e-6 * np.abs(rows.T @ rows).max())
    covariance = y.covariance()
    assert covariance[0, 2] == pytest.approx(covariance[0, 0], rel=1e-6)  # the duplicate stays exact
    # kinds without a Gram cost one pass over the rows: they keep every row
    assert stats["c"].positions == 0 and stats["c"].count == SAMPLES * 256
    every = Calibrator(load_data(data, model), batch_size=6, rows_per_channel=0).statistics(model, [StatRequest("y")])
    assert every["y"].positions == 0 and every["y"].count == SAMPLES * 256


def test_paired_statistics_pair_the_same_positions() -> None:
    model, data = wide_conv_model(), wide_data()
    calibrator = Calibrator(load_data(data, model), batch_size=6, rows_per_channel=16)
    paired = calibrator.paired(model, model, [PairRequest("y", "y")])[PairRequest("y", "y")]
    assert paired.positions == 4 and paired.count == SAMPLES * 4
    # the same tensor on both sides: the cross moment is the covariance, only if the rows pair up
    np.testing.assert_allclose(paired.cross_covariance(), paired.covariance(), rtol=1e-10, atol=1e-12)


def test_statistics_files_keep_the_sampling_and_merges_refuse_mixed_sampling(tmp_path: Path) -> None:
    model, data = wide_conv_model(), wide_data()
    dataset = load_data(data, model)
    stats = Calibrator(dataset, batch_size=6, rows_per_channel=16).statistics(model, [StatRequest("y")])
    path = tmp_path / "stats.npz"
    save_stats(StatsFile.build(model, stats, dataset, None), path)
    loaded = load_stats(path).stats["y"]
    assert loaded.positions == 4 and loaded.count == stats["y"].count
    np.testing.assert_array_equal(loaded.covariance(), stats["y"].covariance())
    other = TensorStats.empty("y", loaded.kinds, 1, 4, 4)
    with pytest.raises(ValueError, match="sampled positions"):
        loaded.merge(other)


def test_cli_refuses_a_negative_row_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path, data_path = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(wide_conv_model(), model_path)
    np.savez(data_path, **wide_data())
    code = main(["optimize", str(model_path), "--method", "snp", "--calib", str(data_path), "--target-macs", "0.7",
                 "--calib-rows-per-channel", "-1", "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calib-rows-per-channel" in err[0]
    assert not (tmp_path / "out.onnx").exists()

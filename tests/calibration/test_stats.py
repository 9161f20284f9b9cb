"""Accumulators (graphopt/calibration/stats.py) against direct numpy, per kind and chunked."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration import stats as stats_module
from graphopt.calibration.stats import KINDS, StatRequest, TensorStats, channel_rows


def _rows(seed: int = 0, count: int = 500, channels: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a large common offset: the shifted sums must not lose the variance to cancellation
    return (rng.standard_normal((count, channels)) * rng.uniform(0.1, 3.0, channels) + 1e4).astype(np.float64)


def _accumulate(rows: np.ndarray, kinds: frozenset[str] = KINDS, step: int | None = None) -> TensorStats:
    stats = TensorStats.empty("x", kinds, 1, 2, rows.shape[1])
    for start in range(0, rows.shape[0], step or rows.shape[0]):
        stats.update(rows[start:start + (step or rows.shape[0])])
    return stats


def _assert_matches_numpy(stats: TensorStats, rows: np.ndarray) -> None:
    assert stats.count == rows.shape[0]
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.var, rows.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.abs_mean, np.abs(rows).mean(axis=0), rtol=1e-13)
    np.testing.assert_array_equal(stats.negatives, (rows < 0).sum(axis=0))
    np.testing.assert_allclose(stats.gram(), rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(rows.T, bias=True), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("step", [None, 1, 7, 64])
def test_every_kind_equals_numpy_for_any_batching(step: int | None) -> None:
    rows = _rows()
    rows[:, 2] -= 1e4  # a channel with negative values
    _assert_matches_numpy(_accumulate(rows, step=step), rows)


def test_chunks_inside_one_update_give_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(1)
    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", 6 * 13)  # 13 rows per float64 chunk
    _assert_matches_numpy(_accumulate(rows), rows)


def test_variance_without_gram_keeps_only_the_diagonal() -> None:
    rows = _rows(2)
    stats = _accumulate(rows, frozenset({"mean", "var"}), step=33)
    assert stats.shifted_square.shape == (rows.shape[1],)
    np.testing.assert_allclose(stats.var, rows.var(axis=0), rtol=1e-9)
    with pytest.raises(ValueError, match="without 'gram'"):
        stats.gram()
    with pytest.raises(ValueError, match="without 'abs_mean'"):
        _ = stats.abs_mean


def test_rotated_statistics_are_those_of_the_rotated_rows() -> None:
    rows = _rows(3)
    rotation, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((rows.shape[1], rows.shape[1])))
    rotated = _accumulate(rows, step=71).rotated(rotation)
    assert rotated.kinds == frozenset({"mean", "var", "gram"}) and rotated.abs_sum is None
    turned = rows @ rotation.T  # each row x' = Q x
    np.testing.assert_allclose(rotated.mean, turned.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(rotated.gram(), turned.T @ turned, rtol=1e-11, atol=1e-4)
    np.testing.assert_allclose(rotated.covariance(), np.cov(turned.T, bias=True), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="without 'abs_mean'"):
        _ = rotated.abs_mean


def test_arrays_round_trip_exactly() -> None:
    stats = _accumulate(_rows(5), step=100)
    restored = TensorStats.from_arrays(stats.meta(), stats.to_arrays())
    for key, value in stats.to_arrays().items():
        np.testing.assert_array_equal(restored.to_arrays()[key], value)
    np.testing.assert_array_equal(restored.gram(), stats.gram())
    restored.update(_rows(6))  # a restored accumulator keeps accumulating
    assert restored.count == 1000


def test_channel_rows_moves_the_axis_and_applies_a_matching_mask() -> None:
    image = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    rows, masked = channel_rows(image, 1, None)
    np.testing.assert_array_equal(rows, image.transpose(0, 2, 3, 1).reshape(-1, 3))
    assert not masked
    tokens = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    rows, masked = channel_rows(tokens, 2, mask)
    assert masked
    np.testing.assert_array_equal(rows, tokens[mask.astype(bool)])
    rows, masked = channel_rows(tokens.mean(axis=1), 1, mask)  # pooled: no row per token
    assert not masked and rows.shape == (2, 3)


def test_requests_refuse_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="subset"):
        StatRequest("x", frozenset({"median"}))
    assert StatRequest("x", {"mean"}).kinds == frozenset({"mean"})  # type: ignore[arg-type]

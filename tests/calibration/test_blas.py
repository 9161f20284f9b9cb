"""Gram updates (graphopt/calibration/blas.py): float64 rows exactly, float32 rows within the stated bound,
means far from zero included, and the symmetric completion of an upper-triangle accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration.blas import FLOAT32_GRAM_ROWS, chunk_gram, symmetric
from graphopt.calibration.stats import TensorStats


def _accumulated(rows: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    square = np.zeros((rows.shape[1], rows.shape[1]), order="F")
    total = chunk_gram(square, rows, shift)
    return symmetric(square), total


def test_float64_rows_give_the_exact_shifted_gram() -> None:
    rows = np.random.default_rng(0).standard_normal((500, 7))
    shift = rows[:10].mean(axis=0)
    square, total = _accumulated(rows, shift)
    np.testing.assert_allclose(square, (rows - shift).T @ (rows - shift), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total, (rows - shift).sum(axis=0), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("mean", [0.0, 1e3])
def test_float32_rows_are_within_the_float32_block_bound(mean: float) -> None:
    """Several blocks, a mean far above the spread, an accumulator shift that is not the blocks' mean: the centred
    Gram agrees with float64 arithmetic on the same float32 values to a few float32 roundings per block."""
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((3 * FLOAT32_GRAM_ROWS + 17, 24)) * np.linspace(0.01, 3, 24) + mean).astype(np.float32)
    exact = rows.astype(np.float64)
    shift = exact[:5].mean(axis=0)
    square, total = _accumulated(rows, shift)
    np.testing.assert_allclose(total, (exact - shift).sum(axis=0), rtol=1e-9, atol=1e-9 * np.abs(exact).max())
    count = rows.shape[0]
    centred = square - np.outer(total, total) / count
    want = (exact - exact.mean(axis=0)).T @ (exact - exact.mean(axis=0))
    bound = np.sqrt(FLOAT32_GRAM_ROWS) * 2.0 ** -24 * np.sqrt(np.outer(np.diag(want), np.diag(want)))
    assert np.all(np.abs(centred - want) <= 4 * bound)
    assert not np.allclose(centred, want, rtol=1e-12, atol=0)  # float32 products really ran


def test_statistics_of_float32_and_float64_copies_agree() -> None:
    rows = np.random.default_rng(2).standard_normal((10_000, 16)).astype(np.float32) * 2 + 5
    kinds = frozenset({"mean", "gram", "abs_mean", "neg_frac"})
    single, double = (TensorStats.empty("t", kinds, 1, 2, 16) for _ in range(2))
    single.update(rows)
    double.update(rows.astype(np.float64))
    np.testing.assert_allclose(single.mean, double.mean, rtol=1e-12)
    np.testing.assert_allclose(single.abs_mean, double.abs_mean, rtol=1e-12)
    np.testing.assert_array_equal(single.negatives, double.negatives)
    np.testing.assert_allclose(single.covariance(), double.covariance(), rtol=0, atol=1e-5 * double.covariance().max())


def test_symmetric_completes_the_upper_triangle() -> None:
    upper = np.triu(np.arange(16.0).reshape(4, 4)) + np.tril(np.full((4, 4), 99.0), -1)  # garbage below
    full = symmetric(upper)
    np.testing.assert_array_equal(full, full.T)
    np.testing.assert_array_equal(np.triu(full), np.triu(upper))

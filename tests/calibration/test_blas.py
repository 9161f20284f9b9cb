"""Gram updates (graphopt/calibration/blas.py): float64 sums of any float rows about a shift, exact to float64
rounding whatever the dtype, and the symmetric completion of an upper-triangle accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration.blas import chunk_gram, symmetric


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_rows_of_any_float_dtype_give_the_float64_shifted_gram(dtype: type) -> None:
    rows = (np.random.default_rng(0).standard_normal((500, 7)) * 3 + 1e2).astype(dtype)  # |μ| ≫ σ
    exact = rows.astype(np.float64)
    shift = exact[:10].mean(axis=0)
    square = np.zeros((7, 7), order="F")
    total = chunk_gram(square, rows, shift)
    want = (exact - shift).T @ (exact - shift)
    np.testing.assert_allclose(symmetric(square), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(total, (exact - shift).sum(axis=0), rtol=1e-12, atol=1e-9)


def test_symmetric_completes_the_upper_triangle() -> None:
    upper = np.triu(np.arange(16.0).reshape(4, 4)) + np.tril(np.full((4, 4), 99.0), -1)  # garbage below
    full = symmetric(upper)
    np.testing.assert_array_equal(full, full.T)
    np.testing.assert_array_equal(np.triu(full), np.triu(upper))

"""Paired moments (graphopt/calibration/paired.py): merged halves equal one pass, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration.paired import PairedStats, PairRequest


def _rows(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 5)) * rng.uniform(0.5, 2.0, 5) + 300.0  # an offset the shifts must survive
    y = x[:, :3] @ rng.standard_normal((3, 3)) - 50.0 + 0.1 * rng.standard_normal((count, 3))
    return x, y


@pytest.mark.parametrize("split", [1, 37, 199])
def test_merged_halves_equal_numpy_and_one_pass(split: int) -> None:
    x, y = _rows(0, 200)
    request = PairRequest("x", "y")
    whole, first = PairedStats.empty(request, 5, 3), PairedStats.empty(request, 5, 3)
    whole.update(x, y)
    first.update(x[:split], y[:split])
    second = first.fresh()
    second.update(x[split:], y[split:])
    first.merge(second)
    expected_cross = (x - x.mean(0)).T @ (y - y.mean(0)) / len(x)
    for stats in (whole, first):
        assert stats.count == 200
        np.testing.assert_allclose(stats.reference_mean, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(stats.mean, y.mean(0), rtol=1e-13)
        np.testing.assert_allclose(stats.cross_covariance(), expected_cross, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats.covariance(), np.cov(y.T, bias=True), rtol=1e-9, atol=1e-12)
    empty = first.fresh()
    empty.merge(first)  # into empty accumulators: a copy of the moments
    np.testing.assert_allclose(empty.cross_covariance(), first.cross_covariance(), rtol=1e-12)
    with pytest.raises(ValueError, match="do not merge"):
        first.merge(PairedStats.empty(request, 5, 2))

"""Per-neuron thresholds and what they skip (graphopt/passes/exprune/calib.py), against a direct count."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.exprune.calib import MARGIN, Curve, Thresholds, ratios


def _direct(scores: np.ndarray, factors: np.ndarray, tau: np.ndarray, positive: np.ndarray, d: int,
            checkpoints: list[int]) -> tuple[float, float, float]:
    """Skip rate, false-negative rate and MACs saved from the whole [rows, neurons, checkpoints] mask."""
    fires = scores < (tau[:, None] * factors[None, :])[None]
    skipped = fires.any(axis=-1)
    first = np.argmax(fires, axis=-1)
    saved = np.where(skipped, (d - np.asarray(checkpoints))[first] / d, 0.0)
    return float(skipped.mean()), float(np.sum(skipped & positive) / positive.sum()), float(saved.mean())


@pytest.mark.parametrize("checkpoints", [[8], [8, 16, 32]])
def test_a_curve_counts_what_the_whole_mask_counts_at_every_rate(checkpoints: list[int]) -> None:
    rng = np.random.default_rng(0)
    rows, neurons, d = 3000, 24, 64
    scores = rng.standard_normal((rows, neurons, len(checkpoints))).astype(np.float32)
    factors = np.linspace(1.0, 0.4, len(checkpoints))
    positive = rng.random((rows, neurons)) > 0.4
    positive[:, 3] = False  # a neuron never positive on the sample
    curve = Curve(scores, factors, positive, d, checkpoints, np.arange(d), checkpoints[0])
    for fnr in (0.0, 0.013, 0.1, 0.5, 0.1):
        found = curve(fnr)
        want = _direct(scores, factors, found.tau, positive, d, checkpoints)
        assert (found.skip_rate, found.fnr) == want[:2]
        assert found.macs_skipped == pytest.approx(want[2], rel=1e-12)
        assert found.fnr <= fnr + 1.0 / positive[:, 0].sum()
    assert curve(0.1) is curve(0.1)  # each rate is computed once


def test_thresholds_keep_the_rate_of_positive_rows_and_sit_a_margin_below() -> None:
    ratio = np.array([[3.0, -1.0], [1.0, -2.0], [2.0, 5.0], [4.0, 0.5]], dtype=np.float32)
    positive = np.array([[True, False], [True, False], [True, False], [False, False]])
    tau = Thresholds(ratio, positive)(1.0 / 3.0)  # one of neuron 0's three positive rows may be missed
    assert tau[0] == np.float32(2.0 - MARGIN * 3.0)
    assert tau[1] == np.float32(5.0)  # never positive: the largest ratio seen
    assert Thresholds(ratio, positive)(0.0)[0] == np.float32(1.0 - MARGIN * 3.0)  # no positive row missed
    scaled = ratios(ratio[:, :, None] * 2.0, np.full(1, 2.0))  # score / f: the same ratios
    assert Thresholds(scaled, positive)(0.0)[0] == np.float32(1.0 - MARGIN * 3.0)

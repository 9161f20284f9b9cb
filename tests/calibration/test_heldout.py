"""Held-out fidelity and its confidence bounds (graphopt/calibration/heldout.py), against scipy's beta
quantiles and direct simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphopt.calibration.data import load_data
from graphopt.calibration.heldout import (HeldOut, Tolerance, agreement_lower, binomial_upper, disagreements_allowed,
                                          rel_l2_upper, rows_needed)
from graphopt.errors import OptionError
from tests.conftest import init, tiny, weights


@pytest.mark.parametrize("events,trials", [(0, 1), (0, 314), (1, 10), (3, 314), (5, 540), (40, 1000), (999, 1000)])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_clopper_pearson_matches_the_beta_quantile(events: int, trials: int, confidence: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    want = stats.beta.ppf(confidence, events + 1, trials - events)
    assert binomial_upper(events, trials, confidence) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_bounds_without_confidence_are_the_point_values_and_grow_with_it() -> None:
    assert binomial_upper(3, 300, 0.0) == 0.01 and binomial_upper(300, 300, 0.95) == 1.0
    bounds = [binomial_upper(3, 300, c) for c in (0.5, 0.8, 0.95, 0.999)]
    assert bounds == sorted(bounds) and bounds[0] > 0.01
    ones = np.ones(300, dtype=np.int64)
    disagree = np.zeros(300, dtype=np.int64)
    disagree[:3] = 1
    assert agreement_lower(disagree, ones, 0.0) == 0.99
    assert agreement_lower(disagree, ones, 0.95) == pytest.approx(1 - binomial_upper(3, 300, 0.95))


@pytest.mark.parametrize("rate", [0.002, 0.005, 0.01, 0.012, 0.02, 0.05])
def test_a_bound_at_95_percent_covers_the_true_rate_with_probability_95_percent(rate: float) -> None:
    """Exact coverage: the sum of Binomial(n, rate) probabilities of the counts whose bound is >= rate."""
    stats = pytest.importorskip("scipy.stats")
    trials = 400
    counts = np.arange(0, 60)
    covered = sum(stats.binom.pmf(k, trials, rate) for k in counts if binomial_upper(int(k), trials, 0.95) >= rate)
    assert covered >= 0.95
    if rate >= 0.01:  # where several counts are likely the exact test is conservative, not vacuous
        assert covered <= 0.99


def test_rows_of_one_sample_that_disagree_together_count_as_one_trial() -> None:
    """Ten rows per sample (tokens): when a sample's rows all move together the design effect is ten, and
    the bound is the one of the samples; rows that move independently keep the row count."""
    rows = np.full(100, 10)
    clustered = np.zeros(100, dtype=np.int64)
    clustered[:3] = 10
    assert agreement_lower(clustered, rows, 0.95) == pytest.approx(1 - binomial_upper(3, 100, 0.95))
    spread = np.zeros(100, dtype=np.int64)
    spread[:30] = 1
    assert agreement_lower(spread, rows, 0.95) == pytest.approx(1 - binomial_upper(30, 1000, 0.95))


def test_relative_error_bound_needs_two_samples_and_tightens_with_more() -> None:
    rng = np.random.default_rng(1)
    norms = rng.uniform(1.0, 2.0, size=4000)
    errors = norms * rng.uniform(0.0, 2e-4, size=4000)  # relative squared error 1e-4 on average: rel_l2 0.01
    point = math.sqrt(errors.sum() / norms.sum())
    assert rel_l2_upper(errors, norms, 0.0) == pytest.approx(point)
    few, many = rel_l2_upper(errors[:50], norms[:50], 0.95), rel_l2_upper(errors, norms, 0.95)
    assert few > math.sqrt(errors[:50].sum() / norms[:50].sum()) and point < many < few
    assert rel_l2_upper(errors[:1], norms[:1], 0.95) == math.inf


def test_how_many_rows_a_top1_tolerance_needs() -> None:
    tolerance = Tolerance.parse("top1=0.99")
    assert rows_needed(tolerance, 0.95) == 299 and 0.99 ** 299 <= 0.05 < 0.99 ** 298
    assert disagreements_allowed(298, tolerance, 0.95) == -1 and disagreements_allowed(299, tolerance, 0.95) == 0
    assert disagreements_allowed(1000, tolerance, 0.95) == 4 and disagreements_allowed(1000, tolerance, 0.0) == 10
    assert rows_needed(Tolerance.parse("top1=1"), 0.95) is None


def _classifier(scale: float = 1.0) -> object:
    return tiny("y = Gemm <transB = 1> (x, w)", inputs="float[N, 6] x", outputs="float[N, 4] y",
                inits=init("w", weights(4, 6) * scale))


def test_measure_reports_point_values_and_bounds_of_a_candidate() -> None:
    reference = _classifier()
    data = {"x": np.random.default_rng(2).standard_normal((500, 6)).astype(np.float32)}
    check = HeldOut(reference, load_data(data, reference), batch_size=64, confidence=0.95)
    assert check.samples == 500 and check.rows == 500 and check.classifier
    same = check.measure(reference)
    assert same["top1"] == 1.0 and same["disagreements"] == 0 and same["rel_l2"] == 0.0
    assert same["top1_lower_bound"] == pytest.approx(0.05 ** (1 / 500)) and same["rel_l2_upper_bound"] == 0.0
    noisy_weights = weights(4, 6) + 0.2 * weights(4, 6, seed=9)
    noisy = tiny("y = Gemm <transB = 1> (x, w)", inputs="float[N, 6] x", outputs="float[N, 4] y",
                 inits=init("w", noisy_weights))
    measured = check.measure(noisy)
    logits, moved = data["x"] @ weights(4, 6).T, data["x"] @ noisy_weights.T
    disagree = int(np.sum(np.argmax(logits, 1) != np.argmax(moved, 1)))
    assert measured["disagreements"] == disagree > 0
    assert measured["top1"] == pytest.approx(1 - disagree / 500)
    assert measured["top1_lower_bound"] == pytest.approx(1 - binomial_upper(disagree, 500, 0.95))
    want = np.linalg.norm(moved - logits) / np.linalg.norm(logits)
    assert measured["rel_l2"] == pytest.approx(want, rel=1e-5) and measured["rel_l2_upper_bound"] > measured["rel_l2"]
    assert Tolerance.parse(f"top1={measured['top1']}").met(measured) is False  # the bound, not the value, decides
    with pytest.raises(OptionError, match="confidence must be in"):
        HeldOut(reference, load_data(data, reference), confidence=1.0)


def test_held_out_batches_are_kept_within_the_memory_bound() -> None:
    reference = _classifier()
    data = load_data({"x": np.random.default_rng(3).standard_normal((700, 6)).astype(np.float32)}, reference)
    assert HeldOut(reference, data, batch_size=50).samples == 700  # no sample cap: every row adds power
    per_batch = 50 * (6 + 4) * 4  # float32 feeds and class scores
    bounded = HeldOut(reference, data, batch_size=50, max_bytes=3 * per_batch)
    assert bounded.samples == 150 and bounded.rows == 150
    assert HeldOut(reference, data, batch_size=50, max_bytes=1).samples == 50  # at least one batch


def test_held_out_samples_are_counted_along_a_batch_axis_that_is_not_first() -> None:
    model = tiny("z = Relu (x)", inputs="float[5, ?, 4] x", outputs="float[5, ?, 4] z")  # time-major
    held = HeldOut(model, load_data({"x": weights(5, 6, 4)}, model), batch_size=4)
    assert held.samples == 6 and len(held.feeds) == 2

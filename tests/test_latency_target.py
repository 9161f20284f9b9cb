"""--target-latency measured: one corrected solve when the first result misses the target by over 10%."""

from __future__ import annotations

import pytest

from graphopt import latency_target as fit


def _timed(measured: float) -> dict:
    return {"speedup": 1.0 / measured, "batch": 8, "reference_ms": 10.0, "candidate_ms": 10.0 * measured}


def _fake(scale: float, solved: list[float]):
    """A method whose result measures `scale` times the predicted fraction it was solved for."""
    def solve(fraction: float) -> dict:
        solved.append(fraction)
        return {"predicted_latency_ratio": fraction, "latency_table_hits": 3 * (len(solved) - 1),
                "latency_table_entries": 3, "latency_table_build_s": 2.0 if len(solved) == 1 else 0.0}

    return solve, lambda run: _timed(scale * run["predicted_latency_ratio"])


def test_a_result_within_ten_percent_is_kept_without_a_second_solve() -> None:
    solved: list[float] = []
    attempts = fit.fit(0.6, *_fake(1.08, solved))
    assert solved == [0.6] and len(attempts) == 1
    report = fit.report(0.6, attempts, lambda run: run)
    assert report["reached"] and report["measured"] == pytest.approx(0.648) and report["solved_for"] == 0.6


@pytest.mark.parametrize("scale", [0.74, 1.3])
def test_a_missed_target_is_solved_again_for_the_corrected_prediction(scale: float) -> None:
    """Measured at 0.74x (or 1.3x) of the prediction: the second solve asks 0.6 / scale and lands on 0.6."""
    solved: list[float] = []
    attempts = fit.fit(0.6, *_fake(scale, solved))
    assert solved == [0.6, pytest.approx(0.6 / scale)]
    assert attempts[0].solved_for == pytest.approx(0.6 / scale) and attempts[0].measured == pytest.approx(0.6)
    report = fit.report(0.6, attempts, lambda run: run)
    assert report["reached"] and report["predicted"] == pytest.approx(0.6 / scale)
    # the tables' cost is the first solve's; the attempts are listed in the order they ran
    assert report["table_build_s"] == 2.0 and report["table_cache_hits"] == 0
    assert [a["solved_for"] for a in report["attempts"]] == [0.6, pytest.approx(0.6 / scale)]
    assert report["attempts"][0]["measured"] == pytest.approx(0.6 * scale)


def test_the_attempt_closer_to_the_target_is_kept_when_the_correction_overshoots() -> None:
    """Latency that does not follow the prediction (a step): the second solve lands further away, so the
    first result stays (faster than asked: the target counts as reached)."""
    solved: list[float] = []
    measured = {0.6: 0.45}

    def solve(fraction: float) -> dict:
        solved.append(fraction)
        return {"predicted_latency_ratio": fraction}

    attempts = fit.fit(0.6, solve, lambda run: _timed(measured.get(run["predicted_latency_ratio"], 0.9)))
    assert len(solved) == 2 and attempts[0].solved_for == 0.6
    report = fit.report(0.6, attempts, lambda run: run)
    assert report["reached"] and report["measured"] == pytest.approx(0.45)
    assert [a["measured"] for a in report["attempts"]] == [pytest.approx(0.45), pytest.approx(0.9)]

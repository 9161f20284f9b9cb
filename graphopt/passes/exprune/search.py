"""ExPrune's tolerance search: the largest false-negative rate on a grid whose model keeps a fidelity
tolerance on held-out calibration samples, with a confidence margin.

Tolerance: `top1=A` (arg-max agreement with the unpruned model >= A; default 0.99 for class scores
[N, C]), `sequence=A` (greedy CTC decodings that match; default 0.99 for sequences [N, T, C]),
`position=A` (per-position arg-max agreement of a sequence), `rel_l2=E` (default 0.01 otherwise) or a
key of the user's metric (`KEY=V`: >= V, `KEY<=V`), checked against a one-sided confidence bound at
`exprune_confidence` c (default 0.95; graphopt.calibration.heldout: Clopper-Pearson on the held-out
disagreements, a normal bound for rel_l2, the held-out value itself for a metric's key), so that it
holds with probability at least c on new data
drawn like the held-out samples (calibration data from another distribution, such as the training set
of an over-fitted model, carries no such promise). The steps are one rate for every layer in increasing
order, or the per-layer allocations of graphopt.passes.exprune.allocate in path order (fixed by the fit
samples alone); the search stops at the first that fails (fixed-sequence testing: only the first rate whose true fidelity
misses the tolerance can be wrongly accepted, so one bound at level c covers the whole search, with no
assumption that fidelity falls as the rate rises); the last rate passed is kept. c = 0 checks the
held-out value itself, without a margin. With n independent held-out rows and all of them agreeing,
top1=A is certified only when A^n <= 1 − c (299 rows for 0.99 at 0.95); below that nothing passes.

Reported: the tolerance, the confidence, the held-out samples, the disagreements the check can accept
(or the rows it would need), the chosen rate with its held-out measures and bounds (`held_out_top1`,
`held_out_top1_lower_bound`, `held_out_rel_l2`, `held_out_rel_l2_upper_bound`), and the first rate
rejected with its measures (`fnr_rejected`, `rejected_*`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import onnx
from tqdm.auto import tqdm

from graphopt.calibration.heldout import HeldOut, Tolerance, disagreements_allowed, rows_needed
from graphopt.passes.base import PassResult

log = logging.getLogger(__name__)

GRID = (0.0, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
DEFAULT_CONFIDENCE = 0.95


def tolerance_search(check: HeldOut, tolerance: Tolerance,
                     candidate: Callable[[Any], tuple[list[Any], onnx.ModelProto]], result: PassResult,
                     progress: bool, steps: Sequence[Any] = GRID,
                     level: Callable[[Any], float] = float,
                     first: tuple[list[Any], dict[str, float | None]] | None = None) -> list[Any] | None:
    """The choices `candidate(step)` returns at the last of `steps` (grid rates, or any sequence fixed before the
    held-out samples are read) passed in a scan stopped at the first failure; None (with the reason in
    `result.skipped`) when the first step fails. `level(step)` is the false-negative rate reported for a step;
    `first`, (choices, measures) of steps[0] when the caller already measured it. A tolerance the check cannot
    measure is refused (`OptionError`)."""
    check.require(tolerance)
    _describe_check(check, tolerance, result)
    passed: tuple[int, Any, dict[str, float | None], list[Any]] | None = None
    measured: dict[str, float | None] = {}
    for index, step in enumerate(tqdm(steps, desc="exprune tolerance", disable=not progress, leave=False)):
        if index == 0 and first is not None:
            choices, measured = first
        else:
            choices, model = candidate(step)
            measured = check.measure(model)
        log.info("exprune: step %d (fnr %g) -> %s", index, level(step), measured)
        if not tolerance.met(measured):
            result.stats.update({"fnr_rejected": level(step), **{f"rejected_{k}": v for k, v in measured.items()}})
            break
        passed = (index, step, measured, choices)
    if passed is None:
        result.skipped.insert(0, _nothing_passed(check, tolerance, measured))  # the reason that decided
        return None
    index, step, measured, choices = passed
    result.stats.update({"fnr_level": level(step), "steps_passed": index + 1, "steps": len(steps),
                         **{f"held_out_{k}": v for k, v in measured.items()}})
    return choices


def _describe_check(check: HeldOut, tolerance: Tolerance, result: PassResult) -> None:
    """The tolerance, the held-out size and, for an agreement of independent rows (top-1 of class scores,
    whole sequences), how many disagreements the check can accept."""
    result.stats.update({"tolerance": str(tolerance), "confidence": check.confidence,
                         "held_out_samples": check.samples})
    rows = check.trials(tolerance.measure) if tolerance.measure in ("top1", "sequence") else 0
    if not rows:
        return
    allowed = disagreements_allowed(rows, tolerance, check.confidence)
    if allowed >= 0:
        result.stats["held_out_disagreements_allowed"] = allowed
        return
    needed = rows_needed(tolerance, check.confidence)
    if needed is None:
        log.warning("exprune: no held-out count certifies %s at confidence %g", tolerance, check.confidence)
        return
    result.stats["held_out_rows_needed"] = needed
    log.warning("exprune: %d held-out predictions cannot certify %s at confidence %g (%d needed); more "
                "calibration samples or --exprune-held-out give a finer check", rows, tolerance,
                check.confidence, needed)


def _nothing_passed(check: HeldOut, tolerance: Tolerance, measured: dict[str, float | None]) -> str:
    bound = measured.get(tolerance.key)
    value = measured.get(tolerance.measure if tolerance.builtin else tolerance.key)
    text = (f"even false-negative rate 0 misses {tolerance} on {check.samples} held-out samples (measured "
            f"{tolerance.measure} {value if value is None else f'{value:.4g}'}, bound at confidence "
            f"{check.confidence:g}: {bound if bound is None else f'{bound:.4g}'}); nothing replaced")
    rows = check.trials(tolerance.measure) if tolerance.measure in ("top1", "sequence") else 0
    if rows and check.confidence > 0 and tolerance.bound < 1.0:
        needed = rows_needed(tolerance, check.confidence)
        if needed is not None and rows < needed:
            text += (f"; {rows} held-out predictions are too few to certify it (at least {needed}): give "
                     "more calibration data, a larger --exprune-held-out, a lower --exprune-confidence, or "
                     "--exprune-fnr")
    return text

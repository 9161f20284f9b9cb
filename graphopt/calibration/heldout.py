"""Fidelity of candidate models against a reference on held-out data, for passes that search a setting
against a tolerance (ExPrune's thresholds), with confidence bounds for new data.

The reference's first output is computed once and kept with its feeds (batches are taken while the kept
arrays stay within `max_bytes`, default 256 MiB: every held-out sample adds power to the bounds); each
candidate runs on the same feeds and is compared with graphopt.evaluate's measures: top-1 agreement
(outputs whose last axis has more than one entry: class scores) and relative L2 error.

A tolerance is checked against a one-sided bound at `confidence` c (0: the held-out value itself), so
that it holds, with probability at least c, on new data drawn like the held-out samples:
- top-1 agreement: 1 − the Clopper-Pearson upper bound on the disagreement rate from k disagreeing rows
  out of n (exact for independent rows: the largest p with P(Binomial(n, p) <= k) >= 1 − c). Rows of one
  sample (tokens of a sequence) need not be independent: their counts are divided by the design effect
  max(1, Σ_i (k_i − p̂ m_i)² / (p̂ (1 − p̂) Σ_i m_i)) over samples i with m_i rows and k_i disagreements
  (1 for one row per sample; rounding k up and n down), an approximation;
- relative L2 error: sqrt of the upper normal bound on the ratio estimator Σ d_i / Σ r_i (d_i, r_i the
  squared error and squared reference norm of sample i; linearised variance
  n/(n − 1) · Σ (d_i − R r_i)² / (Σ r_i)²), an approximation that needs at least 2 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.session import make_session
from graphopt.errors import OptionError

MEASURES = ("top1", "rel_l2")
MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Tolerance:
    """`top1 >= bound` (agreement of the arg-max with the reference) or `rel_l2 <= bound`."""

    measure: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        name, _, value = text.partition("=")
        try:
            bound = float(value)
        except ValueError:
            bound = float("nan")
        if name not in MEASURES or not np.isfinite(bound) or bound < 0 or (name == "top1" and bound > 1):
            raise OptionError(f"--tolerance must be top1=A (0 <= A <= 1) or rel_l2=E (E >= 0), got '{text}'")
        return cls(name, bound)

    def met(self, measured: dict[str, float | None]) -> bool:
        """Whether the confidence bound of the measure (`measured` from `HeldOut.measure`) is within it."""
        value = measured[f"{self.measure}_{'lower' if self.measure == 'top1' else 'upper'}_bound"]
        if value is None:
            return False
        return value >= self.bound if self.measure == "top1" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.measure}={self.bound:g}"


def binomial_upper(events: int, trials: int, confidence: float) -> float:
    """Clopper-Pearson one-sided upper bound on a rate from `events` in `trials` (0 confidence: events/trials)."""
    if trials <= 0:
        return 1.0
    if confidence <= 0.0 or events >= trials:
        return min(1.0, events / trials)
    alpha = 1.0 - confidence
    if events == 0:
        return 1.0 - alpha ** (1.0 / trials)
    low, high = events / trials, 1.0
    for _ in range(60):  # P(Binomial(n, p) <= k) falls as p rises: bisect for alpha
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _binomial_cdf(events, trials, middle) > alpha else (low, middle)
    return high


def _binomial_cdf(events: int, trials: int, rate: float) -> float:
    """P(Binomial(trials, rate) <= events), summed in log space."""
    counts = np.arange(1, events + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((trials - counts + 1) / counts))])
    ks = np.arange(events + 1, dtype=np.float64)
    logs = log_choose + ks * math.log(rate) + (trials - ks) * math.log1p(-rate)
    top = float(logs.max())
    return min(1.0, math.exp(top) * float(np.sum(np.exp(logs - top))))


def agreement_lower(disagree: np.ndarray, rows: np.ndarray, confidence: float) -> float:
    """Lower bound on top-1 agreement from per-sample disagreeing rows and row counts (module docstring)."""
    total, events = int(rows.sum()), int(disagree.sum())
    if total == 0:
        return 0.0
    rate = events / total
    effect = 1.0
    if 0 < events < total and rows.max() > 1:
        spread = float(np.sum((disagree - rate * rows) ** 2)) / (rate * (1.0 - rate) * total)
        effect = min(max(1.0, spread), float(rows.max()))
    trials = int(math.floor(total / effect + 1e-9))
    return 1.0 - binomial_upper(min(trials, int(math.ceil(events / effect - 1e-9))), trials, confidence)


def rel_l2_upper(errors: np.ndarray, norms: np.ndarray, confidence: float) -> float:
    """Upper bound on the relative L2 error from per-sample squared errors and reference norms."""
    reference = float(norms.sum())
    ratio = float(errors.sum()) / reference if reference > 0 else float(errors.sum())
    if confidence <= 0.0:
        return math.sqrt(ratio)
    if errors.size < 2 or reference <= 0:
        return math.inf
    variance = errors.size / (errors.size - 1) * float(np.sum((errors - ratio * norms) ** 2)) / reference ** 2
    return math.sqrt(max(0.0, ratio + NormalDist().inv_cdf(confidence) * math.sqrt(variance)))


def disagreements_allowed(rows: int, tolerance: Tolerance, confidence: float) -> int:
    """The most disagreeing rows (independent, one per sample) among `rows` a top-1 tolerance accepts at
    this confidence; -1 when even none is accepted."""
    if confidence <= 0.0:
        return int(np.floor((1.0 - tolerance.bound) * rows + 1e-9))
    allowed = -1
    while allowed + 1 <= rows and 1.0 - binomial_upper(allowed + 1, rows, confidence) >= tolerance.bound:
        allowed += 1
    return allowed


def rows_needed(tolerance: Tolerance, confidence: float) -> int | None:
    """The fewest independent rows that can certify a top-1 tolerance at this confidence (all agreeing);
    None when no count can (top1=1 with a margin)."""
    if confidence <= 0.0 or tolerance.bound <= 0.0:
        return 1
    if tolerance.bound >= 1.0:
        return None
    return int(math.ceil(math.log(1.0 - confidence) / math.log(tolerance.bound) - 1e-9))


class HeldOut:
    """Reference outputs of `model` on `data` (the batches that fit in `max_bytes` with their feeds), to score
    candidates with bounds at `confidence`."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, *, batch_size: int = 32, max_bytes: int = MAX_BYTES,
                 confidence: float = 0.0) -> None:
        if not 0.0 <= confidence < 1.0:
            raise OptionError(f"confidence must be in [0, 1), got {confidence}")
        self.confidence = confidence
        session = make_session(model)
        self.output = session.get_outputs()[0].name
        self.feeds: list[dict[str, np.ndarray]] = []
        self.reference: list[np.ndarray] = []
        taken = kept = 0
        for feed in data.batches(batch_size):
            reference = session.run([self.output], feed)[0]
            kept += reference.nbytes + sum(v.nbytes for v in feed.values())
            if kept > max_bytes and self.feeds:
                break
            self.feeds.append(feed)
            self.reference.append(reference)
            taken += data.feed_samples(feed)
        self.samples = taken
        self.rows = sum(int(np.prod(r.shape[:-1])) for r in self.reference) if self.classifier else 0

    @property
    def classifier(self) -> bool:
        return bool(self.reference) and self.reference[0].ndim >= 2 and self.reference[0].shape[-1] > 1

    def default_tolerance(self) -> Tolerance:
        return Tolerance("top1", 0.99) if self.classifier else Tolerance("rel_l2", 0.01)

    def measure(self, candidate: onnx.ModelProto) -> dict[str, float | None]:
        """The candidate's first output against the reference: "top1" (agreement, None for outputs that are
        not class scores), "rel_l2", their bounds "top1_lower_bound" and "rel_l2_upper_bound" at this
        confidence, and "disagreements" (rows whose arg-max moved)."""
        session = make_session(candidate)
        names = {i.name for i in session.get_inputs()}
        errors, norms, disagree, rows = [], [], [], []
        for feed, reference in zip(self.feeds, self.reference):
            got = session.run([self.output], {k: v for k, v in feed.items() if k in names})[0].astype(np.float64)
            want = reference.astype(np.float64)
            per_sample = (got.shape[0], -1) if got.ndim else (1, -1)
            errors.append(np.sum(((got - want) ** 2).reshape(per_sample), axis=1))
            norms.append(np.sum((want ** 2).reshape(per_sample), axis=1))
            if self.classifier:
                moved = np.argmax(got, axis=-1) != np.argmax(want, axis=-1)
                disagree.append(moved.reshape(moved.shape[0], -1).sum(axis=1))
                rows.append(np.full(moved.shape[0], moved[0].size))
        error, norm = np.concatenate(errors), np.concatenate(norms)
        ratio = float(error.sum() / norm.sum()) if norm.sum() > 0 else float(error.sum())
        measured: dict[str, float | None] = {"top1": None, "rel_l2": math.sqrt(ratio), "top1_lower_bound": None,
                                             "rel_l2_upper_bound": rel_l2_upper(error, norm, self.confidence)}
        if self.classifier:
            moved_rows, all_rows = np.concatenate(disagree), np.concatenate(rows)
            measured.update({"top1": 1.0 - moved_rows.sum() / all_rows.sum(), "disagreements": int(moved_rows.sum()),
                             "top1_lower_bound": agreement_lower(moved_rows, all_rows, self.confidence)})
        return measured

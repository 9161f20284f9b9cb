"""Fidelity of candidate models against a reference on held-out data, for passes that search a setting
against a tolerance (ExPrune's thresholds), with confidence bounds for new data.

The reference's first output (every output, when a user's metric reads them) is computed once and kept
with its feeds (batches are taken while the kept arrays stay within `max_bytes`, default 256 MiB: every
held-out sample adds power to the bounds); each candidate runs on the same feeds and is compared by the
measures the output's kind makes meaningful (graphopt.calibration.fidelity): top-1 agreement for class
scores [N, C]; position agreement and greedy-CTC sequence agreement for sequences [N, T, C]; relative
L2 error always; and the values of a user's metric (graphopt.calibration.metric), as `metric_<key>`.

A tolerance is checked against a one-sided bound at `confidence` c (0: the held-out value itself), so
that it holds, with probability at least c, on new data drawn like the held-out samples:
- top-1, position and sequence agreement: 1 − the Clopper-Pearson upper bound on the disagreement rate
  from k disagreeing rows out of n (exact for independent rows: the largest p with
  P(Binomial(n, p) <= k) >= 1 − c). Rows of one sample (positions of a sequence) need not be
  independent: their counts are divided by the design effect
  max(1, Σ_i (k_i − p̂ m_i)² / (p̂ (1 − p̂) Σ_i m_i)) over samples i with m_i rows and k_i disagreements
  (1 for one row per sample, as for class scores and whole sequences; rounding k up and n down), an
  approximation;
- relative L2 error: sqrt of the upper normal bound on the ratio estimator Σ d_i / Σ r_i (d_i, r_i the
  squared error and squared reference norm of sample i; linearised variance
  n/(n − 1) · Σ (d_i − R r_i)² / (Σ r_i)²), an approximation that needs at least 2 samples;
- a metric's value: the held-out value itself (a batch mean carries no per-sample spread to bound).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable
from statistics import NormalDist

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.fidelity import Counts, compare, output_kinds
from graphopt.calibration.metric import Metric, MetricMean, as_metric
from graphopt.calibration.session import make_session
from graphopt.errors import OptionError

AGREEMENTS = ("top1", "position", "sequence")  # measured as agreement: higher is better, in [0, 1]
MEASURES = (*AGREEMENTS, "rel_l2")
MAX_BYTES = 256 * 2**20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_USAGE = ("--tolerance must be top1=A, position=A, sequence=A (0 <= A <= 1), rel_l2=E (E >= 0), or KEY=V, "
          "KEY>=V or KEY<=V for a key --metric returns")


@dataclass(frozen=True)
class Tolerance:
    """`measure >= bound` (agreements and, by default, a metric's key) or `measure <= bound` (rel_l2, and
    a metric's key written KEY<=V)."""

    measure: str
    bound: float
    at_least: bool = True

    def __post_init__(self) -> None:
        if self.builtin:  # a built-in measure has one direction: agreement from below, rel_l2 from above
            object.__setattr__(self, "at_least", self.measure != "rel_l2")

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        found = re.fullmatch(r"\s*([^<>=\s]+)\s*(<=|>=|=)\s*(\S+)\s*", str(text))
        name, sign, value = found.groups() if found else ("", "", "")
        try:
            bound = float(value)
        except ValueError:
            bound = float("nan")
        builtin = name in MEASURES
        at_least = name != "rel_l2" if sign == "=" else sign == ">="
        if (not _NAME.fullmatch(name) or not np.isfinite(bound)
                or (builtin and at_least != (name != "rel_l2"))
                or (builtin and (bound < 0 or (name in AGREEMENTS and bound > 1)))):
            raise OptionError(f"{_USAGE}, got '{text}'")
        return cls(name, bound, at_least)

    @property
    def builtin(self) -> bool:
        return self.measure in MEASURES

    @property
    def key(self) -> str:
        """The key of `HeldOut.measure`'s result this tolerance is checked against."""
        if not self.builtin:
            return f"metric_{self.measure}"
        return f"{self.measure}_{'upper' if self.measure == 'rel_l2' else 'lower'}_bound"

    def met(self, measured: dict[str, float | None]) -> bool:
        """Whether the confidence bound of the measure (`measured` from `HeldOut.measure`) is within it."""
        value = measured.get(self.key)
        if value is None:
            return False
        return value >= self.bound if self.at_least else value <= self.bound

    def __str__(self) -> str:
        sign = "=" if self.builtin or self.at_least else "<="
        return f"{self.measure}{sign}{self.bound:g}"


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
    candidates with bounds at `confidence`; with `metric`, every output is kept for it."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, *, batch_size: int = 32, max_bytes: int = MAX_BYTES,
                 confidence: float = 0.0, metric: Metric | Callable[..., Any] | None = None,
                 ctc_blank: int = 0) -> None:
        if not 0.0 <= confidence < 1.0:
            raise OptionError(f"confidence must be in [0, 1), got {confidence}")
        self.confidence, self.metric, self.ctc_blank = confidence, as_metric(metric), ctc_blank
        session = make_session(model)
        self.output = session.get_outputs()[0].name
        self.names = [o.name for o in session.get_outputs()] if self.metric is not None else [self.output]
        self.feeds, self.outputs, self.counts = self._keep(session, data, batch_size, max_bytes)
        self.reference = [outputs[self.output] for outputs in self.outputs]
        self.samples = sum(self.counts)
        shape = self.reference[0].shape if self.reference else ()
        self.kind = output_kinds(model, {self.output: shape}, self.counts[0] if self.counts else None)[self.output]
        compared = [compare(r, r, self.kind, ctc_blank) for r in self.reference]
        rows, sequences = sum(int(c.rows.sum()) for c in compared), sum(c.rows.size for c in compared)
        self.rows = rows if self.kind.kind == "classes" else 0
        self.positions, self.sequences = (rows, sequences) if self.kind.kind == "sequence" else (0, 0)
        self.metric_keys: list[str] = []
        if self.metric is not None and self.feeds:  # what the metric returns, known before any candidate runs
            self.metric_keys = sorted(self.metric(self.outputs[0], self.outputs[0], self.feeds[0]))

    def _keep(self, session: Any, data: Dataset, batch_size: int,
              max_bytes: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[int]]:
        """(feeds, reference outputs by name, samples per feed) of the batches that fit in `max_bytes`."""
        feeds, kept_outputs, counts = [], [], []
        kept = 0
        for feed in data.batches(batch_size):
            outputs = dict(zip(self.names, session.run(self.names, feed)))
            kept += sum(v.nbytes for v in outputs.values()) + sum(v.nbytes for v in feed.values())
            if kept > max_bytes and feeds:
                break
            feeds.append(feed)
            kept_outputs.append(outputs)
            counts.append(data.feed_samples(feed))
        return feeds, kept_outputs, counts

    @property
    def classifier(self) -> bool:
        return self.kind.kind == "classes"

    def trials(self, measure: str) -> int:
        """The arg-max rows behind an agreement measure (0 for any other measure)."""
        return {"top1": self.rows, "position": self.positions, "sequence": self.sequences}.get(measure, 0)

    def default_tolerance(self) -> Tolerance:
        """top1=0.99 for class scores, sequence=0.99 for sequences, else rel_l2=0.01."""
        return {"classes": Tolerance("top1", 0.99), "sequence": Tolerance("sequence", 0.99)}.get(
            self.kind.kind, Tolerance("rel_l2", 0.01))

    def require(self, tolerance: Tolerance) -> None:
        """Refuse a tolerance this check cannot measure: an agreement the output's kind has no meaning for,
        or a key the metric does not return."""
        wants = {"top1": "classes", "position": "sequence", "sequence": "sequence"}.get(tolerance.measure)
        if wants is not None and wants != self.kind.kind:
            shape = "class scores [N, C]" if wants == "classes" else "sequences [N, T, C]"
            usable = ("top1=A, " if self.kind.kind == "classes" else "sequence=A, position=A, "
                      if self.kind.kind == "sequence" else "")
            raise OptionError(f"--tolerance {tolerance} applies to {shape}; output '{self.output}' is read as "
                              f"{self.kind.kind}: use {usable}rel_l2=E or a key of --metric")
        if not tolerance.builtin and tolerance.measure not in self.metric_keys:
            raise OptionError(f"--tolerance {tolerance} names no built-in measure ({', '.join(MEASURES)}) and "
                              + (f"no key metric {self.metric} returns ({', '.join(self.metric_keys)})"
                                 if self.metric is not None else "no --metric is given"))

    def measure(self, candidate: onnx.ModelProto) -> dict[str, Any]:
        """The candidate against the reference: "rel_l2" with its bound "rel_l2_upper_bound"; "top1" with
        "top1_lower_bound" and "disagreements" (rows whose arg-max moved), None unless class scores;
        for a sequence "position", "sequence", their lower bounds and "sequence_disagreements"; with a
        metric, its values as "metric_<key>"."""
        session = make_session(candidate)
        names = {i.name for i in session.get_inputs()}
        errors, norms, counts = [], [], []
        mean = MetricMean(self.metric) if self.metric is not None else None
        for feed, outputs, samples in zip(self.feeds, self.outputs, self.counts):
            got_all = dict(zip(self.names, session.run(self.names, {k: v for k, v in feed.items() if k in names})))
            want, got = outputs[self.output], got_all[self.output]
            reference, difference = want.astype(np.float64), got.astype(np.float64) - want.astype(np.float64)
            if want.ndim:  # samples first (a time-major sequence holds them on axis 1)
                reference, difference = (np.moveaxis(value, self.kind.batch_axis, 0)
                                         for value in (reference, difference))
            per_sample = (reference.shape[0], -1) if reference.ndim else (1, -1)
            errors.append(np.sum((difference ** 2).reshape(per_sample), axis=1))
            norms.append(np.sum((reference ** 2).reshape(per_sample), axis=1))
            counts.append(compare(want, got, self.kind, self.ctc_blank))
            if mean is not None:
                mean.add(outputs, got_all, feed, samples)
        error, norm = np.concatenate(errors), np.concatenate(norms)
        ratio = float(error.sum() / norm.sum()) if norm.sum() > 0 else float(error.sum())
        measured: dict[str, Any] = {"top1": None, "rel_l2": math.sqrt(ratio), "top1_lower_bound": None,
                                    "rel_l2_upper_bound": rel_l2_upper(error, norm, self.confidence)}
        measured.update(self._agreements(counts))
        if mean is not None:
            measured.update({f"metric_{key}": value for key, value in mean.summary().items()})
        return measured

    def _agreements(self, counts: list[Counts]) -> dict[str, Any]:
        """Agreement measures and their lower bounds from the per-sample counts of every batch."""
        if self.kind.kind == "values":
            return {}
        rows = np.concatenate([c.rows for c in counts])
        moved = rows - np.concatenate([c.same for c in counts])
        agreement, bound = 1.0 - moved.sum() / rows.sum(), agreement_lower(moved, rows, self.confidence)
        if self.kind.kind == "classes":
            return {"top1": agreement, "disagreements": int(moved.sum()), "top1_lower_bound": bound}
        wrong = (~np.concatenate([c.sequence_same for c in counts if c.sequence_same is not None])).astype(np.int64)
        return {"position": agreement, "position_lower_bound": bound, "sequence": 1.0 - wrong.mean(),
                "sequence_disagreements": int(wrong.sum()),
                "sequence_lower_bound": agreement_lower(wrong, np.ones_like(wrong), self.confidence)}

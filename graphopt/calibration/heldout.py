"""Fidelity of candidate models against a reference on held-out data, for passes that search a setting
against a tolerance (ExPrune's thresholds).

The reference's first output is computed once and kept (bounded by `max_samples` samples); each
candidate runs on the same feeds and is compared with graphopt.evaluate's measures: top-1 agreement
(outputs whose last axis has more than one entry: class scores) and relative L2 error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.session import make_session
from graphopt.errors import OptionError

MEASURES = ("top1", "rel_l2")


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
        value = measured[self.measure]
        if value is None:
            return False
        return value >= self.bound if self.measure == "top1" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.measure}={self.bound:g}"


class HeldOut:
    """Reference outputs of `model` on `data` (at most `max_samples` samples), to score candidates."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, *, batch_size: int = 32, max_samples: int = 512) -> None:
        session = make_session(model)
        self.output = session.get_outputs()[0].name
        self.feeds: list[dict[str, np.ndarray]] = []
        self.reference: list[np.ndarray] = []
        taken = 0
        for feed in data.batches(batch_size):
            if taken >= max_samples:
                break
            self.feeds.append(feed)
            self.reference.append(session.run([self.output], feed)[0])
            taken += next((v.shape[0] for v in feed.values() if v.ndim), 1)
        self.samples = taken
        self.rows = sum(int(np.prod(r.shape[:-1])) for r in self.reference) if self.classifier else 0

    @property
    def classifier(self) -> bool:
        return bool(self.reference) and self.reference[0].ndim >= 2 and self.reference[0].shape[-1] > 1

    def default_tolerance(self) -> Tolerance:
        return Tolerance("top1", 0.99) if self.classifier else Tolerance("rel_l2", 0.01)

    def measure(self, candidate: onnx.ModelProto) -> dict[str, float | None]:
        """{"top1": agreement or None, "rel_l2": error} of the candidate's first output."""
        session = make_session(candidate)
        names = {i.name for i in session.get_inputs()}
        same = rows = 0
        diff_sq = ref_sq = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            got = session.run([self.output], {k: v for k, v in feed.items() if k in names})[0].astype(np.float64)
            want = reference.astype(np.float64)
            diff_sq += float(np.sum((got - want) ** 2))
            ref_sq += float(np.sum(want ** 2))
            if self.classifier:
                same += int(np.sum(np.argmax(got, axis=-1) == np.argmax(want, axis=-1)))
                rows += int(np.prod(want.shape[:-1]))
        rel = float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else float(np.sqrt(diff_sq))
        return {"top1": same / rows if rows else None, "rel_l2": rel}

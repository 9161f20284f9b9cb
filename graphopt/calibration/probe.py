"""Probes: how far a candidate model's outputs move from a reference's on a few calibration samples.

`OutputProbe(reference, data, samples)` runs the reference once over the first `samples` calibration
samples and keeps its float outputs; `error(candidate)` runs a candidate over the same feeds and returns
Σ‖y − ŷ‖² / Σ‖y‖² over every float output the two share (0: identical outputs). Budgets that weigh a cut
by its effect on the model's output (SNP's `--budget-by sensitivity`) ask for one probe per group.
Sessions run without graph optimisations, like every reference run here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.session import make_session
from graphopt.errors import DataError


class OutputProbe:
    def __init__(self, reference: onnx.ModelProto, data: Dataset, *, samples: int = 64, batch_size: int = 32,
                 device: str = "cpu", threads: int = 0) -> None:
        self.device, self.threads = device, threads
        self.feeds: list[dict[str, np.ndarray]] = []
        taken = 0
        for feed in data.batches(min(batch_size, samples)):
            self.feeds.append(feed)
            taken += data.feed_samples(feed)
            if taken >= samples:
                break
        self.samples = taken
        if not self.feeds:
            raise DataError("the calibration data holds no samples to probe the model's outputs with")
        session = make_session(reference, device=device, threads=threads)
        self.names = [o.name for o in session.get_outputs()
                      if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")]
        if not self.names:
            raise DataError("the model has no floating-point output to measure a probe's error on")
        self.reference = [[np.asarray(v, dtype=np.float64) for v in session.run(self.names, feed)]
                          for feed in self.feeds]
        self.energy = sum(float(np.square(v).sum()) for outputs in self.reference for v in outputs)

    def error(self, candidate: onnx.ModelProto) -> float:
        """Relative squared error of `candidate`'s outputs against the reference's on the probe feeds."""
        session = make_session(candidate, device=self.device, threads=self.threads)
        accepted = {i.name for i in session.get_inputs()}
        total = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            found = session.run(self.names, {k: v for k, v in feed.items() if k in accepted})
            total += sum(float(np.square(np.asarray(f, dtype=np.float64) - r).sum())
                         for f, r in zip(found, reference))
        return total / max(self.energy, 1e-300)

    def describe(self) -> dict[str, Any]:
        return {"samples": self.samples, "outputs": self.names}

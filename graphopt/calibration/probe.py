"""Probes: how far a candidate model's outputs move from a reference's on a few calibration samples.

`OutputProbe(reference, data, samples)` runs the reference once over the first `samples` calibration
samples and keeps its outputs; `measure(candidate)` runs a candidate over the same feeds and returns
- `output_error`: the mean over the float outputs the two share of each output's relative squared error
  Σ‖y − ŷ‖² / Σ‖y‖² (0: identical outputs). Each output counts alike whatever its scale: a model that
  writes boxes in pixels beside scores in [0, 1] as two outputs has both weighed. Within one output the
  error is dominated by its largest values (boxes and scores in one tensor: the boxes); a user's metric
  says what matters there;
- `metric_change`, with a user's `metric` (graphopt.calibration.metric): |m(reference, reference) −
  m(reference, candidate)| of its key `key` (the metric's only key when not named), each averaged over
  the feeds weighted by samples. A change either way counts: the probe asks how far the candidate moves.
Budgets that weigh a cut by its effect on the model's output (SNP's `--budget-by sensitivity`) ask for one
probe per group. Sessions run without graph optimisations, like every reference run here.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.metric import Metric, MetricMean
from graphopt.calibration.session import make_session
from graphopt.errors import DataError, MetricError

FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")


class OutputProbe:
    def __init__(self, reference: onnx.ModelProto, data: Dataset, *, samples: int = 64, batch_size: int = 32,
                 device: str = "cpu", threads: int = 0, metric: Metric | None = None, key: str | None = None) -> None:
        self.device, self.threads, self.metric = device, threads, metric
        self.feeds: list[dict[str, np.ndarray]] = []
        self.counts: list[int] = []
        taken = 0
        for feed in data.batches(min(batch_size, samples)):
            self.feeds.append(feed)
            self.counts.append(data.feed_samples(feed))
            taken += self.counts[-1]
            if taken >= samples:
                break
        if not self.feeds:
            raise DataError("the calibration data holds no samples to probe the model's outputs with")
        session = make_session(reference, device=device, threads=threads)
        self.floats = [o.name for o in session.get_outputs() if o.type in FLOAT_TYPES]
        if not self.floats:
            raise DataError("the model has no floating-point output to measure a probe's error on")
        self.names = [o.name for o in session.get_outputs()] if metric is not None else self.floats
        self.reference = [dict(zip(self.names, session.run(self.names, feed), strict=True)) for feed in self.feeds]
        self.energy = {name: sum(float(np.square(run[name], dtype=np.float64).sum()) for run in self.reference)
                       for name in self.floats}
        self.key, self.baseline = None, None
        if metric is not None:
            self.key, self.baseline = self._baseline(metric, key)

    def _baseline(self, metric: Metric, key: str | None) -> tuple[str, float]:
        """The metric key the probe weighs and its value on the reference against itself."""
        values = self._metric_mean(self.reference)
        if key is None and len(values) != 1:
            raise MetricError(f"metric {metric.name} returns {len(values)} keys ({', '.join(sorted(values))}): name "
                              f"the one the sensitivity probes weigh with --probe-key KEY")
        key = key if key is not None else next(iter(values))
        if key not in values:
            raise MetricError(f"--probe-key {key}: metric {metric.name} returns {', '.join(sorted(values))}")
        return key, values[key]

    def _metric_mean(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        assert self.metric is not None
        mean = MetricMean(self.metric)
        for feed, count, reference, found in zip(self.feeds, self.counts, self.reference, outputs):
            mean.add(reference, found, feed, count)
        return mean.summary()

    def measure(self, candidate: onnx.ModelProto) -> dict[str, float]:
        """`output_error` and, with a metric, `metric_change` of `candidate` on the probe feeds."""
        session = make_session(candidate, device=self.device, threads=self.threads)
        accepted = {i.name for i in session.get_inputs()}
        outputs = [dict(zip(self.names, session.run(self.names, {k: v for k, v in feed.items() if k in accepted}),
                            strict=True)) for feed in self.feeds]
        errors = []
        for name in self.floats:
            total = sum(float(np.square(np.asarray(found[name], dtype=np.float64) - reference[name]).sum())
                        for found, reference in zip(outputs, self.reference))
            errors.append(total / max(self.energy[name], 1e-300))
        found = {"output_error": float(np.mean(errors))}
        if self.metric is not None:
            found["metric_change"] = abs(self._metric_mean(outputs)[self.key] - self.baseline)
        return found

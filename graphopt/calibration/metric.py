"""A user's own fidelity metric: `metric(reference_outputs, candidate_outputs, inputs) -> dict[str, float]`.

The three arguments are dicts of numpy arrays for one batch: the reference's outputs and the candidate's
(by output name, every output both models have) and the feed both ran on. The metric returns named
numbers (say {"f1": 0.93}); higher or lower may be better, as the metric's author decides
(graphopt.calibration.heldout's `Tolerance` reads `name=V` as name >= V, and takes `name<=V` too).

Over several batches the values are averaged, weighted by the batch's samples (`MetricMean`): exact for a
metric that is itself a mean over samples (an accuracy, an agreement), an average of per-batch values
for one that is not (an F1 over a set of detections), which a larger batch size brings closer to the
whole-set value.

On the command line a metric is named `module:function`; the module is imported from `sys.path` and
the current directory (`load_metric`). A spec that does not name a callable, a metric that raises and
one that returns anything but a mapping of names to numbers are refused with one line naming it
(`MetricError`).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from graphopt.errors import MetricError

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    """A named metric function; calling it checks what it returns."""

    name: str
    function: Callable[[Arrays, Arrays, Arrays], Mapping[str, Any]]

    def __call__(self, reference: Arrays, candidate: Arrays, inputs: Arrays) -> dict[str, float]:
        try:
            values = self.function(reference, candidate, inputs)
        except Exception as exc:  # the user's code failing is bad input here, not a bug of graphopt
            raise MetricError(f"metric {self.name} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(values, Mapping) or not values:
            raise MetricError(f"metric {self.name} must return a non-empty dict of name -> number, "
                              f"got {type(values).__name__}")
        try:
            return {str(key): float(value) for key, value in values.items()}
        except (TypeError, ValueError) as exc:
            raise MetricError(f"metric {self.name} must return numbers: {exc}") from exc

    def __str__(self) -> str:
        return self.name


def load_metric(spec: str) -> Metric:
    """The function `module:function` names, the module imported from sys.path and the current directory."""
    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute:
        raise MetricError(f"--metric expects MODULE:FUNCTION (a Python module on the path or in the current "
                          f"directory), got '{spec}'")
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing module or one that fails to import: the user's spec is wrong
        raise MetricError(f"--metric {spec}: cannot import module '{module_name}': {type(exc).__name__}: {exc}") \
            from None
    finally:
        if added and here in sys.path:
            sys.path.remove(here)
    function: Any = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise MetricError(f"--metric {spec}: module '{module_name}' has no function '{attribute}'")
    return Metric(spec, function)


def as_metric(value: Metric | Callable[..., Any] | str | None) -> Metric | None:
    """A metric from what the API accepts: a `Metric`, a callable (named by its module and name), a
    `module:function` spec, or None."""
    if value is None or isinstance(value, Metric):
        return value
    if isinstance(value, str):
        return load_metric(value)
    if not callable(value):
        raise MetricError(f"metric must be a callable or 'module:function', got {type(value).__name__}")
    name = getattr(value, "__qualname__", None) or type(value).__name__
    return Metric(f"{getattr(value, '__module__', None) or '?'}:{name}", value)


@dataclass
class MetricMean:
    """The sample-weighted mean of a metric's values over batches (module docstring)."""

    metric: Metric
    sums: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def add(self, reference: Arrays, candidate: Arrays, inputs: Arrays, samples: int) -> None:
        values = self.metric(reference, candidate, inputs)
        if self.sums and set(values) != set(self.sums):
            raise MetricError(f"metric {self.metric.name} returned keys {sorted(values)} after {sorted(self.sums)}")
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * samples
        self.samples += samples

    def summary(self) -> dict[str, float]:
        return {key: total / self.samples for key, total in self.sums.items()} if self.samples else {}

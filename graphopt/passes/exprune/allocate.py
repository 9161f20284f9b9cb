"""Per-layer false-negative rates for ExPrune: a path of allocations ordered on the fit samples, then certified
on the held-out ones (graphopt.passes.exprune.search).

One rate for every layer spends the error budget where it buys little: layers differ in how much a missed
positive unit costs the output and in how many MACs a higher rate skips. Per layer l and grid rate r (and, under
`--exprune-rule auto`, per rule: the threshold rule's one test and the sequential rule's doubling checkpoints
are points of the same layer, so the hull picks each layer's rule with its rate):
- e_l(r): the squared relative L2 error of the model's first output when only layer l is replaced at rate r
  (the other layers dense), measured on at most CURVE_SAMPLES of the fit samples;
- s_l(r): the MACs layer l skips per sample at that rate (its skipped fraction on the fitted rows × its MACs).
Taking the errors as additive, the allocations that skip the most for their total error lie on the layers'
upper concave hulls of (e, s): the path starts with every layer at rate 0 and at each step moves the one layer
whose next hull point adds the most skipped MACs per unit of added error (the Lagrangian relaxation of
max Σ s_l subject to Σ e_l ≤ E, swept over E). Additivity is an assumption (errors of several layers interact);
the certification measures every allocation on the path as a whole model on the held-out samples, in path
order, and stops at the first one that misses the tolerance. The path depends on the fit samples only, so the
fixed-sequence argument of the uniform search holds unchanged: one bound at the confidence level covers the
whole scan.

Cost: at most CURVE_CANDIDATES candidate models on the curve samples (fewer grid rates per layer on deeper
models), then one per path step certified (at most layers × rates steps); more than MAX_LAYERS layers fall
back to one rate for all, and so does a model whose first step (every layer at rate 0) already misses the
tolerance (nothing could pass).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import onnx
from tqdm.auto import tqdm

from graphopt.calibration.data import Dataset
from graphopt.calibration.heldout import HeldOut

log = logging.getLogger(__name__)

CURVE_SAMPLES = 256     # fit samples the per-layer error curves are measured on, at most
CURVE_CANDIDATES = 64   # candidate models the curves cost, at most: fewer grid rates per layer on deep models
MAX_LAYERS = 16         # more layers than this: one rate for all (the curves would hold under 4 rates each)

Key = tuple[float, str | None]  # a false-negative rate and the rule held to (None: the one skipping most)
Rates = tuple[Key | None, ...]  # one per layer; None leaves a layer dense


@dataclass(frozen=True)
class Point:
    rate: float
    error: float    # squared relative L2 of the output with this layer alone at `rate`
    skipped: float  # MACs skipped per sample
    rule: str | None = None

    @property
    def key(self) -> Key:
        return self.rate, self.rule


def curve_grid(grid: Sequence[float], layers: int) -> list[float]:
    """The grid rates the curves are measured at: all of them while layers × rates stays within CURVE_CANDIDATES,
    else an evenly spread subset (rate 0 and the largest rate always in)."""
    count = max(2, min(len(grid), CURVE_CANDIDATES // max(1, layers)))
    picks = sorted({round(i * (len(grid) - 1) / (count - 1)) for i in range(count)})
    return [grid[i] for i in picks]


def layer_curves(model: onnx.ModelProto, data: Dataset, grid: Sequence[float], macs: Sequence[float],
                 build: Callable[[Rates], tuple[list[Any], onnx.ModelProto]], skipped_fraction: Callable[[Any], float],
                 batch_size: int, progress: bool, rules: Sequence[str | None] = (None,)) -> list[list[Point]]:
    """Per layer, its (rate, error, MACs skipped) at every grid rate and each of `rules` with the other layers
    dense."""
    total = data.num_samples or 0
    curve_data = data.split(CURVE_SAMPLES / total, seed=0)[1] if total > CURVE_SAMPLES else data
    check = HeldOut(model, curve_data, batch_size=batch_size)
    curves = []
    layers = len(macs)
    bar = tqdm(total=layers * len(grid) * len(rules), desc="exprune layer curves", disable=not progress, leave=False)
    for index in range(layers):
        points = []
        for rule, rate in ((rule, rate) for rule in rules for rate in grid):
            rates: Rates = tuple((rate, rule) if i == index else None for i in range(layers))
            choices, candidate = build(rates)
            error = check.measure(candidate)["rel_l2"] ** 2
            points.append(Point(rate, error, skipped_fraction(choices[index]) * macs[index], rule))
            bar.update()
        curves.append(points)
    bar.close()
    return curves


def upper_hull(points: list[Point]) -> list[Point]:
    """The points an allocation can use: starting at rate 0 (of several rules, the one skipping most), those on
    the upper concave hull of (error, skipped) that skip more than every point of lower error."""
    start = max((p for p in points if p.rate == points[0].rate), key=lambda p: p.skipped)
    frontier = [start]
    for point in sorted((p for p in points if p is not start), key=lambda p: (p.error, -p.skipped)):
        if point.skipped <= frontier[-1].skipped:
            continue
        frontier.append(point)
    hull: list[Point] = []
    for point in frontier:  # monotone chain: drop a middle point below the chord of its neighbours
        while len(hull) >= 2 and _turns_up(hull[-2], hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _turns_up(a: Point, b: Point, c: Point) -> bool:
    """Whether b lies on or below the chord from a to c (so the hull skips it)."""
    return (b.skipped - a.skipped) * (c.error - a.error) <= (c.skipped - a.skipped) * (b.error - a.error)


def allocation_path(curves: list[list[Point]]) -> list[Rates]:
    """Allocations in order of increasing skipped MACs: each step moves one layer to its next hull point, the
    one adding the most skipped MACs per unit of added error (the first step: every layer at rate 0)."""
    hulls = [upper_hull(points) for points in curves]
    position = [0] * len(hulls)
    path: list[Rates] = [tuple(hull[0].key for hull in hulls)]
    while True:
        best, best_gain = None, -1.0
        for index, hull in enumerate(hulls):
            if position[index] + 1 >= len(hull):
                continue
            here, there = hull[position[index]], hull[position[index] + 1]
            gain = (there.skipped - here.skipped) / max(there.error - here.error, 1e-18)
            if gain > best_gain:
                best, best_gain = index, gain
        if best is None:
            return path
        position[best] += 1
        path.append(tuple(hull[p].key for hull, p in zip(hulls, position)))

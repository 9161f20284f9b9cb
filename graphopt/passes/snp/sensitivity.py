"""Sensitivity-aware SNP budgets: each group's cut weighed by its measured effect on the model's output.

The uniform budget keeps the same fraction of every group's unique variance. Groups differ in how much of
that variance the output needs (a group deep in a residual stream, or read by the classifier, against one
whose errors later layers wash out), so `--budget-by sensitivity` probes each prunable group once: the
group alone is cut to the count the uniform budget gives it (deeper where that removes under
`MIN_PROBE_LOSS` of its unique variance), reconstructed as SNP does, and the relative squared error of the
model's outputs on `PROBE_SAMPLES` calibration samples (graphopt.calibration.probe; with `--metric`, the
change of the metric's `--probe-key` instead) divided by the fraction L of the group's unique variance the
cut removed gives s_g, output damage per unit of lost variance.

The allocation then minimises Σ s_g·L_g(k_g) under the MAC or latency target: with τ a global damage
threshold, group g keeps the shortest prefix of its order whose lost variance satisfies s_g·L_g ≤ τ (the
uniform cut is s_g = 1 for every group), τ is the smallest threshold whose counts meet the target, and what
the target leaves is spent on the units with the largest s_g × variance (graphopt.passes.snp.plan.fill).
Cost: one graph copy, export, onnxruntime session and run over the probe samples per prunable group.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from graphopt.passes.channels.budget import CostModel, RoundTo
from graphopt.passes.snp.plan import Ordering, counts

PROBE_SAMPLES = 32
MIN_PROBE_LOSS = 0.01  # a probe removes at least this fraction of its group's unique variance
_FLOOR = 1e-9  # relative to the largest sensitivity: a group whose cut changed nothing still ranks


def probe_count(ordering: Ordering, planned: int, run: int = 1) -> int:
    """Where group's probe cuts: the planned count, or deeper until it removes MIN_PROBE_LOSS of the variance;
    a group whose channels go in whole runs of `run` cuts whole runs (a count that is a multiple of it)."""
    cumulative = np.cumsum(ordering.fraction)
    deepest = int(np.searchsorted(cumulative, 1.0 - MIN_PROBE_LOSS)) + 1
    count = min(planned, deepest, ordering.order.size - 1)
    return max(run, count // run * run)


def lost_variance(ordering: Ordering, count: int) -> float:
    return float(max(0.0, 1.0 - ordering.fraction[:count].sum()))


def sensitivities(ranked: dict[int, Ordering], planned: dict[int, int],
                  measure_cut: Callable[[int, int], dict[str, float]], progress: bool = False,
                  runs: dict[int, int] | None = None) -> dict[int, dict[str, float]]:
    """Per group: the probe's count, lost variance, what the probe measured (`output_error`, and
    `metric_change` with a user's metric) and the sensitivity s = damage / lost variance, the damage being the
    metric's change where measured, else the output error. `measure_cut(root, count)` cuts group `root` alone
    to `count` units and returns the probe's measures (graphopt.calibration.probe); `progress` shows a bar;
    `runs` gives the groups whose channels go in whole runs their run."""
    found = {}
    for root, ordering in tqdm(ranked.items(), desc="snp sensitivity probes", unit="group", disable=not progress,
                               leave=False):
        run = (runs or {}).get(root, 1)
        if ordering.order.size < 2 * run:
            continue
        count = probe_count(ordering, planned.get(root, ordering.order.size), run)
        lost = lost_variance(ordering, count)
        measured = {key: float(value) for key, value in measure_cut(root, count).items()}
        damage = measured.get("metric_change", measured["output_error"])
        found[root] = {"probe_count": count, "lost_variance": lost, **measured,
                       "sensitivity": damage / max(lost, 1e-12)}
    return found


def scales(found: dict[int, dict[str, float]], ranked: dict[int, Ordering]) -> dict[int, float]:
    """The weight of each group's lost variance (groups without a probe take the median sensitivity).
    Groups whose cut left a user's metric unchanged (a metric counted over few samples moves in steps) rank
    among themselves by their output error per lost variance, scaled so the most sensitive of them weighs
    what the least sensitive group that moved the metric weighs; when no cut moved it, the output error
    ranks every group."""
    values = _tied_by_output_error(found)
    if not values or max(values.values()) <= 0.0:
        return {root: 1.0 for root in ranked}
    floor, median = _FLOOR * max(values.values()), float(np.median(list(values.values())))
    return {root: max(values[root], floor) if root in values else max(median, floor) for root in ranked}


def _tied_by_output_error(found: dict[int, dict[str, float]]) -> dict[int, float]:
    """Each probed group's sensitivity, ties at zero metric change broken by the output error (`scales`)."""
    values = {root: entry["sensitivity"] for root, entry in found.items()}
    by_output = {root: entry["output_error"] / max(entry["lost_variance"], 1e-12) for root, entry in found.items()}
    unmoved = [root for root, entry in found.items() if "metric_change" in entry and values[root] <= 0.0]
    moved = [value for value in values.values() if value > 0.0]
    if not unmoved:
        return values
    if not moved:
        return by_output
    top = max(by_output[root] for root in unmoved)
    for root in unmoved:
        values[root] = min(moved) * by_output[root] / top if top > 0.0 else 0.0
    return values


def damage_counts(ranked: dict[int, Ordering], scale: dict[int, float], tau: float,
                  round_to: RoundTo) -> dict[int, int]:
    """Units each group keeps so that its weighted lost variance s_g·L_g stays within `tau`."""
    return {root: counts({root: ordering}, 1.0 - tau / scale[root], round_to)[root]
            for root, ordering in ranked.items()}


def damage_for_target(ranked: dict[int, Ordering], scale: dict[int, float], model: CostModel, target: float,
                      round_to: RoundTo) -> float:
    """The smallest damage threshold whose counts' cost (MACs or predicted latency) is within the target."""
    budget = target * model.total
    high = max(scale.values())
    if model.cost(damage_counts(ranked, scale, high, round_to)) > budget:
        return high
    low = 0.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if model.cost(damage_counts(ranked, scale, middle, round_to)) <= budget:
            high = middle
        else:
            low = middle
    return high

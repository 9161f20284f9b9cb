"""SNP planning: per-group unit orderings and how many units each group keeps.

A group's covariance sums, over the tensors where linear consumers read it and over each place the
group occurs in them (heads, flattened blocks), the covariance of its units as the consumer reads them
(a zero-padded Conv also reads the padding's zeros: graphopt.passes.snp.padding); its readout (for the
output criterion) sums WᵀW of those consumers the same way. `orderings` ranks the units
(graphopt.passes.snp.maths; a group whose channels go in whole runs, run by run) and normalises the LDLᵀ
variances D to fractions of the group's unique variance. Budgets: `counts(V)` keeps, in every group, the
shortest prefix retaining a fraction V (a tail adding less than `REDUNDANT` is redundant, so V = 1 drops
exactly the units affine in the others); `variance_for_target` bisects V for a MAC or latency target (a
budget cost model) and `fill` spends what is left of the budget on the groups whose next units add the most
variance. `history_entry` records a group's cut for the report: each removed unit's share of the group's
unique variance, and the cut that removed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.groups import Analysis, Group, Site
from graphopt.calibration.stats import TensorStats
from graphopt.passes.base import PassResult
from graphopt.passes.channels.budget import CostModel, RoundTo, multiple_of, round_up
from graphopt.passes.channels.engine import removal
from graphopt.passes.channels.reduction import weights
from graphopt.passes.snp.maths import ldl_diagonal, output_order, run_order, zca_order
from graphopt.passes.snp.padding import inside_fraction, read_moments

REDUNDANT = 1e-6  # a tail adding less than this fraction of a group's unique variance is redundant


@dataclass
class Ordering:
    order: np.ndarray       # unit indices, most important first
    fraction: np.ndarray    # D in that order, normalised to sum 1


def unit_counts(orderings: dict[int, Ordering]) -> dict[int, int]:
    """How many units each ordered group has, by root."""
    return {root: ordering.order.size for root, ordering in orderings.items()}


def occurrences(a: Analysis, state: ChannelState, root: int) -> list[np.ndarray]:
    """Feature positions of group `root` along `state`'s axis, one array per occurrence."""
    found, offset = [], 0
    for leaf in a.atoms.leaves(state.atoms):
        size = a.atoms.sizes[leaf]
        if a.atoms.find(leaf) == root:
            channels = offset + np.arange(size)
            found.extend(channels * state.factor + k for k in range(state.factor))
        offset += size
    return found


def _readout(site: Site, features: int) -> np.ndarray:
    """WᵀW over the consumer's outputs and taps, features x features (a reduction's W is one row; a grouped
    Conv's is block diagonal, group k's outputs reading the k-th block of its input)."""
    if site.kind == "reduce":
        row = weights(site, features)
        return np.outer(row, row)
    weight = np.asarray(site.node.inputs[site.index].values, dtype=np.float64)
    rows = np.moveaxis(weight, site.axis, -1).reshape(-1, weight.shape[site.axis])
    if site.groups == 1:
        return rows.T @ rows
    readout, width = np.zeros((features, features)), rows.shape[1]
    for k, block in enumerate(np.split(rows, site.groups)):
        readout[k * width:(k + 1) * width, k * width:(k + 1) * width] = block.T @ block
    return readout


def read_places(a: Analysis, site: Site, root: int) -> list[np.ndarray]:
    """The positions of group `root` in the tensor `site` reads, one array per occurrence; a grouped
    consumer's weight holds one piece, read by group k at offset k times the piece's width."""
    found = occurrences(a, site.state, root)
    width = a.size(site.state) * site.state.factor
    return [positions + k * width for k in range(site.groups) for positions in found]


def _consumer_places(a: Analysis, groups: list[Group], consumers: list[Site],
                     stats: dict[str, TensorStats]) -> list[tuple[Site, list[tuple[int, np.ndarray]]]]:
    """Each consumer with statistics, with the (group, feature positions) it reads."""
    roots = [g.root for g in groups]
    found = []
    for site in consumers:
        places = [(root, positions) for root in roots for positions in read_places(a, site, root)]
        if site.reads.name in stats and places:
            found.append((site, places))
    return found


def _group_moments(a: Analysis, groups: list[Group], consumers: list[Site], stats: dict[str, TensorStats],
                   criterion: str) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Per group: its covariance and (for the output criterion) readout summed over the consumers that read
    it, yielded as soon as its last consumer is read. Each consumer's moments are formed once, however many
    groups it reads (forming them per group and consumer made the planning quadratic in the layer count),
    and only the groups whose consumers are still being read hold their sums (wide layers: one or two
    C x C matrices at a time, not one per group)."""
    sizes = {g.root: g.size for g in groups}
    reading = _consumer_places(a, groups, consumers, stats)
    last = {root: index for index, (_, places) in enumerate(reading) for root, _ in places}
    sums: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for index, (site, places) in enumerate(reading):
        full_cov, _ = read_moments(stats[site.reads.name], inside_fraction(a, site))
        full_readout = _readout(site, full_cov.shape[0]) if criterion == "output" else None
        for root, positions in places:
            size = sizes[root]
            cov, readout = sums.setdefault(root, (np.zeros((size, size)),
                                                  np.zeros((size, size)) if criterion == "output" else None))
            cov += full_cov[np.ix_(positions, positions)]
            if full_readout is not None:
                readout += full_readout[np.ix_(positions, positions)]
        del full_cov, full_readout
        for root in [root for root in sums if last[root] == index]:
            yield root, *sums.pop(root)


def orderings(a: Analysis, groups: list[Group], consumers: list[Site], stats: dict[str, TensorStats],
               criterion: str, result: PassResult) -> dict[int, Ordering]:
    found = {}
    runs = {group.root: group.granule for group in groups if group.granule > 1}
    for root, cov, readout in _group_moments(a, groups, consumers, stats, criterion):
        if not cov.any():
            continue
        if root in runs:
            order = run_order(cov, runs[root], readout)
        else:
            order = output_order(cov, readout) if criterion == "output" else zca_order(cov)
        added = ldl_diagonal(cov, order)
        found[root] = Ordering(order, added / max(float(added.sum()), 1e-300))
    for group in groups:
        if group.root not in found:
            producers = ", ".join(sorted({s.node.name for s in group.sites if s.role == "producer"}))
            result.skipped.append(f"group {group.root} ({group.size} channels, produced by {producers}): "
                                  "no linear consumer with statistics")
    return {group.root: found[group.root] for group in groups if group.root in found}


def counts(orderings: dict[int, Ordering], keep: float, round_to: RoundTo) -> dict[int, int]:
    """Units each group keeps to retain `keep` of its variance, rounded up to the group's multiple."""
    kept = {}
    for root, ordering in orderings.items():
        cumulative = np.cumsum(ordering.fraction)
        count = int(np.searchsorted(cumulative, keep - REDUNDANT)) + 1
        count = min(max(count, 1), ordering.order.size)
        kept[root] = round_up(count, ordering.order.size, multiple_of(round_to, root))
    return kept


def variance_for_target(orderings: dict[int, Ordering], model: CostModel, target: float,
                        round_to: RoundTo) -> float:
    """The largest global retained-variance cut whose cost (MACs or predicted latency) stays within the target."""
    budget = target * model.total
    if model.cost(counts(orderings, 0.0, round_to)) > budget:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if model.cost(counts(orderings, middle, round_to)) <= budget:
            low = middle
        else:
            high = middle
    return low


def fill(start: dict[int, int], orderings: dict[int, Ordering], model: CostModel, target: float,
          round_to: RoundTo, limit: int = 4096, scale: dict[int, float] | None = None) -> dict[int, int]:
    """Spend what the variance cut left of the budget: add, one step at a time, the next unit (or the
    group's multiple of units) of the group whose next units add the most variance (times the group's
    `scale`, graphopt.passes.snp.sensitivity), while the cost fits."""
    budget = target * model.total
    chosen = dict(start)
    for _ in range(limit):
        best, best_gain = None, 0.0
        for root, ordering in orderings.items():
            count = chosen[root]
            step = min(multiple_of(round_to, root), ordering.order.size - count)
            if step <= 0:
                continue
            gain = float(ordering.fraction[count:count + step].sum()) * (scale[root] if scale else 1.0)
            if gain > best_gain and model.cost({**chosen, root: count + step}) <= budget:
                best, best_gain = root, gain
        if best is None:
            break
        chosen[best] = min(orderings[best].order.size, chosen[best] + multiple_of(round_to, best))
    return chosen


def history_entry(by: str, group: Group, ordering: Ordering, count: int, criterion: str, **decision: Any) -> dict:
    """`group` keeps the first `count` units of `ordering`; scores are each unit's share of the group's
    unique variance (its LDL variance given the units ranked before it), `criterion` the ranking."""
    share = np.empty(ordering.order.size)
    share[ordering.order] = ordering.fraction
    return removal(group, by, ordering.order[:count], "unique_variance", share, ordering=criterion,
                   retained=float(ordering.fraction[:count].sum()), **decision)

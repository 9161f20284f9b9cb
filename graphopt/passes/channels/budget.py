"""Global channel budget: how many channels each group keeps to reach a MAC or latency target.

The budget is a cost model (`CostModel`: `total`, the unpruned cost, and `cost(counts)`): the exact
MACs below, or predicted latency (graphopt.passes.channels.latency). The solver only needs the cost
never to rise when channels are removed.

MACs of every Conv/ConvTranspose/Gemm/MatMul are bilinear in the kept fractions of its input and
output channel axes, so with k_g channels kept in group g the model's MACs are, exactly,
    MACs(k) = fixed + sum_nodes base_n * prod_{axes of n} (sum_g m_{a,g} k_g) / (sum_g m_{a,g} size_g)
where m_{a,g} counts how often group g's atoms appear along axis a. Importance scores are normalised
by their group mean so groups compare. All removable channels (every channel but the best of its
group) are laid in one global removal order: lowest normalised score first; ties go first to the
channel ranked lowest within its group relative to the group size (so equal scores prune groups
evenly, whatever their sizes), then by group and index. Removing the first m channels of that order
(rounding each group's count up to its multiple: `round_to`, one number for all groups or one per group;
a rounded group gives up its lowest channels a block at a time, so its channels are ordered by the mean
score of the block they leave with, and blocks go in order of the importance they take in all)
gives a cost that never rises with m; the smallest m within the target is found by bisection. What the
last step left of the budget is then spent greedily: removed channels are put back, most important
first, wherever they still fit.
Within a group, kept channels are always its highest-scoring ones (ties: lower index first); a group whose
channels go in whole runs (GroupNorm's groups) is scored run by run (`run_means`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.groups import Analysis


RoundTo = int | Mapping[int, int]


def multiple_of(round_to: RoundTo, root: int) -> int:
    """The multiple group `root` rounds its kept count to (at least 1)."""
    return max(int(round_to.get(root, 1) if isinstance(round_to, Mapping) else round_to), 1)


def round_up(count: int, size: int, multiple: int) -> int:
    """`count` rounded up to a multiple of `multiple`, at most the group's `size`."""
    return min(size, -(-count // multiple) * multiple) if multiple > 1 else count


class CostModel(Protocol):
    """What the solver budgets: `cost(counts)` never rises when a count falls; `total` is the unpruned cost."""

    total: float

    def cost(self, counts: dict[int, int]) -> float: ...


@dataclass
class Axis:
    """Features along one channel axis of a node: fixed + sum_g weights[g] * k_g (k_g: kept in group g)."""

    weights: dict[int, float]   # root -> multiplicity * factor
    fixed: float                 # features from atoms whose group is not pruned
    total: float

    def features(self, counts: dict[int, int]) -> float:
        return self.fixed + sum(w * counts[r] for r, w in self.weights.items())


def channel_axis(analysis: Analysis, state: ChannelState, prunable: set[int]) -> Axis:
    atoms = analysis.atoms
    weights: dict[int, float] = {}
    fixed = 0.0
    for leaf in atoms.leaves(state.atoms):
        root = atoms.find(leaf)
        if root in prunable:
            weights[root] = weights.get(root, 0.0) + state.factor
        else:
            fixed += atoms.sizes[leaf] * state.factor
    return Axis(weights, fixed, fixed + sum(w * atoms.sizes[r] for r, w in weights.items()))


def _axes(analysis: Analysis, prunable: set[int]) -> list[tuple[str, list[Axis], float]]:
    return [(term.node.name, [channel_axis(analysis, state, prunable) for state in term.states], term.share)
            for term in analysis.costs]


class MacModel:
    """Exact per-sample MACs as a function of the kept channel count per group."""

    def __init__(self, analysis: Analysis, per_node: dict[str, int], prunable: set[int]) -> None:
        self.total = float(sum(per_node.values()))
        terms = _axes(analysis, prunable)
        shares: dict[str, float] = {}
        for name, _, share in terms:  # a node may have several terms (an LSTM's input and recurrent products)
            shares[name] = shares.get(name, 0.0) + share
        self.fixed_nodes = {name: float(m) * (1.0 - shares.get(name, 0.0)) for name, m in per_node.items()
                            if shares.get(name, 0.0) < 1.0}
        self.fixed = float(sum(self.fixed_nodes.values()))
        self.terms = [(name, float(per_node.get(name, 0)) * share, axes) for name, axes, share in terms]

    def ratio(self, counts: dict[int, int]) -> float:
        return self.macs(counts) / self.total if self.total else 1.0

    def macs(self, counts: dict[int, int]) -> float:
        return self.scaled(counts, {})

    def removed_cost(self, counts: dict[int, int], removed: dict[str, float]) -> float:
        """MACs with `counts`, each named node's MACs further reduced by the fraction `removed[name]`."""
        return self.scaled(counts, {name: max(1.0 - fraction, 0.0) for name, fraction in removed.items()})

    def scaled(self, counts: dict[int, int], factors: dict[str, float]) -> float:
        """MACs with `counts` kept per group and each named node's MACs further times `factors[name]` (the
        share of it left by a structure outside the channel groups, such as attention heads)."""
        result = self.fixed if not factors else sum(m * factors.get(name, 1.0) for name, m in self.fixed_nodes.items())
        for name, base, axes in self.terms:
            base *= factors.get(name, 1.0)
            for axis in axes:
                if axis.total:
                    base *= axis.features(counts) / axis.total
            result += base
        return result

    cost = macs


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each channel within its group: 0 for the best (highest score, then lowest index)."""
    ranks = np.empty(scores.size, dtype=np.int64)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(scores.size)
    return ranks


def _block_means(normalised: np.ndarray, ranks: np.ndarray, multiple: int) -> np.ndarray:
    """Each channel's removal key: with a multiple above 1, the mean score of the block it leaves with (counts
    round up, so a group gives up its lowest channels a block at a time: first size mod multiple of them, or
    a whole multiple, then whole multiples), so that blocks go in order of the importance they take."""
    if multiple <= 1 or normalised.size == 0:
        return normalised
    size = normalised.size
    from_bottom = size - 1 - ranks  # 0 for the lowest-scoring channel
    first = size % multiple or multiple
    block = np.where(from_bottom < first, 0, 1 + (from_bottom - first) // multiple)
    sums = np.bincount(block, weights=normalised)
    return (sums / np.bincount(block))[block]


class _RemovalOrder:
    """Every removable channel of every group, in global removal order."""

    def __init__(self, scores: dict[int, np.ndarray], round_to: RoundTo) -> None:
        self.roots = sorted(scores)
        self.sizes = np.array([scores[r].size for r in self.roots], dtype=np.int64)
        self.multiples = np.array([multiple_of(round_to, r) for r in self.roots], dtype=np.int64)
        group, score, spread = [], [], []
        for position, root in enumerate(self.roots):
            values = scores[root].astype(np.float64)
            normalised = values / max(float(np.mean(values)), 1e-30) if values.size else values
            ranks = _ranks(normalised)
            removable = ranks > 0  # the best channel of a group always stays
            group.append(np.full(int(removable.sum()), position, dtype=np.int64))
            score.append(_block_means(normalised, ranks, int(self.multiples[position]))[removable])
            spread.append(-ranks[removable] / max(values.size, 1))
        self.group = np.concatenate(group) if group else np.zeros(0, dtype=np.int64)
        score_all = np.concatenate(score) if score else np.zeros(0)
        spread_all = np.concatenate(spread) if spread else np.zeros(0)
        self.order = np.lexsort((np.arange(self.group.size), spread_all, score_all))

    def __len__(self) -> int:
        return int(self.order.size)

    def counts(self, removed: int) -> dict[int, int]:
        gone = np.bincount(self.group[self.order[:removed]], minlength=len(self.roots))
        keep = np.minimum(self.sizes, -(-(self.sizes - gone) // self.multiples) * self.multiples)
        return {root: int(k) for root, k in zip(self.roots, keep)}


def minimum_counts(scores: dict[int, np.ndarray], round_to: RoundTo = 1) -> dict[int, int]:
    """The fewest channels every group may keep: one, rounded up to the group's multiple."""
    return {root: min(s.size, multiple_of(round_to, root)) for root, s in scores.items()}


def _fill(counts: dict[int, int], removal: _RemovalOrder, removed: int, model: CostModel,
          budget: float) -> dict[int, int]:
    """Put back removed channels, most important first, while the cost stays within the budget."""
    counts = dict(counts)
    full: set[int] = set()
    for index in removal.order[:removed][::-1]:
        position = int(removal.group[index])
        root = removal.roots[position]
        if root in full or counts[root] >= removal.sizes[position]:
            continue
        grown = min(int(removal.sizes[position]), counts[root] + int(removal.multiples[position]))
        if model.cost({**counts, root: grown}) <= budget:
            counts[root] = grown
        else:  # adding to this group only costs more once others have grown
            full.add(root)
    return counts


def choose_counts(scores: dict[int, np.ndarray], model: CostModel, target: float,
                  round_to: RoundTo = 1) -> dict[int, int]:
    """Kept channels per group so that the cost comes as close to `target` (a fraction of `model.total`)
    without exceeding it, when that is reachable; otherwise the fewest channels the constraints allow."""
    removal = _RemovalOrder(scores, round_to)
    budget = target * model.total
    if model.cost(removal.counts(0)) <= budget:
        return removal.counts(0)
    if model.cost(removal.counts(len(removal))) > budget:
        return minimum_counts(scores, round_to)
    low, high = 1, len(removal)  # invariant: the smallest removal within budget lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if model.cost(removal.counts(middle)) <= budget:
            high = middle
        else:
            low = middle + 1
    return _fill(removal.counts(low), removal, low, model, budget)


def restore_stats(counts: dict[int, int], sizes: Mapping[int, int], round_to: RoundTo, model: CostModel,
                  scale: float = 1.0) -> dict[str, float]:
    """`cheapest_restore`: what keeping one more step (the group's multiple) of the cheapest group cut below its
    size would add to the cost, as a fraction of `model.total` divided by `scale` (a pass that sees more MACs
    than the model given); nothing when no group is cut. A budget that lands further below its target than
    this step could not grow any group it cut without exceeding the target: it does not trade the importance
    it keeps for a ratio nearer the one asked."""
    base = model.cost(counts)
    steps = [model.cost({**counts, root: min(sizes[root], count + multiple_of(round_to, root))}) - base
             for root, count in counts.items() if root in sizes and count < sizes[root]]
    return {"cheapest_restore": min(steps) / model.total / scale} if steps and model.total else {}


def run_means(scores: np.ndarray, run: int) -> np.ndarray:
    """Each channel's score replaced by the mean over its run of `run` channels (a group whose channels go in
    whole runs: with counts that are multiples of the run, `top_indices` then keeps whole runs)."""
    if run <= 1:
        return scores
    return np.repeat(scores.reshape(-1, run).mean(axis=1), run)


def top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, in ascending index order (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")[:count]
    return np.sort(order)

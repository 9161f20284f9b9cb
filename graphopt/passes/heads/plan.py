"""Which attention heads matter: an output-aware greedy order per head block, and their cost.

For a block with merged-head features x (H heads of w features each) read by consumers y_c = x W_c, removing
a set P of heads and reconstructing them from the kept ones K in the least-squares sense
(x_P ≈ C x_K + c₀, folded into W_c by graphopt.passes.heads.prune) leaves, per consumer, the error
    E_c(P) = tr(W_{c,P}ᵀ S_P W_{c,P}),   S_P = Σ_PP − Σ_PK Σ_KK⁻¹ Σ_KP = (Σ⁻¹)_PP⁻¹
(S_P the covariance of x_P given x_K; Σ ridge-regularised as SNP's reconstructions are). Heads are
removed greedily, each time the one whose removal adds the least Σ_c E_c; the order is that choice
reversed (the most important head first). `fraction[i]` is what removing the i-th head of the order
adds, over E(all heads) = Σ_c tr(W_cᵀ Σ W_c), so fractions sum to 1 like SNP's unique-variance shares
and one retained-fraction cut compares heads with channel groups. This is the output projection's
error, not the model's: later layers can amplify or absorb it.

Cost: every head carries the same MACs (its columns of each projection, its rows of each consumer and
1/H of every per-head MatMul), so a block keeping k of H heads costs its nodes' MACs times 1 − (H − k)·share
per node; over a MAC model `WithHeads` applies that factor to each node's term, so heads and the channel groups
the same nodes read
(a narrowed residual stream) scale it together (for a latency model, per-head MACs are subtracted, turned
into milliseconds at the model's mean cost per MAC: an estimate, not a measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.analysis.heads import HeadBlock
from graphopt.calibration.stats import TensorStats
from graphopt.passes.channels.budget import CostModel, MacModel
from graphopt.passes.snp.maths import regularised
from graphopt.passes.snp.plan import Ordering


def head_positions(heads: np.ndarray, width: int) -> np.ndarray:
    """Feature positions of `heads` in a merged tensor of heads `width` features wide."""
    return (np.asarray(heads, dtype=np.int64)[:, None] * width + np.arange(width)).reshape(-1)


def _readouts(block: HeadBlock, stats: dict[str, TensorStats]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(Σ⁻¹, W with merged features as rows, width) per consumer with statistics."""
    found = []
    for consumer in block.consumers:
        if consumer.tensor not in stats:
            continue
        weight = np.moveaxis(np.asarray(consumer.node.inputs[consumer.index].values, dtype=np.float64),
                             consumer.axis, 0)
        cov = stats[consumer.tensor].covariance()
        found.append((cov, np.linalg.inv(regularised(cov)), weight.reshape(weight.shape[0], -1), consumer.width))
    return found


def _error(readouts: list, removed: list[int]) -> float:
    total = 0.0
    for _, precision, weight, width in readouts:
        pruned = head_positions(np.array(removed), width)
        rows = weight[pruned]
        total += float(np.trace(rows.T @ np.linalg.solve(precision[np.ix_(pruned, pruned)], rows)))
    return total


@dataclass
class UnitOrdering:
    """The block's units from most to least important (`ordering`, with each one's share), and the heads of
    each unit: `members[u]` (one head, or one head of every group under `HeadBlock.groups`)."""

    ordering: Ordering
    members: np.ndarray

    def kept_heads(self, count: int) -> np.ndarray:
        """The heads of the `count` most important units, sorted."""
        return np.sort(self.members[self.ordering.order[:count]].reshape(-1))


def head_ordering(block: HeadBlock, stats: dict[str, TensorStats]) -> UnitOrdering | None:
    """Units from most to least important for the consumers' error, with each one's share; None without
    statistics. With `groups` > 1 each greedy step removes one head from every group (each group's least
    costly, given what is gone), and a unit is what one step removed."""
    readouts = _readouts(block, stats)
    if not readouts:
        return None
    whole = sum(float(np.trace(w.T @ cov @ w)) for cov, _, w, _ in readouts)
    group = block.heads // block.groups
    removed: list[int] = []
    steps: list[list[int]] = []
    added: list[float] = []
    current = 0.0
    while len(steps) < group - 1:
        step = []
        for first in range(0, block.heads, group):
            candidates = [h for h in range(first, first + group) if h not in removed]
            errors = [_error(readouts, removed + [h]) for h in candidates]
            step.append(candidates[int(np.argmin(errors))])
            removed.append(step[-1])
        error = _error(readouts, removed)
        steps.append(step)
        added.append(max(error - current, 0.0))
        current = error
    last = [h for h in range(block.heads) if h not in removed]
    members = np.array([last, *reversed(steps)], dtype=np.int64)
    shares = np.array([max(whole - current, 0.0), *reversed(added)])
    fraction = shares / max(float(shares.sum()), 1e-300)
    if block.groups == 1:  # a unit is a head: the order names the heads themselves
        return UnitOrdering(Ordering(members[:, 0], fraction), np.arange(block.heads, dtype=np.int64)[:, None])
    return UnitOrdering(Ordering(np.arange(group, dtype=np.int64), fraction), members)


@dataclass
class WithHeads:
    """A channel cost model plus head blocks (keyed by negative roots): head h of a block costs `per_head`.
    Over a MAC model with `shares` (root -> each node's fraction per head), the heads scale each node's MACs
    together with its channel groups, exactly (a head removed from a narrowed stream saves its narrowed
    MACs); otherwise (a latency model) the per-head cost is subtracted."""

    base: CostModel
    per_head: dict[int, float]
    heads: dict[int, int]
    shares: dict[int, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.total = self.base.total

    @property
    def exact(self) -> bool:
        """Whether costs are computed node by node (over a MAC model), so other node fractions can join."""
        return self.shares is not None and isinstance(self.base, MacModel)

    def cost(self, counts: dict[int, int]) -> float:
        if self.exact:
            return self.removed_cost(counts, {})
        return self.base.cost(self.channels(counts)) - self.saved(counts)

    def channels(self, counts: dict[int, int]) -> dict[int, int]:
        """The channel groups' counts of `counts` (without the head blocks')."""
        return {root: count for root, count in counts.items() if root not in self.per_head}

    def saved(self, counts: dict[int, int]) -> float:
        """What the heads removed in `counts` save, at `per_head` a unit."""
        return sum((self.heads[root] - counts.get(root, self.heads[root])) * cost
                   for root, cost in self.per_head.items())

    def removed_cost(self, counts: dict[int, int], removed: dict[str, float]) -> float:
        """The MACs with `counts`, each named node's MACs further reduced by the fraction `removed[name]`
        (q/k dims, graphopt.passes.heads.qk_plan); only when `exact`."""
        assert self.shares is not None and isinstance(self.base, MacModel)
        channels = self.channels(counts)
        gone = dict(removed)
        for root, shares in self.shares.items():
            heads = self.heads[root] - counts.get(root, self.heads[root])
            for name, share in shares.items():
                gone[name] = gone.get(name, 0.0) + share * heads
        return self.base.removed_cost(channels, gone)

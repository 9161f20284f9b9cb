"""q/k dimensions as budget units beside channel groups and whole heads (SNP).

Each head block with a q/k structure (graphopt.analysis.heads.qk) becomes a pseudo-group with a negative root
whose units are its per-head q/k dims: every head of the block keeps the same r (regular shapes), r a
multiple of `QK_MULTIPLE` when d ≥ 16 (GEMM-friendly widths), any r below. Ordering: dim i (the i-th
singular direction of every unit, graphopt.passes.heads.qk) carries Σ_units s_i² over the block's total
Σ_units Σ_i s_i², so keeping r dims keeps exactly that fraction of the block's score energy, and one
retained-fraction cut compares dims with channel groups (unique variance) and heads (output error).

Cost: a unit (a key head and its query heads) spends per dim its q and k projection columns and its share
of q·kᵀ (`per_dim`). A block keeping k units and r of d dims saves (d − r)·per_dim·k beyond what the head
plan saves (a removed head takes its whole q and k along): `WithQK` takes that share off each node's MACs in
the MAC model below it (exact with the heads and the channel groups the same nodes read), or subtracts it
from a latency model; the kept unit count is read from the block's head root when heads are planned too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.heads import HeadBlock
from graphopt.analysis.heads.qk import QKBlock, find_qk
from graphopt.calibration.stats import StatRequest, TensorStats
from graphopt.passes.base import PassResult
from graphopt.passes.channels.budget import CostModel, MacModel
from graphopt.passes.heads.qk import block_maps, fold_maps
from graphopt.passes.heads.select import HeadPlan
from graphopt.passes.snp.plan import Ordering

QK_MULTIPLE = 8


def _dim_shares(qk: QKBlock) -> dict[str, float]:
    """The fraction of each node's MACs one q/k dim of one unit costs: its q and k columns, its share of q·kᵀ."""
    shares: dict[str, float] = {}
    for side in (qk.query, qk.key):
        for cut in side.slices:
            if cut.node.op in ("MatMul", "Gemm") and cut.index == 1:
                columns = np.asarray(cut.node.inputs[1].values).shape[cut.axis]
                shares[cut.node.name] = shares.get(cut.node.name, 0.0) + (side.heads // qk.units) / max(columns, 1)
    shares[qk.score.name] = shares.get(qk.score.name, 0.0) + 1.0 / (qk.width * qk.units)
    return shares


def _per_dim(qk: QKBlock, per_node: dict[str, int]) -> float:
    """MACs one q/k dim of one unit costs per sample."""
    return sum(per_node.get(name, 0) * share for name, share in _dim_shares(qk).items())


@dataclass
class WithQK:
    """A cost model plus q/k dims (keyed by negative roots): each dim of each kept unit costs `per_dim`."""

    base: CostModel
    per_dim: dict[int, float]
    dims: dict[int, int]
    units: dict[int, int]
    head_root: dict[int, int | None]

    def __post_init__(self) -> None:
        self.total = self.base.total

    shares: dict[int, dict[str, float]] | None = None

    def _kept_units(self, root: int, counts: dict[int, int]) -> int:
        heads = self.head_root[root]
        return counts.get(heads, self.units[root]) if heads is not None else self.units[root]

    def cost(self, counts: dict[int, int]) -> float:
        channels = {root: count for root, count in counts.items() if root not in self.per_dim}
        if self.shares is not None and (isinstance(self.base, MacModel) or getattr(self.base, "exact", False)):
            removed: dict[str, float] = {}
            for root, shares in self.shares.items():
                dims = (self.dims[root] - counts.get(root, self.dims[root])) * self._kept_units(root, counts)
                for name, share in shares.items():
                    removed[name] = removed.get(name, 0.0) + share * dims
            return self.base.removed_cost(channels, removed)
        saved = sum((self.dims[root] - counts.get(root, self.dims[root])) * cost * self._kept_units(root, counts)
                    for root, cost in self.per_dim.items())
        return self.base.cost(channels) - saved


@dataclass
class QKPlan:
    blocks: dict[int, QKBlock] = field(default_factory=dict)       # negative root -> q/k block
    orderings: dict[int, Ordering] = field(default_factory=dict)
    head_root: dict[int, int | None] = field(default_factory=dict)  # the block's root in the head plan

    def multiples(self) -> dict[int, int]:
        return {root: QK_MULTIPLE if self.blocks[root].width >= 2 * QK_MULTIPLE else 1 for root in self.orderings}

    def cost_model(self, base: CostModel, per_node: dict[str, int], mac_total: float) -> CostModel:
        """`base` with the blocks' q/k dims; per-dim MACs are scaled to `base`'s unit (MACs or ms)."""
        if not self.orderings:
            return base
        unit = base.total / mac_total if mac_total else 0.0
        return WithQK(base, {root: _per_dim(self.blocks[root], per_node) * unit for root in self.orderings},
                      {root: self.blocks[root].width for root in self.orderings},
                      {root: self.blocks[root].units for root in self.orderings},
                      {root: self.head_root[root] for root in self.orderings},
                      {root: _dim_shares(self.blocks[root]) for root in self.orderings})


def qk_blocks(blocks: list[HeadBlock], shapes: dict[str, tuple[int, ...]], result: PassResult) -> list[QKBlock]:
    """The q/k structures of usable head blocks; the others go to `result.skipped` with their reason."""
    found = []
    for block in blocks:
        qk = find_qk(block, shapes) if block.groups == 1 else "query heads pruned group by group"
        if isinstance(qk, str):
            result.skipped.append(f"q/k dims of {block.name}: {qk}")
        else:
            found.append(qk)
    return found


def qk_requests(qks: list[QKBlock], shapes: dict[str, tuple[int, ...]]) -> list[StatRequest]:
    """Mean and Gram of every q and k projection output (per-head columns on its last axis)."""
    names = sorted({side.tensor for qk in qks for side in (qk.query, qk.key)})
    return [StatRequest(name, frozenset({"mean", "gram"}), len(shapes[name]) - 1) for name in names if name in shapes]


def plan_qk(qks: list[QKBlock], stats: dict[str, TensorStats], heads: HeadPlan, first_root: int,
            result: PassResult) -> QKPlan:
    """Order each block's dims by score energy; roots count down from `first_root`."""
    plan = QKPlan()
    head_roots = {id(block): root for root, block in heads.blocks.items()}
    for index, qk in enumerate(qks):
        if qk.query.tensor not in stats or qk.key.tensor not in stats:
            result.skipped.append(f"q/k dims of {qk.block.name}: no statistics of q and k")
            continue
        energy = block_maps(qk, stats, qk.width)[2].sum(axis=0)
        if not energy.sum() > 0.0:
            result.skipped.append(f"q/k dims of {qk.block.name}: the scores are zero on the calibration data")
            continue
        root = first_root - index
        plan.blocks[root], plan.head_root[root] = qk, head_roots.get(id(qk.block))
        plan.orderings[root] = Ordering(np.arange(qk.width), energy / energy.sum())
    return plan


def apply_qk(graph: gs.Graph, plan: QKPlan, counts: dict[int, int], heads: HeadPlan, stats: dict[str, TensorStats],
             shapes: dict[str, tuple[int, ...]], decision: dict) -> list[dict]:
    """Give every block its count of q/k dims (after the head cut: the maps cover the units it kept);
    the history entries."""
    history = []
    for root, ordering in plan.orderings.items():
        qk, rank = plan.blocks[root], counts.get(root, ordering.order.size)
        if rank >= qk.width:
            continue
        kept = np.arange(qk.units)
        head_root = plan.head_root[root]
        if head_root is not None and counts.get(head_root, qk.units) < qk.units:
            kept = heads.kept_heads(head_root, counts[head_root])
        query_maps, key_maps, energy = block_maps(qk, stats, rank, kept)
        fold_maps(graph, qk, query_maps, key_maps, shapes)
        history.append({"by": "snp", "qk": qk.block.name, "size": qk.width, "kept": int(rank),
                        "criterion": "score_energy", "retained": float(energy[:, :rank].sum() / energy.sum()),
                        **decision})
    return history

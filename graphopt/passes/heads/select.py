"""Head blocks as budget units beside channel groups.

A pass that prunes heads (SNP) plans them in the same budget as its channel groups: each usable head
block becomes a pseudo-group with a negative root, whose units are heads (graphopt.passes.heads.plan).
Channel groups living inside a block (the per-head channels of q/k and of v, coupled across heads) are
left to the head planning: pruning both would make the MAC count of the block a product of the two
counts, not the sum the budget's cost model adds, and the head cut would need the widths the channel cut
leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Group
from graphopt.analysis.heads import HeadBlock, find_head_blocks
from graphopt.analysis.heads.grouped import prefers_query_heads, query_heads
from graphopt.calibration.stats import StatRequest, TensorStats
from graphopt.passes.base import PassResult
from graphopt.passes.channels.budget import CostModel
from graphopt.passes.heads.plan import UnitOrdering, WithHeads, head_ordering
from graphopt.passes.heads.prune import cut_heads, entry_holder
from graphopt.passes.snp.plan import Ordering


@dataclass
class HeadPlan:
    blocks: dict[int, HeadBlock]           # negative root -> block
    orderings: dict[int, Ordering]         # over each block's units
    members: dict[int, np.ndarray] = field(default_factory=dict)  # root -> the heads of each unit

    def kept_heads(self, root: int, count: int) -> np.ndarray:
        """The heads (sorted) of block `root`'s `count` most important units."""
        return UnitOrdering(self.orderings[root], self.members[root]).kept_heads(count)

    def cost_model(self, base: CostModel, per_node: dict[str, int], mac_total: float,
                   unit: float | None = None) -> CostModel:
        """`base` with the blocks' units; their MACs are scaled to `base`'s unit (MACs or ms): by `unit` (ms per
        head MAC, measured: graphopt.passes.heads.latency) or by `base`'s mean per MAC."""
        if not self.orderings:
            return base
        if unit is None:
            unit = base.total / mac_total if mac_total else 0.0
        per_head = {root: self.blocks[root].macs_per_head(per_node) * unit for root in self.orderings}
        return WithHeads(base, per_head, {root: self.blocks[root].units for root in self.orderings},
                         {root: self.blocks[root].head_shares() for root in self.orderings})


def head_blocks(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> list[tuple[HeadBlock, str | None]]:
    """Every head block as pruning would cut it (grouped-query attention: by key/value groups or by query heads,
    graphopt.analysis.heads.grouped), with the reason it cannot be cut (None: it can)."""
    found = []
    for block in find_head_blocks(graph, shapes):
        if block.repeats and prefers_query_heads(block.heads * block.factor, block.heads):
            queries = query_heads(block)
            block = queries if isinstance(queries, HeadBlock) else block
        reason = block.declined
        if reason is None:
            stuck = [f"{e.node.name} ({e.node.op})" for e in block.shapes
                     if e.node.op != "Expand" and entry_holder(e.node, e.position, shapes) is None]
            reason = f"{stuck[0]}: the target entry counting heads is computed at run time" if stuck else None
        found.append((block, reason))
    return found


def usable_blocks(graph: gs.Graph, shapes: dict[str, tuple[int, ...]], result: PassResult) -> list[HeadBlock]:
    """Head blocks whose every rewrite is possible; the others go to `result.skipped` with their reason."""
    usable = []
    for block, reason in head_blocks(graph, shapes):
        if reason is None:
            usable.append(block)
        else:
            result.skipped.append(f"heads of {block.name}: {reason}")
    return usable


def describe_block(block: HeadBlock, reason: str | None) -> dict[str, object]:
    """A head block as `graphopt inspect --groups` lists it."""
    heads = block.heads * block.factor  # query heads
    kind = ("one query head of each key/value group" if block.groups > 1 else
            f"a key/value head with its {block.factor} query heads" if block.factor > 1 else "one head")
    return {"name": block.name, "heads": heads, "units": block.units, "heads_per_unit": heads // block.units,
            "unit": kind, "prunable": reason is None, "reason": reason}


def inside_blocks(analysis: Analysis, groups: list[Group], blocks: list[HeadBlock]) -> set[int]:
    """Roots of the channel groups produced inside a head block or read by its consumers."""
    inner = {id(s.node) for b in blocks for s in b.slices} | {id(e.node) for b in blocks for e in b.shapes}
    readers = {id(c.node) for b in blocks for c in b.consumers}
    return {g.root for g in groups
            if any((id(s.node) in inner and s.role != "consumer") or (id(s.node) in readers and s.role == "consumer")
                   for s in g.sites)}


def head_requests(blocks: list[HeadBlock], shapes: dict[str, tuple[int, ...]]) -> list[StatRequest]:
    """Mean and Gram of every merged-heads tensor a consumer reads (channels on its last axis)."""
    names = sorted({c.tensor for b in blocks for c in b.consumers})
    return [StatRequest(name, frozenset({"mean", "gram"}), len(shapes[name]) - 1) for name in names if name in shapes]


def plan_heads(blocks: list[HeadBlock], stats: dict[str, TensorStats], result: PassResult) -> HeadPlan:
    plan = HeadPlan({}, {})
    for index, block in enumerate(blocks):
        ordering = head_ordering(block, stats)
        if ordering is None:
            result.skipped.append(f"heads of {block.name}: no statistics of the merged heads")
            continue
        plan.blocks[-1 - index] = block
        plan.orderings[-1 - index] = ordering.ordering
        plan.members[-1 - index] = ordering.members
    return plan


def apply_heads(graph: gs.Graph, plan: HeadPlan, counts: dict[int, int], stats: dict[str, TensorStats],
                shapes: dict[str, tuple[int, ...]], reconstruct: bool, decision: dict) -> tuple[int, list[dict]]:
    """Cut every block to its count; (consumers reconstructed, history entries)."""
    folded, history = 0, []
    for root, ordering in plan.orderings.items():
        count = counts.get(root, ordering.order.size)
        if count >= ordering.order.size:
            continue
        block = plan.blocks[root]
        kept = plan.kept_heads(root, count)
        folded += cut_heads(graph, block, kept, stats, shapes, reconstruct)
        share = np.empty(block.heads)  # a unit's share, on each of its heads
        share[plan.members[root][ordering.order]] = ordering.fraction[:, None]
        removed = np.setdiff1d(np.arange(block.heads), kept)
        history.append({"by": "snp", "heads": block.name, "size": block.heads, "kept": int(kept.size),
                        "removed": [int(h) for h in removed], "criterion": "output_error",
                        "scores": [float(share[h]) for h in removed],
                        "retained": float(ordering.fraction[:count].sum()), **decision})
    return folded, history

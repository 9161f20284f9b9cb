"""The head block data: what whole-head pruning rewrites (graphopt.analysis.heads)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import constant_or_node_value as constant_value

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class PackedCut:
    """A packed projection's output `tensor`, cut by Split/Slice along its last axis: this block's heads lie
    in it as blocks of `width` entries from `offset` on. Removing heads moves every cut of the tensor."""

    tensor: gs.Tensor
    width: int
    offset: int


@dataclass(frozen=True)
class HeadSlice:
    """A constant input whose `axis` lays out `heads` blocks of `width` entries from `offset` on."""

    node: gs.Node
    index: int
    axis: int
    width: int
    offset: int = 0


@dataclass(frozen=True)
class ShapeEntry:
    """Entry `position` of a Reshape's target counts heads: it becomes (kept heads) * `per_head`. A `scaled`
    entry is computed at run time as the heads times something else (the batch, where torch's
    nn.MultiheadAttention folds the heads into it): it is multiplied by kept / heads instead."""

    node: gs.Node
    position: int
    per_head: int
    scaled: bool = False


@dataclass(frozen=True)
class HeadConsumer:
    """A linear consumer of the merged heads: weight input `index`, rows along `axis`, `width` per head."""

    node: gs.Node
    index: int
    axis: int
    width: int
    tensor: str


@dataclass
class HeadBlock:
    heads: int
    slices: list[HeadSlice] = field(default_factory=list)
    shapes: list[ShapeEntry] = field(default_factory=list)
    attributes: list[gs.Node] = field(default_factory=list)  # ops with a num_heads attribute
    consumers: list[HeadConsumer] = field(default_factory=list)
    mixing: list[gs.Node] = field(default_factory=list)       # batched MatMuls / attention ops, 1/H of MACs per head
    packed: list[PackedCut] = field(default_factory=list)
    declined: str | None = None
    # > 1: query heads only, in `groups` consecutive groups sharing a key/value head each, which stay; every
    # group keeps as many heads, so a unit is one query head of every group (graphopt.analysis.heads.grouped)
    groups: int = 1
    # grouped-query attention from a torch export: the Reshapes repeating each key/value head for its query
    # heads, how many consecutive heads a unit holds (`coarsen`), and, for a block of query heads only, the
    # Expand entries counting each group's query heads (they become kept / groups)
    repeats: list[gs.Node] = field(default_factory=list)
    factor: int = 1
    group_entries: list[ShapeEntry] = field(default_factory=list)

    @property
    def units(self) -> int:
        """What the budget counts: heads, or with `groups` > 1 the heads of one group."""
        return self.heads // self.groups

    def add_sources(self, found: list[HeadSlice | PackedCut | ShapeEntry]) -> None:
        """What graphopt.analysis.heads.sources found behind a projection: constants, packed cuts and the
        target entries of a packed projection's split into sections."""
        self.slices.extend(s for s in found if isinstance(s, HeadSlice))
        self.packed.extend(s for s in found if isinstance(s, PackedCut))
        self.shapes.extend(s for s in found if isinstance(s, ShapeEntry))

    @property
    def name(self) -> str:
        producers = sorted({s.node.name for s in self.slices if s.node.op in ("MatMul", "Gemm")} |
                           {n.name for n in self.attributes})
        return producers[0] if producers else (self.consumers[0].node.name if self.consumers else "?")

    def coarsen(self, factor: int) -> None:
        """Count units of `factor` consecutive heads (grouped-query attention: a key/value head and its query
        heads go together): every per-head width and count grows by `factor`."""
        self.heads //= factor
        self.factor *= factor
        self.slices = [replace(s, width=s.width * factor) for s in self.slices]
        self.packed = [replace(s, width=s.width * factor) for s in self.packed]
        self.shapes = [replace(e, per_head=e.per_head * factor) for e in self.shapes]
        self.consumers = [replace(c, width=c.width * factor) for c in self.consumers]

    def head_shares(self) -> dict[str, float]:
        """The fraction of each node's MACs that one unit costs: its heads' columns of every projection, their
        rows of every consumer, their share of every mixing op (1/H a head)."""
        shares: dict[str, float] = {}
        for cut in self.slices:
            if cut.node.op in ("MatMul", "Gemm") and cut.index == 1:
                columns = np.asarray(cut.node.inputs[1].values).shape[cut.axis]
                shares[cut.node.name] = shares.get(cut.node.name, 0.0) + cut.width / max(columns, 1)
        for consumer in self.consumers:
            rows = np.asarray(consumer.node.inputs[consumer.index].values).shape[consumer.axis]
            shares[consumer.node.name] = shares.get(consumer.node.name, 0.0) + consumer.width / max(rows, 1)
        for node in self.mixing:
            shares[node.name] = shares.get(node.name, 0.0) + 1.0 / self.heads
        return {name: share * self.groups for name, share in shares.items()}

    def macs_per_head(self, per_node: dict[str, int]) -> float:
        """MACs one unit costs per sample: its share of every projection, consumer and mixing op."""
        return sum(per_node.get(name, 0) * share for name, share in self.head_shares().items())


def weight_slice(node: gs.Node, width: int, offset: int) -> HeadSlice | None:
    """The output columns of a linear producer, or None when `node` is not one."""
    if node.op == "MatMul" and constant_value(node.inputs[1]) is not None and constant_value(node.inputs[1]).ndim == 2 \
            and constant_value(node.inputs[0]) is None:
        return HeadSlice(node, 1, 1, width, offset)
    if node.op == "Gemm" and constant_value(node.inputs[1]) is not None and not node.attrs.get("transA", 0):
        return HeadSlice(node, 1, 0 if node.attrs.get("transB", 0) else 1, width, offset)
    return None

"""Following the head axis forward from every head split to the merges (graphopt.analysis.heads)."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.heads.blocks import (HeadBlock, HeadConsumer, HeadSlice, ShapeEntry, Shapes, constant_value,
                                            weight_slice)
from graphopt.analysis.heads.grouped import prefers_query_heads
from graphopt.analysis.heads.sources import (folded_split, grouped_projections, head_split, packed_projection,
                                             producer_slices, sectioned_split, separate_projections)
from graphopt.analysis.oprules.reshape import entry_kind
from graphopt.ir.graph import per_tensor_qdq

UNARY = {"Identity", "Dropout", "Cast", "Neg", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Exp", "Abs", "Reciprocal",
         "Sin", "Cos", "Softplus", "Gelu", "FastGelu", "Not", "IsNaN", "IsInf"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Greater", "Less", "And", "Or",
          "GreaterOrEqual", "LessOrEqual", "Mod"}
SOFTMAX = {"Softmax", "LogSoftmax"}
# past key/value in or present out: GroupQueryAttention's query heads may still go (as many from every group)
CACHE = "a key/value cache: its heads are the model's interface"
PACKED_ATTENTION = {("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                    ("com.microsoft", "GroupQueryAttention")}


def _axis(value: int, rank: int) -> int:
    return value + rank if value < 0 else value


class _Tracker:
    """The head axis of every tensor computed from a head split, and the blocks (a union-find over them)."""

    def __init__(self, graph: gs.Graph, shapes: Shapes) -> None:
        self.graph, self.shapes = graph, shapes
        self.axis: dict[str, int] = {}  # tensor -> its head axis
        self.block_of: dict[str, int] = {}
        self.parent: list[int] = []
        self.blocks: list[HeadBlock] = []

    def new(self, heads: int) -> int:
        self.parent.append(len(self.parent))
        self.blocks.append(HeadBlock(heads))
        return len(self.blocks) - 1

    def find(self, block: int) -> int:
        while self.parent[block] != block:
            self.parent[block] = self.parent[self.parent[block]]
            block = self.parent[block]
        return block

    def union(self, first: int, second: int) -> int:
        a, b = self.find(first), self.find(second)
        if a == b:
            return a
        if self.blocks[a].heads < self.blocks[b].heads:
            a, b = b, a
        self.parent[b] = a
        kept, merged = self.blocks[a], self.blocks[b]
        if kept.heads % merged.heads == 0:  # query heads meet their shared key/value heads
            kept.coarsen(kept.heads // merged.heads)
        else:
            kept.declined = kept.declined or f"{kept.heads} and {merged.heads} heads meet"
        kept.declined = kept.declined or merged.declined
        for name in ("slices", "shapes", "attributes", "consumers", "mixing", "packed", "repeats"):
            getattr(kept, name).extend(getattr(merged, name))
        return a

    def block(self, tensor: gs.Tensor) -> HeadBlock:
        return self.blocks[self.find(self.block_of[tensor.name])]

    def mark(self, tensor: gs.Tensor, axis: int, block: int) -> None:
        self.axis[tensor.name] = axis
        self.block_of[tensor.name] = block

    def decline(self, node: gs.Node, block: int, reason: str) -> None:
        root = self.find(block)
        self.blocks[root].declined = self.blocks[root].declined or f"{node.name} ({node.op}): {reason}"

    def roots(self) -> list[HeadBlock]:
        return [self.blocks[i] for i in range(len(self.blocks)) if self.find(i) == i]


def _aligned(t: _Tracker, node: gs.Node, tracked: list[tuple[int, int]], block: int) -> int | str:
    """The head axis of a broadcasting op's output: tracked operands must agree on it after right
    alignment; an untracked operand must broadcast over it, or be a constant with one entry per head
    (sliced with the heads)."""
    out = t.shapes.get(node.outputs[0].name, ())
    rank = len(out)
    positions = {axis + rank - len(t.shapes.get(node.inputs[i].name, ())) for i, axis in tracked}
    if len(positions) != 1:
        return "operands hold their heads on different axes"
    position = positions.pop()
    entries, heads = out[position], t.blocks[t.find(block)].heads
    for index, tensor in enumerate(node.inputs):
        if any(index == i for i, _ in tracked) or not tensor.name:
            continue
        shape = t.shapes.get(tensor.name) if constant_value(tensor) is None else constant_value(tensor).shape
        if shape is None:
            return f"shape of {tensor.name} unknown"
        own = position - (rank - len(shape))
        if own < 0 or shape[own] == 1:
            continue
        if constant_value(tensor) is not None and shape[own] == entries and entries % heads == 0:
            t.blocks[t.find(block)].slices.append(HeadSlice(node, index, own, entries // heads))
            continue
        return f"operand {tensor.name} differs per head"
    return position


def _batched_matmul(t: _Tracker, node: gs.Node, tracked: list[tuple[int, int]], block: int) -> int | str:
    rank = len(t.shapes.get(node.outputs[0].name, ()))
    for index, axis in tracked:
        if axis >= len(t.shapes.get(node.inputs[index].name, ())) - 2:
            return "the heads are a matrix axis, not a batch axis"
    position = _aligned(t, node, tracked, block)
    if isinstance(position, int):
        t.blocks[t.find(block)].mixing.append(node)
    return position if isinstance(position, str) or position < rank - 2 else "heads on a matrix axis"


def _squeezed_axis(t: _Tracker, node: gs.Node, axis: int) -> int | str:
    """The head axis after an Unsqueeze or Squeeze."""
    in_rank = len(t.shapes.get(node.inputs[0].name, ()))
    out_rank = len(t.shapes.get(node.outputs[0].name, ()))
    given = node.attrs.get("axes") if len(node.inputs) < 2 else constant_value(node.inputs[1])
    if given is None:
        return "axes not constant"
    axes = sorted(_axis(int(a), out_rank if node.op == "Unsqueeze" else in_rank) for a in np.reshape(given, -1))
    if node.op == "Squeeze":
        return "squeezes the heads" if axis in axes else axis - sum(a < axis for a in axes)
    position = axis
    for inserted in axes:
        position += inserted <= position
    return position


def _layout_axis(t: _Tracker, node: gs.Node, axis: int) -> int | str:
    """The head axis after Transpose/Unsqueeze/Squeeze/Slice/Split/Concat, or why it is lost."""
    in_rank = len(t.shapes.get(node.inputs[0].name, ()))
    if node.op == "Transpose":
        return list(node.attrs.get("perm", range(in_rank - 1, -1, -1))).index(axis)
    if node.op in ("Unsqueeze", "Squeeze"):
        return _squeezed_axis(t, node, axis)
    if node.op == "Slice":
        axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else np.arange(in_rank)
        return "slices the heads" if axes is None or axis in {_axis(int(a), in_rank) for a in axes.reshape(-1)} \
            else axis
    return "splits or joins along the heads" if _axis(int(node.attrs.get("axis", 0)), in_rank) == axis else axis


LAYOUT_OPS = {"Transpose", "Unsqueeze", "Squeeze", "Slice", "Split", "Concat"}


def _gathered_axis(t: _Tracker, node: gs.Node, axis: int) -> int | str:
    """The head axis after a Gather of constant positions along another axis (q, k, v = qkv[0], qkv[1],
    qkv[2] of a sectioned split: a scalar index drops its axis)."""
    indices = constant_value(node.inputs[1])
    rank = len(t.shapes.get(node.inputs[0].name, ()))
    gathered = _axis(int(node.attrs.get("axis", 0)), rank)
    if indices is None:
        return "gathers at positions computed at run time"
    if gathered == axis:
        return "gathers along the heads"
    return axis if gathered > axis else axis + indices.ndim - 1


def _merge(t: _Tracker, node: gs.Node, axis: int, block: int) -> str | None:
    """A Reshape merging [H, width] into the last axis (the axes in front may merge too: [seq, batch, H, width]
    -> [seq x batch, H x width]), read only by linear consumers; None when recorded."""
    before, after = t.shapes.get(node.inputs[0].name), t.shapes.get(node.outputs[0].name)
    if before is None or after is None or axis != len(before) - 2 or not after \
            or math.prod(after[:-1]) != math.prod(before[:-2]) or after[-1] != before[-2] * before[-1]:
        return "a reshape of the heads that is not their merge into the last axis"
    heads = t.blocks[t.find(block)].heads
    if before[-2] % heads:
        return "the merged heads are not whole units"
    width = before[-1] * (before[-2] // heads)
    reason = _merged_readers(t, node.outputs[0], width, block)
    if reason is None:
        t.blocks[t.find(block)].shapes.append(ShapeEntry(node, len(after) - 1, width))
    return reason


def _repeated(t: _Tracker, node: gs.Node, axis: int, block: int) -> bool:
    """A Reshape merging the head axis with the next one, not the last (key/value heads repeated for their
    query heads: [N, Hkv, g, T, d] -> [N, Hkv·g, T, d]): the heads stay on `axis`, g times as many entries."""
    before, after = t.shapes.get(node.inputs[0].name), t.shapes.get(node.outputs[0].name)
    if before is None or after is None or axis >= len(before) - 2 or len(after) != len(before) - 1:
        return False
    if tuple(after[:axis]) != tuple(before[:axis]) or after[axis] != before[axis] * before[axis + 1] \
            or tuple(after[axis + 1:]) != tuple(before[axis + 2:]):
        return False
    found = t.blocks[t.find(block)]
    found.shapes.append(ShapeEntry(node, axis, after[axis] // found.heads))
    found.repeats.append(node)
    t.mark(node.outputs[0], axis, block)
    return True


def _entry(t: _Tracker, node: gs.Node, position: int, per_head: int) -> ShapeEntry | str | None:
    """How Reshape target entry `position`, which counts heads, follows a cut: a constant becomes (kept heads) x
    `per_head` (-1 and 0 are inferred or copied: None); one computed at run time from the shapes of head tensors
    follows by itself (None); one computed from other shapes (the batch times the heads, torch's
    nn.MultiheadAttention) is scaled by kept / heads; the reason where none applies."""
    kind = entry_kind(node, position, lambda tensor: t.shapes.get(tensor.name), lambda tensor: tensor.name in t.axis)
    if kind is None:
        return "a reshape entry counting the heads is computed from values, or with other entries from other shapes"
    if kind in ("inferred", "follows"):
        return None
    return ShapeEntry(node, position, per_head, scaled=kind == "piece")


def _regrouped(t: _Tracker, node: gs.Node, axis: int, block: int) -> bool:
    """A Reshape that keeps the head axis whole while the axes around it regroup (the heads folded into the
    batch and back: [batch x heads, seq, width] <-> [batch, heads, seq, width]); its entry follows the cut."""
    before, after = t.shapes.get(node.inputs[0].name), t.shapes.get(node.outputs[0].name)
    if before is None or after is None:
        return False
    lead, behind = math.prod(before[:axis]), math.prod(before[axis + 1:])
    position = next((j for j, size in enumerate(after) if size == before[axis] and math.prod(after[:j]) == lead
                     and math.prod(after[j + 1:]) == behind), None)
    if position is None:
        return False
    found = t.blocks[t.find(block)]
    entry = _entry(t, node, position, after[position] // found.heads)
    if isinstance(entry, str):
        t.decline(node, block, entry)
        return True
    if entry is not None:
        found.shapes.append(entry)
    t.mark(node.outputs[0], position, block)
    return True


def _expanded(t: _Tracker, node: gs.Node, axis: int, block: int) -> int | str:
    """Expand along other axes than the heads; an explicit target entry for the heads follows them."""
    before, after = t.shapes.get(node.inputs[0].name), t.shapes.get(node.outputs[0].name)
    if before is None or after is None:
        return "shapes unknown"
    position = axis + len(after) - len(before)
    if after[position] != before[axis]:
        return "expands the heads"
    found = t.blocks[t.find(block)]
    found.shapes.append(ShapeEntry(node, position, after[position] // found.heads))
    return position


def _step(t: _Tracker, node: gs.Node) -> None:
    """Follow the head axis through `node`, which reads at least one tracked tensor."""
    tracked = [(i, t.axis[x.name]) for i, x in enumerate(node.inputs) if x.name in t.axis]
    block = t.block_of[node.inputs[tracked[0][0]].name]
    for index, _ in tracked[1:]:
        block = t.union(block, t.block_of[node.inputs[index].name])
    axis = tracked[0][1]
    if node.op == "Reshape" and tracked[0][0] == 0 and (_repeated(t, node, axis, block)
                                                         or _regrouped(t, node, axis, block)):
        return
    if node.op == "Reshape":
        reason = _merge(t, node, axis, block) if tracked[0][0] == 0 else "a shape computed from the heads"
        if reason is not None:
            t.decline(node, block, reason)
        return
    if node.op == "Shape":
        return
    result = _rule(t, node, tracked, block, axis)
    if isinstance(result, str):
        t.decline(node, block, result)
        return
    for out in node.outputs:
        t.mark(out, result, block)


def _quantized_element(node: gs.Node, tracked: list[tuple[int, int]]) -> bool:
    """An activation's per-tensor QuantizeLinear or DequantizeLinear reading the heads: elementwise."""
    return per_tensor_qdq(node) and tracked[0][0] == 0


def _rule(t: _Tracker, node: gs.Node, tracked: list[tuple[int, int]], block: int, axis: int) -> int | str:
    if node.domain not in (None, "", "ai.onnx"):
        return "an op outside the ONNX domain reads the heads"
    if node.op in UNARY or _quantized_element(node, tracked):
        return axis
    if node.op in SOFTMAX:
        rank = len(t.shapes.get(node.inputs[0].name, ()))
        return axis if _axis(int(node.attrs.get("axis", -1)), rank) > axis else "normalises over the heads"
    if node.op in BINARY:
        return _aligned(t, node, tracked, block)
    if node.op == "MatMul":
        return _batched_matmul(t, node, tracked, block)
    if node.op == "Expand" and tracked[0][0] == 0:
        return _expanded(t, node, axis, block)
    if node.op == "Gather" and tracked[0][0] == 0:
        return _gathered_axis(t, node, axis)
    if node.op in LAYOUT_OPS:
        moved = _layout_axis(t, node, axis)
        if isinstance(moved, str) or node.op != "Concat":
            return moved
        return _aligned(t, node, tracked, block)
    return "reads the heads"


def _attention_op(t: _Tracker, node: gs.Node) -> None:
    """com.microsoft Attention / MultiHeadAttention / GroupQueryAttention: the op mixes per head; its output
    holds the merged heads. Under GroupQueryAttention a unit is a key/value head and its query heads, or query
    heads alone (`_query_only`)."""
    heads = int(node.attrs.get("num_heads", 0))
    grouped = node.op == "GroupQueryAttention"
    units = int(node.attrs.get("kv_num_heads", 0)) if grouped else heads
    block = t.new(max(units, 1))
    found = t.blocks[block]
    found.attributes.append(node)
    found.mixing.append(node)
    reason = _attention_state(t, node) if heads >= 2 and units >= 1 else "num_heads missing"
    if grouped and _query_only(reason, heads, units):
        _query_heads(t, node, heads, units, block)
        return
    if reason is None and grouped:
        found.factor = heads // units  # query heads per unit
        reason = grouped_projections(t.shapes, found, node, heads, units)
    elif reason is None and node.op == "Attention":
        reason = packed_projection(found, node, heads)
    elif reason is None:
        reason = separate_projections(t.shapes, found, node, heads)
    if reason is None:
        width = t.shapes.get(node.outputs[0].name, (0,))[-1] // units
        reason = _merged_readers(t, node.outputs[0], width, block)
    if reason is not None:
        found.declined = f"{node.name} ({node.op}): {reason}"


def _query_only(reason: str | None, heads: int, units: int) -> bool:
    """Whether a GroupQueryAttention gives up query heads alone: its cache's heads are the interface, or the
    rule of graphopt.analysis.heads.grouped prefers them."""
    return reason in (None, CACHE) and prefers_query_heads(heads, units, cache=reason == CACHE)


def _attention_state(t: _Tracker, node: gs.Node) -> str | None:
    """Why an attention op's heads cannot go: state carried across calls (past key/value in, present out:
    the cache's head axis is the model's interface), a per-head bias, or another output read."""
    extra = _extra_inputs(node)
    if isinstance(extra, str):
        return extra
    outputs = {o.name for o in t.graph.outputs}
    cache = any(o.name and (o.outputs or o.name in outputs) for o in node.outputs[1:])
    if node.op == "GroupQueryAttention" and (cache or extra) and all(i in (3, 4) for i in extra):
        return CACHE
    if extra or cache:
        return "past state, per-head bias or extra outputs"
    return None


def _query_heads(t: _Tracker, node: gs.Node, heads: int, units: int, block: int) -> None:
    """GroupQueryAttention giving up query heads, as many from every group (`HeadBlock.groups`;
    graphopt.analysis.heads.grouped says when: always with a key/value cache, whose heads are the model's
    interface); the op's `num_heads` follows."""
    found = t.blocks[block]
    found.heads, found.groups = heads, units
    width = t.shapes.get(node.outputs[0].name, (0,))[-1] // heads
    slices = producer_slices(node.inputs[0], width, 0, t.shapes)  # the query's columns lead a packed input
    reason = slices if isinstance(slices, str) else _merged_readers(t, node.outputs[0], width, block)
    if isinstance(slices, list):
        found.add_sources(slices)
    if reason is not None:
        found.declined = f"{node.name} ({node.op}): {reason}"


def _extra_inputs(node: gs.Node) -> list[int] | str:
    """The inputs given beyond query, key, value and the mask (GroupQueryAttention: past key/value, 3 and 4,
    and the attention bias and head sink, 10 on); why the op's heads do not pair up."""
    if node.op != "GroupQueryAttention":
        return [i for i, x in enumerate(node.inputs) if x.name and i >= (5 if node.op == "Attention" else 4)]
    heads, units = int(node.attrs["num_heads"]), int(node.attrs.get("kv_num_heads", 0))
    if units < 1 or heads % units:
        return f"num_heads {heads} is not a multiple of kv_num_heads {units}"
    return [i for i, x in enumerate(node.inputs) if x.name and (i in (3, 4) or i >= 10)]


def _merged_readers(t: _Tracker, merged: gs.Tensor, width: int, block: int) -> str | None:
    """Record the linear projections reading the merged heads (`width` rows per head); the reason when
    something else reads them."""
    if any(merged is out for out in t.graph.outputs):
        return "the merged heads are a graph output"
    consumers = []
    for reader, read in _readers_through_qdq(merged):
        weight = weight_slice(reader, width, 0) if reader.inputs[0] is read else None
        if weight is None:
            return f"the merged heads are read by {reader.name} ({reader.op}), not a linear projection"
        rows = 0 if reader.op == "MatMul" or not reader.attrs.get("transB", 0) else 1
        consumers.append(HeadConsumer(reader, 1, rows, width, read.name))
    t.blocks[t.find(block)].consumers.extend(consumers)
    return None


def _readers_through_qdq(tensor: gs.Tensor) -> list[tuple[gs.Node, gs.Tensor]]:
    """The nodes reading `tensor` and the tensor each reads: through an activation's per-tensor
    QuantizeLinear/DequantizeLinear pair (QDQ models), the readers of what it dequantizes."""
    found = []
    for reader in tensor.outputs:
        if per_tensor_qdq(reader) and reader.inputs[0] is tensor and reader.outputs[0].name:
            found.extend(_readers_through_qdq(reader.outputs[0]))
        else:
            found.append((reader, tensor))
    return found


def _start(t: _Tracker, node: gs.Node, heads: int, width: int, sections: int = 1) -> None:
    """A head split opens a block: its projection's slices (those of each section of a sectioned split,
    graphopt.analysis.heads.sources.sectioned_split), its target entry counting heads."""
    block = t.new(heads)
    for section in range(sections):
        slices = producer_slices(node.inputs[0], width, section * heads * width, t.shapes)
        if isinstance(slices, str):
            t.blocks[block].declined = f"{node.name} (Reshape): {slices}"
            break
        t.blocks[block].add_sources(slices)
    position = len(t.shapes[node.outputs[0].name]) - 2
    t.blocks[block].shapes.append(ShapeEntry(node, position, 1))
    t.mark(node.outputs[0], position, block)


def _start_folded(t: _Tracker, node: gs.Node, heads: int, width: int) -> None:
    """A head split whose heads fold into the batch axis in front (graphopt.analysis.heads.sources.folded_split):
    its projection's slices (one section of a packed one, found behind the Gather that takes it), its target
    entry counting the batch times the heads."""
    block = t.new(heads)
    slices = producer_slices(node.inputs[0], width, 0, t.shapes)
    if isinstance(slices, str):
        t.blocks[block].declined = f"{node.name} (Reshape): {slices}"
    else:
        t.blocks[block].add_sources(slices)
    position = len(t.shapes[node.outputs[0].name]) - 2
    entry = _entry(t, node, position, 1)
    if isinstance(entry, str):
        t.blocks[block].declined = t.blocks[block].declined or f"{node.name} (Reshape): {entry}"
    elif entry is not None:
        t.blocks[block].shapes.append(entry)
    t.mark(node.outputs[0], position, block)


def _closed(t: _Tracker) -> list[HeadBlock]:
    """The blocks, a block whose head tensor is a graph output or that nothing projects declined."""
    for out in t.graph.outputs:
        if out.name in t.block_of:
            found = t.block(out)
            found.declined = found.declined or f"{out.name}: a head tensor is a graph output"
    blocks = t.roots()
    for found in blocks:
        if not found.declined and not found.consumers:
            found.declined = "no linear projection reads the merged heads"
    # a packed projection split into [sections, width] first looks like a head split, then its sections are
    # gathered: where blocks of its sections' heads were found behind it, it is no block of its own
    sections = {entry.node.name for found in blocks if not found.declined for entry in found.shapes}
    return [found for found in blocks if not (found.declined and found.shapes and found.shapes[0].node.name in sections
                                              and "gathers along the heads" in found.declined)]


def find_head_blocks(graph: gs.Graph, shapes: Shapes) -> list[HeadBlock]:
    """Every head block of `graph` (in topological order), declined ones with their reason."""
    t = _Tracker(graph, shapes)
    for node in graph.nodes:
        if (node.domain, node.op) in PACKED_ATTENTION:
            _attention_op(t, node)
            continue
        tracked = [x for x in node.inputs if x.name in t.axis]
        split = head_split(node, shapes) if node.op == "Reshape" and not tracked else None
        sectioned = sectioned_split(node, shapes) if node.op == "Reshape" and not tracked else None
        folded = folded_split(node, shapes) if node.op == "Reshape" and not tracked else None
        if split is not None:
            _start(t, node, *split)
        elif sectioned is not None:
            _start(t, node, sectioned[1], sectioned[2], sectioned[0])
        elif folded is not None:
            _start_folded(t, node, *folded)
        elif tracked:
            _step(t, node)
    return _closed(t)

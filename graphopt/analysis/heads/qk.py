"""Queries and keys of a head block: where their per-head width d is laid out, from the linear projections to
the scores' MatMul (q·kᵀ).

A head block (graphopt.analysis.heads) has a q/k structure when exactly one of its batched MatMuls feeds a
Softmax (through element-wise ops: the scale, the mask) and each of its two operands comes back, through
layout ops only (Transpose, Unsqueeze, Squeeze, a scalar Mul/Div, and for grouped-query attention the
Unsqueeze/Expand/Reshape that repeats a key head for its query heads), to a head split of a linear
projection whose columns lie per head (producer_slices: weight, bias and per-channel bias Adds). Along that
way d stays one axis, so any map of d applied per head to the projection's columns reaches the scores as
the same map of q (or k): q kᵀ becomes (q A)(k B)ᵀ. Changing d to r changes the width entry of every
Reshape (the head split, the repeat) and Expand target on the way, recorded as `WidthEntry`s; v is not
touched.

Declined, with the reason: fused attention ops (q and k inside a packed QKV weight whose op derives its
scale from the head size), q and k from one packed projection (Split/Slice offsets), a per-channel scale
between projection and head split, any other reader of q or k on the way (a Shape whose entry for d is
read counts: the width would be read at run time), a scale computed at run time (torch's legacy export of
scaled dot-product attention derives it from d), heads folded into the batch axis (torch's
nn.MultiheadAttention, whose q, k and v also share one packed projection), and rotary position embeddings
(element-wise tables and rotate-half Slice/Concat on d: only rotations commuting with RoPE, 2x2 blocks,
preserve the scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.heads.blocks import HeadBlock, HeadSlice, PackedCut, Shapes, constant_value
from graphopt.analysis.heads.sources import head_split, producer_slices

ROTARY = "rotary q/k: only rotations commuting with RoPE (2x2 blocks) preserve scores"
PACKED = "q and k come from one packed projection (Split/Slice): its cut sizes are not rewritten"
_ROTARY_OPS = {"Add", "Sub", "Mul", "Neg", "Concat", "Slice", "Split", "Sin", "Cos"}
_TO_SOFTMAX = {"Div", "Mul", "Add", "Sub", "Where", "Cast", "Identity"}


@dataclass(frozen=True)
class WidthEntry:
    """Entry `position` of a Reshape's or Expand's target holds the per-head width d."""

    node: gs.Node
    position: int


@dataclass
class QKSide:
    """One operand of q·kᵀ: its head split, how many heads the split makes, the projection's per-head column
    slices and the width entries between the split and the scores."""

    split: gs.Node
    heads: int
    slices: list[HeadSlice]
    entries: list[WidthEntry]

    @property
    def tensor(self) -> str:
        """The projection's output the split reads ([..., heads·d]): where q (or k) statistics are taken."""
        return self.split.inputs[0].name


@dataclass
class QKBlock:
    """A head block's queries and keys: `units` (the block's heads; a key head and its query group under
    grouped-query attention), each `width` wide."""

    block: HeadBlock
    width: int
    query: QKSide
    key: QKSide
    score: gs.Node

    @property
    def units(self) -> int:
        return self.block.heads

    def projections(self) -> HeadBlock:
        """The q/k projections as a head block of slices only (what channel planning leaves alone)."""
        return HeadBlock(self.block.heads, slices=self.query.slices + self.key.slices)


def _reaches_softmax(node: gs.Node) -> bool:
    tensor = node.outputs[0]
    for _ in range(8):
        readers = [r for r in tensor.outputs if r.op != "Shape"]
        if len(readers) != 1:
            return False
        if readers[0].op in ("Softmax", "LogSoftmax"):
            return True
        if readers[0].op not in _TO_SOFTMAX:
            return False
        tensor = readers[0].outputs[0]
    return False


def _shape_reads_axis(shape: gs.Node, axis: int, rank: int) -> bool:
    """Whether a Shape node's output is used for entry `axis` (anything but a Gather of other constant entries)."""
    if "start" in shape.attrs or "end" in shape.attrs:
        return True
    for reader in shape.outputs[0].outputs:
        indices = constant_value(reader.inputs[1]) if reader.op == "Gather" else None
        if indices is None or axis in {int(i) % rank for i in indices.reshape(-1)}:
            return True
    return False


def _other_reader(tensor: gs.Tensor, reader: gs.Node | None, axis: int, shapes: Shapes) -> str | None:
    """Why `tensor` (q or k on the way, d on `axis`) cannot change width: another reader, or its width read."""
    rank = len(shapes.get(tensor.name, ()))
    for other in tensor.outputs:
        if other is reader:
            continue
        if other.op == "Shape" and rank and not _shape_reads_axis(other, axis, rank):
            continue
        return f"{tensor.name}: also read by {other.name} ({other.op})"
    return None


def _unsqueezed_back(node: gs.Node, axis: int, shapes: Shapes) -> int | str:
    """The input axis of output `axis` of an Unsqueeze or Squeeze."""
    in_rank, out_rank = len(shapes.get(node.inputs[0].name, ())), len(shapes.get(node.outputs[0].name, ()))
    given = node.attrs.get("axes") if len(node.inputs) < 2 else constant_value(node.inputs[1])
    if given is None:
        return f"{node.name} ({node.op}): axes not constant"
    rank = out_rank if node.op == "Unsqueeze" else in_rank
    axes = {int(a) % rank for a in np.reshape(given, -1)}
    if node.op == "Unsqueeze":
        return [i for i in range(out_rank) if i not in axes].index(axis)
    return [i for i in range(in_rank) if i not in axes][axis]


def _step_back(node: gs.Node, axis: int, shapes: Shapes, entries: list[WidthEntry]) -> tuple[gs.Tensor, int] | str:
    """One layout op back from its output (d on `axis`): (its input, d's axis there)."""
    out = shapes.get(node.outputs[0].name)
    before = shapes.get(node.inputs[0].name) if node.inputs else None
    if out is None or before is None:
        return f"{node.name} ({node.op}): shapes unknown"
    if node.op == "Transpose":
        return node.inputs[0], list(node.attrs.get("perm", range(len(out) - 1, -1, -1)))[axis]
    if node.op in ("Unsqueeze", "Squeeze"):
        moved = _unsqueezed_back(node, axis, shapes)
        return moved if isinstance(moved, str) else (node.inputs[0], moved)
    if node.op in ("Mul", "Div") and _scalar_operand(node):
        return node.inputs[0], axis
    declined = _declined(node, axis, out, before, shapes)
    if declined is not None:
        return declined
    if node.op in ("Expand", "Reshape"):
        return _repeat_back(node, axis, out, before, entries)
    return f"{node.name} ({node.op}): not a layout op between q/k and the scores"


def _declined(node: gs.Node, axis: int, out: tuple[int, ...], before: tuple[int, ...], shapes: Shapes) -> str | None:
    """Why the walk stops at `node`, for the ops that say more than "not a layout op" (None: no such reason)."""
    if node.op == "Reshape" and _folds_heads(out, before, axis):
        return (f"{node.name} (Reshape): folds the heads into the batch axis (nn.MultiheadAttention's layout), "
                "which the q/k walk does not follow")
    if node.op in ("Mul", "Div") and len(node.inputs) == 2 and shapes.get(node.inputs[1].name) in ((), (1,)):
        return (f"{node.name} ({node.op}): a scale computed at run time (torch's legacy export reads it from the "
                "per-head width, which would change with it)")
    return ROTARY if node.op in _ROTARY_OPS else None


def _folds_heads(out: tuple[int, ...], before: tuple[int, ...], axis: int) -> bool:
    """Whether a Reshape lays [..., heads·d] out as [..., batch·heads, d] (the same rank, d last)."""
    if len(out) != len(before) or axis != len(out) - 1 or out[-1] >= before[-1] or before[-1] % out[-1]:
        return False
    return math.prod(out[:-1]) == math.prod(before[:-1]) * (before[-1] // out[-1])


def _repeat_back(node: gs.Node, axis: int, out: tuple[int, ...], before: tuple[int, ...],
                 entries: list[WidthEntry]) -> tuple[gs.Tensor, int] | str:
    """Back through the Expand and Reshape that repeat key heads for their queries (d kept whole)."""
    if node.op == "Expand":
        own = axis - (len(out) - len(before))
        if own < 0 or before[own] != out[axis]:
            return f"{node.name} (Expand): expands the per-head width"
        entries.append(WidthEntry(node, axis))
        return node.inputs[0], own
    if axis == len(out) - 1 and before[-1] == out[-1]:  # key heads repeated for queries
        entries.append(WidthEntry(node, axis))
        return node.inputs[0], len(before) - 1
    return f"{node.name} (Reshape): not a layout op between q/k and the scores"


def _scalar_operand(node: gs.Node) -> bool:
    """A Mul/Div of the data by one constant value (the attention scale)."""
    if len(node.inputs) != 2:
        return False
    value = constant_value(node.inputs[1])
    return value is not None and value.size == 1 and constant_value(node.inputs[0]) is None


def _side(tensor: gs.Tensor, axis: int, reader: gs.Node, shapes: Shapes) -> QKSide | str:
    """Walk back from one operand of q·kᵀ (d on `axis`) to its head split and projection."""
    entries: list[WidthEntry] = []
    while True:
        reason = _other_reader(tensor, reader, axis, shapes)
        if reason is not None:
            return reason
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None:
            return f"{tensor.name}: not computed by a projection"
        split = head_split(node, shapes) if node.op == "Reshape" else None
        if split is not None and axis == len(shapes[node.outputs[0].name]) - 1:
            entries.append(WidthEntry(node, axis))
            source = node.inputs[0]
            reason = _other_reader(source, node, len(shapes.get(source.name, ())) - 1, shapes)
            slices = producer_slices(source, split[1], 0, shapes) if reason is None else reason
            if not isinstance(slices, str) and any(isinstance(s, PackedCut) for s in slices):
                return PACKED
            return slices if isinstance(slices, str) else QKSide(node, split[0], slices, entries)
        step = _step_back(node, axis, shapes, entries)
        if isinstance(step, str):
            return step
        reader, (tensor, axis) = node, step


def _checked(side: QKSide) -> str | None:
    """Why a side's projection cannot take a per-head map of its columns."""
    scales = [s.node for s in side.slices if s.node.op in ("Mul", "Div")]
    if scales:
        return f"{scales[0].name} ({scales[0].op}): a per-channel scale between the projection and the head split"
    return None


def find_qk(block: HeadBlock, shapes: Shapes) -> QKBlock | str:
    """The q/k structure of `block`, or why it has none that a per-head map of d can rewrite."""
    if block.attributes:
        node = block.attributes[0]
        return (f"{node.name} ({node.op}): q and k are packed inside a fused attention op that derives its scale "
                "from the head size")
    scores = [n for n in block.mixing if n.op == "MatMul" and _reaches_softmax(n)]
    if len(scores) != 1:
        return f"{len(scores)} q·kᵀ MatMuls feeding a Softmax"
    score = scores[0]
    rank = len(shapes.get(score.outputs[0].name, ()))
    query = _side(score.inputs[0], rank - 1, score, shapes)
    if isinstance(query, str):
        return query
    key = _side(score.inputs[1], rank - 2, score, shapes)
    if isinstance(key, str):
        return key
    width = int(shapes[query.split.outputs[0].name][-1])
    reason = _mismatch(block, query, key, width, shapes)
    return reason if reason is not None else QKBlock(block, width, query, key, score)


def _mismatch(block: HeadBlock, query: QKSide, key: QKSide, width: int, shapes: Shapes) -> str | None:
    """Why the two sides cannot share one per-head map of d (None: they can)."""
    reason = _checked(query) or _checked(key)
    if reason is None and int(shapes[key.split.outputs[0].name][-1]) != width:
        reason = "q and k heads differ in width"
    if reason is None and (query.heads % block.heads or key.heads % block.heads):
        reason = f"{query.heads} query and {key.heads} key heads do not divide into {block.heads} units"
    if reason is None and {id(s.node) for s in query.slices} & {id(s.node) for s in key.slices}:
        reason = "q and k share a projection"
    return reason

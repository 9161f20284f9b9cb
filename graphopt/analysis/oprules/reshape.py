"""Rules for Reshape and Flatten, the ops that re-lay channels out.

With channel axis c of size D in the input (batch-1 static shapes), `pre` = prod(in[:c]):
- kept:    an output axis j with prod(out[:j]) = pre and out[j] = D carries the channels unchanged;
- flatten: out[j] = D * prod(in[c+1:c+1+k]) carries each channel as a contiguous block (factor grows);
- split:   out[j] * out[j+1] = D, heads x head_dim: the head_dim atoms are coupled across heads (the
           same indices are kept in every head), and axis j+1 carries one head's atoms; likewise
           sections x heads x head_dim (a packed q/k/v projection split as [3, H, d]), every section's heads
           coupled, the channels on the last of the three axes;
- merge:   in[c-1] * in[c] = out[j], heads x head_dim back to one axis: the atoms repeat per head;
- folded heads: out[j] * H = D with the H heads folded into the axis in front (prod(out[:j]) = pre * H, as
           torch's nn.MultiheadAttention lays [seq, batch x heads, head_dim] out): a split.
The axes in front of the channel axis may also regroup among themselves ([batch x heads, d, T] <->
[batch, heads, d, T]) while the channel axis and those behind it stay as they are.
- groups:  [N, C, ...] -> [N, G, -1] read only by an InstanceNormalization with per-group scale and bias
           whose output a Reshape lays back to the input's shape: torch's GroupNorm as both exporters write
           it (per-tensor QuantizeLinear/DequantizeLinear pairs may stand between the three, as in QDQ
           models). The channels go in whole groups (graphopt.analysis.channels' granule); the second
           reshape's output carries them on, the G entry and the per-group parameters count the groups kept.
The batch axis must stay axis 0, so a reshape that folds the batch into channels is refused; one that
keeps the channels as the last axis and only re-lays the rows (tf.tensordot's [N, T, C] -> [-1, C] and
back) may fold it into the rows. An explicit shape entry that must change is rewritten by the engine;
it has to be a constant (or a constant piece of the Concat that builds the shape, the other pieces'
lengths known). A shape computed at run time only from `Shape` outputs (x.view(b, g, c // g, h, w) in
exporters' graphs) follows the pruned sizes by itself and is left alone; the optimised model is run
afterwards, so a wrong guess fails loudly. Any other shape source blocks the group.
Rotations (`relaid`): a Reshape, Flatten, Squeeze or Unsqueeze passes a rotation of an axis it keeps whole
(the same size, and as many elements behind it before and after), onto the axis it becomes.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.registry import Mixing, linear, register
from graphopt.analysis.state import Analysis, constant_values
from graphopt.ir import graph as ir


ShapeOf = Callable[[gs.Tensor], "tuple[int, ...] | None"]
SHAPE_PASSTHROUGH = ("Cast", "Identity")  # what may stand between a target shape and the Concat building it


def _length(piece: gs.Tensor, shape_of: ShapeOf | None) -> int | None:
    """Entries of a rank-1 shape piece, None when unknown."""
    if isinstance(piece, gs.Constant):
        return int(np.asarray(piece.values).size)
    shape = shape_of(piece) if shape_of is not None else piece.shape
    if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
        return None
    return int(shape[0])


def shape_entry(node: gs.Node, position: int, shape_of: ShapeOf | None = None,
                replaceable: bool = False) -> tuple[gs.Node, int, int] | None:
    """(node, input index, element index) of the constant holding Reshape shape entry `position`: the
    shape itself, or a constant piece of the Concat that builds it, perhaps through a Cast (`shape_of` gives the
    other pieces' lengths; the tensors' own shapes by default); with `replaceable`, also a one-element piece
    computed at run time (a caller may replace it by a constant)."""
    shape = node.inputs[1]
    if isinstance(shape, gs.Constant):
        return node, 1, position
    concat = shape.inputs[0] if shape.inputs else None
    while concat is not None and concat.op in SHAPE_PASSTHROUGH and concat.inputs[0].inputs:
        concat = concat.inputs[0].inputs[0]  # tf2onnx builds shapes in int32 and casts them to int64
    if concat is None or concat.op != "Concat":
        return None
    offset = 0
    for index, piece in enumerate(concat.inputs):
        length = _length(piece, shape_of)
        if length is None:
            return None
        if offset <= position < offset + length:
            usable = isinstance(piece, gs.Constant) or (replaceable and length == 1)
            return (concat, index, position - offset) if usable else None
        offset += length
    return None


def _entry_value(node: gs.Node, position: int, shape_of: ShapeOf) -> int | None:
    located = shape_entry(node, position, shape_of)
    if located is None:
        return None
    holder, index, element = located
    return int(np.asarray(holder.inputs[index].values).reshape(-1)[element])


_SHAPE_ARITHMETIC = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Div", "Mul", "Add", "Sub", "Cast",
                     "Slice", "Concat", "Constant", "Identity"}


def from_runtime_shapes(tensor: gs.Tensor) -> bool:
    """True when `tensor` is computed only from `Shape` outputs and constants (so it follows pruning)."""
    stack, seen, reads_shape = [tensor], set(), False
    while stack:
        current = stack.pop()
        if isinstance(current, gs.Constant) or current.name in seen:
            continue
        seen.add(current.name)
        producer = current.inputs[0] if current.inputs else None
        if producer is None or producer.op not in _SHAPE_ARITHMETIC:
            return False
        if producer.op == "Shape":
            reads_shape = True
            continue
        stack.extend(producer.inputs)
    return reads_shape


def shapes_read(tensor: gs.Tensor) -> list[gs.Tensor]:
    """The tensors whose run-time shapes `tensor` (computed only from shapes, see from_runtime_shapes) reads."""
    stack, seen, read = [tensor], set(), []
    while stack:
        current = stack.pop()
        if isinstance(current, gs.Constant) or current.name in seen or not current.inputs:
            continue
        seen.add(current.name)
        producer = current.inputs[0]
        if producer.op == "Shape":
            read.append(producer.inputs[0])
        else:
            stack.extend(producer.inputs)
    return read


def entry_kind(node: gs.Node, position: int, shape_of: ShapeOf, cut: Callable[[gs.Tensor], bool]) -> str | None:
    """How Reshape target entry `position` meets a cut of what it counts: "inferred" (-1, or 0 copying the
    input), "constant" (an explicit constant, to rewrite), "follows" (computed at run time from the shapes of
    tensors `cut` says are cut with it), "piece" (a one-element Concat piece computed from other shapes: the
    caller replaces or scales it); None where it cannot be rewritten."""
    if shape_entry(node, position, shape_of) is not None:
        value = _entry_value(node, position, shape_of)
        return "inferred" if value == -1 or (value == 0 and not node.attrs.get("allowzero", 0)) else "constant"
    piece = shape_entry(node, position, shape_of, replaceable=True)
    source = piece[0].inputs[piece[1]] if piece is not None else node.inputs[1]
    if not from_runtime_shapes(source):
        return None
    if all(cut(read) for read in shapes_read(source)):
        return "follows"
    return "piece" if piece is not None else None


def _needs_edit(node: gs.Node, position: int, a: Analysis) -> bool | None:
    """False: the entry follows the pruned sizes by itself; True: an explicit entry to rewrite, or a
    one-element piece computed from shapes that pruning leaves alone (attention's reshape back to [B, T, C]
    with C read from the block's input: it becomes the constant); None: not editable."""
    kind = entry_kind(node, position, a.shape, lambda tensor: a.state(tensor) is not None)
    return None if kind is None else kind in ("constant", "piece")


def _kept_or_flattened(in_shape: tuple[int, ...], out_shape: tuple[int, ...], c: int,
                       j: int) -> tuple[str, int, int] | None:
    """Output axis j carries input channel axis c unchanged, or as leading blocks of a flattened axis."""
    dim = in_shape[c]
    if out_shape[j] == dim and math.prod(out_shape[j + 1:]) == math.prod(in_shape[c + 1:]):
        return "kept", j, 1
    for k in range(1, len(in_shape) - c):
        block = math.prod(in_shape[c + 1:c + 1 + k])
        if out_shape[j] == dim * block and math.prod(out_shape[j + 1:]) == math.prod(in_shape[c + 1 + k:]):
            return "flatten", j, block
    for last in range(j + 1, len(out_shape)):  # heads x head_dim, or sections x heads x head_dim
        blocks = math.prod(out_shape[j:last])
        if blocks * out_shape[last] == dim and blocks > 1:
            return "split", last, blocks
        if blocks * out_shape[last] > dim:
            break
    return None


def _merged_heads(in_shape: tuple[int, ...], out_shape: tuple[int, ...], c: int) -> tuple[str, int, int] | None:
    """Heads x head_dim (input axes c-1, c) merged back into one output axis; or the last k entries of axis c-1
    merged with the channels (k consecutive positions side by side: tf2onnx's [N, L, C] -> [N, L/k, k x C]),
    the channels repeating k times as they do per head."""
    for j in range(1, len(out_shape)):
        k = out_shape[j] // in_shape[c] if out_shape[j] % in_shape[c] == 0 else 0
        if k > 1 and in_shape[c - 1] % k == 0 and math.prod(out_shape[:j]) * k == math.prod(in_shape[:c]) \
                and math.prod(out_shape[j + 1:]) == math.prod(in_shape[c + 1:]) and out_shape[0] == in_shape[0]:
            return "merge", j, k
    return None


def _folded_heads(in_shape: tuple[int, ...], out_shape: tuple[int, ...], c: int) -> tuple[str, int, int] | None:
    """Heads x head_dim where the heads fold into the axis in front (torch's nn.MultiheadAttention: [seq, batch,
    heads x head_dim] -> [seq, batch x heads, head_dim]): a split whose heads leave the channel axis."""
    pre, behind = math.prod(in_shape[:c]), math.prod(in_shape[c + 1:])
    for j in range(1, len(out_shape)):
        width = out_shape[j]
        heads = in_shape[c] // width if 0 < width < in_shape[c] and in_shape[c] % width == 0 else 0
        if heads and math.prod(out_shape[:j]) == pre * heads and math.prod(out_shape[j + 1:]) == behind \
                and tuple(out_shape[:j - 1]) == tuple(in_shape[:j - 1]):
            return "split", j, heads
    return None


def _in_place(in_shape: tuple[int, ...], out_shape: tuple[int, ...], c: int) -> tuple[str, int, int] | None:
    """The channel axis kept, flattened or split on an output axis j whose axes in front hold what the input's
    did: the batch stays axis 0, or the channels are last in both (the rows re-laid), or the axes in front
    regroup among themselves while the channel axis and those behind it stay as they are."""
    pre = math.prod(in_shape[:c])
    for j in range(len(out_shape)):
        rows_only = c == len(in_shape) - 1 and j == len(out_shape) - 1
        regrouped = j > 0 and tuple(out_shape[j:]) == tuple(in_shape[c:])
        batch_kept = out_shape[0] == in_shape[0] or rows_only or regrouped
        if math.prod(out_shape[:j]) != pre or (c > 0 and (j == 0 or not batch_kept)):
            continue
        found = _kept_or_flattened(in_shape, out_shape, c, j)
        if found is not None:
            return found
    return None


def _layout(in_shape: tuple[int, ...], out_shape: tuple[int, ...], state: ChannelState) -> tuple[str, int, int] | None:
    c = state.axis
    found = _in_place(in_shape, out_shape, c)
    if found is not None or state.factor != 1 or c == 0:
        return found
    return (_merged_heads(in_shape, out_shape, c) if c > 1 else None) or _folded_heads(in_shape, out_shape, c)


def _only_reader(a: Analysis, tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The single `op` node reading `tensor`, where nothing else reads it and it is not a graph output."""
    reader = ir.only_reader(a.graph, tensor)
    return reader if reader is not None and reader.op == op else None


def _group_count(node: gs.Node, a: Analysis, state: ChannelState) -> int | None:
    """G where `node` reshapes [N, C, ...] with the channels on axis 1 to [N, G, C/G x ...], else None."""
    in_shape, out_shape = a.shape(node.inputs[0]), a.shape(node.outputs[0])
    if state.axis != 1 or state.factor != 1 or not in_shape or not out_shape or len(out_shape) != 3:
        return None
    groups = out_shape[1]
    fits = out_shape[0] == in_shape[0] and groups > 0 and in_shape[1] % groups == 0 \
        and groups * out_shape[2] == math.prod(in_shape[1:]) and a.size(state) == in_shape[1]
    return groups if fits else None


def _group_norm_nodes(node: gs.Node, a: Analysis, groups: int) -> tuple[gs.Node, gs.Node] | None:
    """(the InstanceNormalization with per-group constants that alone reads `node`, the Reshape back to the
    input's shape that alone reads it), else None."""
    norm = _only_reader(a, ir.past_qdq_pairs(a.graph, node.outputs[0]), "InstanceNormalization")
    back = _only_reader(a, ir.past_qdq_pairs(a.graph, norm.outputs[0]), "Reshape") if norm is not None else None
    if back is None or a.shape(back.outputs[0]) != a.shape(node.inputs[0]):
        return None
    params = [constant_values(t) for t in norm.inputs[1:3]]
    return (norm, back) if all(p is not None and p.size == groups for p in params) else None


def _group_norm(node: gs.Node, a: Analysis, state: ChannelState) -> bool:
    """Record torch's decomposed GroupNorm starting at `node` (see "groups" above); False where it is not one."""
    groups = _group_count(node, a, state)
    found = _group_norm_nodes(node, a, groups) if groups is not None else None
    if found is None:
        return False
    norm, back = found
    cut = lambda tensor: a.state(tensor) is not None  # noqa: E731
    entries = entry_kind(node, 1, a.shape, cut), entry_kind(node, 2, a.shape, cut), entry_kind(back, 1, a.shape, cut)
    run = a.size(state) // groups
    if entries[0] not in ("inferred", "constant", "piece") or entries[1] not in ("inferred", "constant") \
            or entries[2] is None or not a.in_runs(state, run, node):
        return False
    if entries[0] != "inferred":
        a.site("shape", node, state, index=1, axis=1, per=run)
    for index in (1, 2):
        a.site("weight", norm, state, index=index, axis=0, role="param", per=run)
    if entries[2] in ("constant", "piece"):
        a.site("shape", back, state, index=1, axis=1)
    a.set_state(back.outputs[0], state)  # the reshape back finds no channels on its input and leaves this alone
    return True


def _unrecognised(node: gs.Node, a: Analysis, state: ChannelState) -> None:
    """A reshape of none of the layouts above: a decomposed GroupNorm, or the group is blocked."""
    if not _group_norm(node, a, state):
        a.block(state, f"{node.name} (Reshape): channel layout not recognised")


def reshape_rule(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    if state is None:
        return
    in_shape, out_shape = a.shape(node.inputs[0]), a.shape(node.outputs[0])
    layout = _layout(in_shape, out_shape, state) if in_shape and out_shape else None
    if layout is None:
        _unrecognised(node, a, state)
        return
    kind, axis, amount = layout
    if kind in ("split", "merge") and state.factor != 1:
        a.block(state, f"{node.name} (Reshape): heads of flattened channels")
        return
    if kind == "kept":
        out = ChannelState(axis, state.atoms, state.factor)
    elif kind == "flatten":
        out = ChannelState(axis, state.atoms, state.factor * amount)
    elif kind == "split":
        head_dim = a.size(state) // amount
        heads = [a.atoms.slice(state.atoms, h * head_dim, (h + 1) * head_dim) for h in range(amount)]
        for other in heads[1:]:
            a.atoms.unify(heads[0], other)
        out = ChannelState(axis, heads[0])
    else:
        out = ChannelState(axis, state.atoms * amount)
    _target_entry(node, a, state, out, axis)


def _target_entry(node: gs.Node, a: Analysis, state: ChannelState, out: ChannelState, position: int) -> None:
    """Carry `out` to `node`'s output where entry `position` of its target shape follows a cut by itself or can
    be rewritten (a "shape" site); block `state` where it can do neither."""
    edit = _needs_edit(node, position, a)
    if edit is None:
        a.block(state, f"{node.name} ({node.op}): target shape computed at run time")
        return
    if edit:
        a.site("shape", node, out, index=1, axis=position)
    a.set_state(node.outputs[0], out)


def flatten_rule(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    if state is None:
        return
    in_shape = a.shape(node.inputs[0])
    start = int(node.attrs.get("axis", 1))
    start = start + len(in_shape) if in_shape is not None and start < 0 else start
    if in_shape is None or start == 0 or state.axis < start or math.prod(in_shape[start:state.axis]) != 1:
        a.block(state, f"{node.name} (Flatten): channels do not lead the flattened block")
        return
    block = math.prod(in_shape[state.axis + 1:])
    a.set_state(node.outputs[0], ChannelState(1, state.atoms, state.factor * block))


def expand_rule(node: gs.Node, a: Analysis) -> None:
    """Expand broadcasts its input to a shape (tf2onnx's BroadcastTo of a statistic back over the rows): the
    channel axis keeps its place counted from the end; its entry in the target shape, where the target reaches
    it, is 1 (broadcast: it follows), or the channel count, rewritten as a Reshape's is."""
    a.block(a.state(node.inputs[1]), f"{node.name} (Expand): channels on the target shape")
    state = a.state(node.inputs[0])
    if state is None:
        return
    in_shape, out_shape = a.shape(node.inputs[0]), a.shape(node.outputs[0])
    target = _length(node.inputs[1], a.shape)
    if in_shape is None or out_shape is None or target is None:
        a.block(state, f"{node.name} (Expand): shapes unknown")
        return
    axis = state.axis + len(out_shape) - len(in_shape)
    position = axis - (len(out_shape) - target)
    out = ChannelState(axis, state.atoms, state.factor)
    if position >= 0 and _entry_value(node, position, a.shape) != 1:
        _target_entry(node, a, state, out, position)
        return
    a.set_state(node.outputs[0], out)


def _static_product(dims: tuple | list) -> int | None:
    return math.prod(dims) if all(isinstance(d, int) and d >= 0 for d in dims) else None


def relaid(before: tuple | list | None, after: tuple | list | None) -> Mixing | str:
    """The axes a row-major re-layout of `before` into `after` keeps whole: input axis i becomes output
    axis j when after[j] = before[i] and the axes behind them hold as many elements
    (prod(after[j+1:]) = prod(before[i+1:])); since both hold the same elements, the axes in front of
    them do too, so every slice along i is the slice along j, re-laid but never mixed with another.
    Every other input axis is mixed (split, merged or moved into another)."""
    if before is None or after is None:
        return "shapes unknown"
    moved: list[int | None] = []
    for i, dim in enumerate(before):
        behind = _static_product(before[i + 1:])
        found = None if not isinstance(dim, int) or behind is None else next(
            (j for j, out in enumerate(after) if out == dim and _static_product(after[j + 1:]) == behind), None)
        moved.append(found)
    return Mixing(frozenset(i for i, j in enumerate(moved) if j is None), tuple(moved))


def _reshape_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    return relaid(tensor.shape, node.outputs[0].shape)


def _flatten_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    before = tensor.shape
    if before is None:
        return "shapes unknown"
    start = int(node.attrs.get("axis", 1))
    start = start + len(before) if start < 0 else start
    head, tail = _static_product(before[:start]), _static_product(before[start:])
    return relaid(before, ["N" if head is None else head, "M" if tail is None else tail])


register("Reshape", channels=reshape_rule, layout=True, rotation=linear(_reshape_mixing))
register("Flatten", channels=flatten_rule, layout=True, rotation=linear(_flatten_mixing))
register("Expand", channels=expand_rule, layout=True)

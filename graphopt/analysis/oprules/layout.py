"""Rules for ops that move channels without mixing them: Transpose, Concat, Split, Slice, Pad,
Resize/Upsample, Squeeze/Unsqueeze, and Shape (which only reads the run-time shape).

Concat lays atoms end to end (an untracked input becomes a fixed, blocked segment); Split and Slice
cut atoms at their bounds and record sites so the engine can recompute sizes and bounds; the others
carry the channel state to its new axis or block it when they touch the channel axis.
Rotations: each op states the axes it mixes (cuts, pads, interpolates along, splits) and passes a
rotation of any other axis; Concat on another axis passes one that all its inputs carry alike; Shape and
Size read only the shape, which a rotation keeps, and carry it nowhere.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.constants import keeps_when, pad as pad_constant
from graphopt.analysis.oprules.reshape import relaid
from graphopt.analysis.registry import Carried, Mixing, linear, positive_axis, rank_of, register
from graphopt.analysis.state import Analysis, constant_values


def shape_of(node: gs.Node, a: Analysis) -> None:
    """Reads only the (run-time) shape: pruning changes the value it computes, consistently."""


def transpose(node: gs.Node, a: Analysis) -> None:
    state, rank = a.state(node.inputs[0]), a.rank(node.inputs[0])
    if state is None:
        return
    perm = list(node.attrs.get("perm", range(rank - 1, -1, -1) if rank else []))
    a.set_state(node.outputs[0], ChannelState(perm.index(state.axis), state.atoms, state.factor))


def _concat_other_axis(node: gs.Node, a: Analysis, states: list[ChannelState | None]) -> None:
    """Channels on an axis other than the concatenation axis: every input must carry them alike."""
    others = [s for s in states if s is not None]
    if len(others) == len(states) and all(s.axis == others[0].axis for s in others):
        for state in others[1:]:
            a.unify(others[0], state, node)
        a.set_state(node.outputs[0], others[0])
    else:
        a.block_inputs(node, "concatenates along an axis other than the channel axis")


def _concat_segments(node: gs.Node, a: Analysis, states: list[ChannelState | None], axis: int) -> list[int] | None:
    """The atoms laid end to end; an untracked input becomes a fixed, blocked segment (None: size unknown)."""
    atoms: list[int] = []
    for tensor, state in zip(node.inputs, states):
        if state is None:  # a fixed segment (graph input, constant): its channels stay
            shape = a.shape(tensor)
            if shape is None:
                a.block_inputs(node, f"size of untracked input '{tensor.name}' unknown")
                return None
            state = a.new_state(axis, shape[axis])
            a.block(state, f"{node.name} (Concat): segment from '{tensor.name}' is not prunable")
        atoms.extend(state.atoms)
    return atoms


def concat(node: gs.Node, a: Analysis) -> None:
    rank = a.rank(node.outputs[0])
    if rank is None:
        a.block_inputs(node, "output rank unknown")
        return
    axis = positive_axis(int(node.attrs["axis"]), rank)
    states = [a.state(t) for t in node.inputs]
    if all(s is None for s in states):
        return
    if any(s is not None and s.axis != axis for s in states):
        _concat_other_axis(node, a, states)
        return
    if any(s is not None and s.factor != 1 for s in states):
        a.block_inputs(node, "concatenates flattened channels")
        return
    atoms = _concat_segments(node, a, states, axis)
    if atoms is not None:
        a.set_state(node.outputs[0], ChannelState(axis, tuple(atoms)))


def _split_sizes(node: gs.Node, a: Analysis, total: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = constant_values(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    if node.attrs.get("split") is not None:
        return [int(s) for s in node.attrs["split"]]
    count = len(node.outputs)
    return [total // count] * count if total % count == 0 else None


def split(node: gs.Node, a: Analysis) -> None:
    state, rank = a.state(node.inputs[0]), a.rank(node.inputs[0])
    if state is None:
        return
    axis = positive_axis(int(node.attrs.get("axis", 0)), rank)
    if axis != state.axis:
        for output in node.outputs:
            a.set_state(output, state)
        return
    sizes = _split_sizes(node, a, a.size(state))
    if sizes is None or state.factor != 1:
        a.block(state, f"{node.name} (Split): split sizes are not constant")
        return
    outputs, start = [], 0
    for output, size in zip(node.outputs, sizes):
        piece = ChannelState(axis, a.atoms.slice(state.atoms, start, start + size))
        a.set_state(output, piece)
        outputs.append(piece)
        start += size
    a.site("split", node, state, outputs=outputs)


def _slice_bounds(values: list, position: int, size: int) -> tuple[int, int, int | None]:
    """(start, stop, step) of the slice along the channel axis, clamped to [0, size]."""
    steps = values[3] if len(values) > 3 and values[3] is not None else None
    start, stop = (min(max(int(v[position]) + (size if int(v[position]) < 0 else 0), 0), size)
                   for v in values[:2])
    return start, stop, None if steps is None else int(steps[position])


def slice_(node: gs.Node, a: Analysis) -> None:
    state, rank = a.state(node.inputs[0]), a.rank(node.inputs[0])
    if state is None:
        return
    values = [constant_values(t) if t.name else None for t in node.inputs[1:]]
    if len(values) < 2 or values[0] is None or values[1] is None:
        a.block(state, f"{node.name} (Slice): bounds are not constant")
        return
    axes = values[2] if len(values) > 2 and values[2] is not None else range(len(values[0]))
    axes = [positive_axis(int(x), rank) for x in axes]
    if state.axis not in axes:
        a.set_state(node.outputs[0], state)
        return
    position = axes.index(state.axis)
    start, stop, step = _slice_bounds(values, position, a.size(state) * state.factor)
    if state.factor != 1 or (step is not None and step != 1) or stop <= start:
        a.block(state, f"{node.name} (Slice): strided, empty or flattened channel slice")
        return
    a.set_state(node.outputs[0], ChannelState(state.axis, a.atoms.slice(state.atoms, start, stop)))
    a.site("slice", node, state, axis=position)


def pad(node: gs.Node, a: Analysis) -> None:
    state, rank = a.state(node.inputs[0]), a.rank(node.inputs[0])
    if state is None:
        return
    pads = node.attrs.get("pads") if len(node.inputs) < 2 else constant_values(node.inputs[1])
    if pads is None or len(node.inputs) > 3 or int(pads[state.axis]) or int(pads[state.axis + rank]):
        a.block(state, f"{node.name} (Pad): pads the channel axis or pads are not constant")
        return
    a.set_state(node.outputs[0], state)


def resize(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    if state is None:
        return
    scales = None
    for tensor in node.inputs[1:]:
        values = constant_values(tensor) if tensor.name else None
        if values is not None and values.size == a.rank(node.inputs[0]) and values.dtype.kind == "f":
            scales = values
    if scales is None or float(scales[state.axis]) != 1.0:
        a.block(state, f"{node.name} ({node.op}): channel scale is not a constant 1 (sizes are not supported)")
        return
    a.set_state(node.outputs[0], state)


def squeeze(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    if state is None:
        return
    in_shape, out_shape = a.shape(node.inputs[0]), a.shape(node.outputs[0])
    if in_shape is None or out_shape is None:
        a.block(state, f"{node.name} ({node.op}): shapes unknown")
        return
    before = math.prod(in_shape[:state.axis])
    for axis in range(len(out_shape)):
        if math.prod(out_shape[:axis]) == before and out_shape[axis] == in_shape[state.axis]:
            a.set_state(node.outputs[0], ChannelState(axis, state.atoms, state.factor))
            return
    a.block(state, f"{node.name} ({node.op}): removes the channel axis")


# -- rotations: each op states the axes it mixes (graphopt.analysis.registry.linear) -------------

def _same_axes(rank: int, mixes: set[int] | frozenset[int], outputs: tuple[int, ...] = (0,)) -> Mixing:
    return Mixing(frozenset(mixes), tuple(range(rank)), outputs)


def _transpose_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    perm, rank = node.attrs.get("perm"), rank_of(tensor)
    if perm is None and rank is None:
        return "Transpose of unknown rank"
    order = [int(p) for p in (perm if perm is not None else range(rank - 1, -1, -1))]
    return Mixing(frozenset(), tuple(order.index(i) for i in range(len(order))))


def _split_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    rank = rank_of(tensor)
    if rank is None:
        return "rank unknown"
    return _same_axes(rank, {positive_axis(int(node.attrs.get("axis", 0)), rank)}, tuple(range(len(node.outputs))))


def _slice_values(node: gs.Node) -> list:
    """[starts, ends, axes, steps] of a Slice (attributes before opset 10, constant inputs after; None
    where absent or not constant)."""
    if node.attrs.get("starts") is not None:
        return [node.attrs.get(k) for k in ("starts", "ends", "axes")] + [None]
    return ([constant_values(t) if t.name else None for t in node.inputs[1:5]] + [None] * 4)[:4]


def _whole(start: int, end: int, step: int, size: int | str) -> bool:
    """True when [start:end:step] keeps every position of an axis of `size`."""
    if not isinstance(size, int) or step != 1:
        return False
    return max(start + size if start < 0 else start, 0) == 0 and (end + size if end < 0 else end) >= size


def _slice_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    """Mixes (cuts) every axis it does not keep whole: start 0, end at or past the size, step 1."""
    rank, shape = rank_of(tensor), tensor.shape
    starts, ends, axes, steps = _slice_values(node)
    if rank is None or starts is None or ends is None:
        return "bounds are not constant"
    axes = range(len(starts)) if axes is None else axes
    cut = {axis for k, axis in enumerate(positive_axis(int(x), rank) for x in axes)
           if not _whole(int(starts[k]), int(ends[k]), 1 if steps is None else int(steps[k]), shape[axis])}
    return _same_axes(rank, cut)


def _pads_zeros(node: gs.Node) -> bool:
    """Constant padding writes zeros (Q·0 = 0); reflect, edge and wrap copy values within each channel."""
    if node.attrs.get("mode", "constant") != "constant":
        return True
    value = node.attrs.get("value", 0.0) if len(node.inputs) < 3 or not node.inputs[2].name \
        else constant_values(node.inputs[2])
    return value is not None and not np.any(np.asarray(value) != 0)


def _pad_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    """Mixes (extends) the padded axes; padding must add zeros or copies."""
    rank = rank_of(tensor)
    pads = node.attrs.get("pads") if len(node.inputs) < 2 else constant_values(node.inputs[1])
    if rank is None or pads is None:
        return "pads are not constant"
    if not _pads_zeros(node):
        return "pads with a constant that is not zero"
    axes = range(rank) if len(node.inputs) < 4 or not node.inputs[3].name else constant_values(node.inputs[3])
    if axes is None:
        return "padded axes are not constant"
    axes = [positive_axis(int(x), rank) for x in axes]
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    return _same_axes(rank, {axis for k, axis in enumerate(axes) if pads[k] or pads[k + len(axes)]})


def _resize_factors(node: gs.Node, count: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scales, sizes) of a Resize or Upsample over `count` axes, whichever is a constant."""
    if node.attrs.get("scales") is not None:  # Upsample-7
        return np.asarray(node.attrs["scales"], dtype=np.float64), None
    scales = sizes = None
    for tensor in node.inputs[1:]:
        values = constant_values(tensor) if tensor.name else None
        if values is not None and values.size == count:
            if values.dtype.kind == "f":
                scales = values.reshape(-1)
            else:
                sizes = values.reshape(-1)
    return scales, sizes


def _resize_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    """Mixes (interpolates along) every axis whose scale is not 1 or whose size changes."""
    rank, shape = rank_of(tensor), tensor.shape
    if rank is None:
        return "rank unknown"
    if node.attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        return "crops by a region of interest"
    axes = [positive_axis(int(x), rank) for x in node.attrs.get("axes", range(rank))]
    scales, sizes = _resize_factors(node, len(axes))
    if scales is not None:
        return _same_axes(rank, {axis for k, axis in enumerate(axes) if float(scales[k]) != 1.0})
    if sizes is not None:
        return _same_axes(rank, {axis for k, axis in enumerate(axes) if int(sizes[k]) != shape[axis]})
    return "scales and sizes are not constant"


def _concat_rotation(node: gs.Node, tensor: gs.Tensor, axis: int) -> Carried | str:
    """Concatenating along another axis passes a rotation that every input carries alike."""
    rank = rank_of(tensor)
    if rank is None:
        return "rank unknown"
    if positive_axis(int(node.attrs["axis"]), rank) == axis:
        return "concatenates along the channel axis"
    if any(isinstance(t, gs.Constant) for t in node.inputs):
        return "concatenates a constant with the channels"
    return Carried(axis, joins=tuple((i, axis) for i, t in enumerate(node.inputs) if t is not tensor))


def _reshaped(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    return relaid(tensor.shape, node.outputs[0].shape)


def _shape_rotation(node: gs.Node, tensor: gs.Tensor, axis: int) -> Carried:
    """A rotation keeps every shape: the op reads nothing the rotation changes and carries it nowhere."""
    return Carried(axis, outputs=())


register("Shape", "Size", channels=shape_of, rotation=_shape_rotation)
register("Transpose", channels=transpose, layout=True, rotation=linear(_transpose_mixing))
register("Concat", channels=concat, layout=True, rotation=_concat_rotation)
register("Split", channels=split, layout=True, rotation=linear(_split_mixing))
register("Slice", channels=slice_, layout=True, rotation=linear(_slice_mixing))
register("Squeeze", "Unsqueeze", channels=squeeze, layout=True, rotation=linear(_reshaped))
register("Pad", channels=pad, constant=pad_constant, rotation=linear(_pad_mixing))
register("Resize", "Upsample", channels=resize, rotation=linear(_resize_mixing),
         constant=keeps_when(lambda node: node.attrs.get("mode", "nearest") in ("nearest", "linear")))

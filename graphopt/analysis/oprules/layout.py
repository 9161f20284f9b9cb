"""Rules for ops that move channels without mixing them: Transpose, Concat, Split, Slice, Pad,
Resize/Upsample, Squeeze/Unsqueeze, and Shape (which only reads the run-time shape).

Concat lays atoms end to end (an untracked input becomes a fixed, blocked segment); Split and Slice
cut atoms at their bounds and record sites so the engine can recompute sizes and bounds; the others
carry the channel state to its new axis or block it when they touch the channel axis.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.constants import keeps_when, pad as pad_constant
from graphopt.analysis.registry import equivariant, positive_axis, register
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


def _transpose_rotation(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
    perm, rank = node.attrs.get("perm"), None if tensor.shape is None else len(tensor.shape)
    if perm is None and rank is None:
        return "Transpose of unknown rank"
    return [int(p) for p in (perm if perm is not None else range(rank - 1, -1, -1))].index(axis)


register("Shape", "Size", channels=shape_of)
register("Transpose", channels=transpose, layout=True, rotation=equivariant(_transpose_rotation))
register("Concat", channels=concat, layout=True)
register("Split", channels=split, layout=True)
register("Slice", channels=slice_, layout=True)
register("Squeeze", "Unsqueeze", channels=squeeze, layout=True)
register("Pad", channels=pad, constant=pad_constant)
register("Resize", "Upsample", channels=resize,
         constant=keeps_when(lambda node: node.attrs.get("mode", "nearest") in ("nearest", "linear")))

"""Normalising and reducing ops: BatchNormalization, InstanceNormalization, LayerNormalization and the
other normalisations, softmaxes, reductions and arg-reductions.

Channels: a per-channel normalisation slices its parameters with the channels; one that normalises
over the channel axis blocks the group (removing a channel would change every other), except
GroupNormalization, whose groups are normalised apart: its channels go in whole groups (the class's
granule, graphopt.analysis.channels), so removing a group leaves every other as it was; a reduction
over other axes moves the channel axis as keepdims says. A ReduceSum or ReduceMean over the channel axis
alone is a linear consumer (a "reduce" site: a row of ones, or of 1/n, over the channels) whose output is a
statistic over them (graphopt.analysis.groups); any other reduction over the channel axis blocks. Constants:
BatchNormalization in inference form. Rotations: a per-channel scale is not equivariant; a ReduceMean or
ReduceSum mixes the axes it reduces and passes a rotation of any other (a global average pool over H, W).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.constants import batchnorm
from graphopt.analysis.oprules.elementwise import gated
from graphopt.analysis.registry import Mixing, linear, positive_axis, rank_of, register
from graphopt.analysis.state import Analysis, constant_values

LINEAR_REDUCTIONS = ("ReduceSum", "ReduceMean")


def norm_per_channel(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    if state is None:
        return
    if state.axis != 1 or any(constant_values(t) is None for t in node.inputs[1:]):
        a.block(state, f"{node.name} ({node.op}): channels not on axis 1 or non-constant parameters")
        return
    for index in range(1, len(node.inputs)):
        a.site("weight", node, state, index=index, axis=0, role="param")
    a.set_state(node.outputs[0], state)


def group_normalization(node: gs.Node, a: Analysis) -> None:
    """GroupNormalization over axis 1: whole groups go; scale and bias are per group (opset 18) or per channel
    (opset 21), num_groups counts the groups kept."""
    for tensor in node.inputs[1:]:
        a.block(a.state(tensor), f"{node.name} ({node.op}): channels on a parameter input")
    state = a.state(node.inputs[0])
    if state is None:
        return
    groups, size = int(node.attrs.get("num_groups", 0)), a.size(state)
    params = [constant_values(t) for t in node.inputs[1:3]]
    if state.axis != 1 or state.factor != 1 or groups <= 0 or size % groups or \
            any(p is None or p.size not in (groups, size) for p in params):
        a.block(state, f"{node.name} ({node.op}): groups not on axis 1 or parameters neither constant per group "
                       "nor per channel")
        return
    run = size // groups
    if not a.in_runs(state, run, node):
        return
    for index, values in zip((1, 2), params):
        a.site("weight", node, state, index=index, axis=0, role="param", per=run if values.size == groups else 1)
    a.site("count", node, state, role="num_groups", per=run)
    a.set_state(node.outputs[0], state)


def normalising(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    rank = a.rank(node.inputs[0])
    for tensor in node.inputs[1:]:
        a.block(a.state(tensor), f"{node.name} ({node.op}): channels on a parameter input")
    if state is None or rank is None:
        return
    default = -1 if node.op in ("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax",
                                "LpNormalization", "RMSNormalization") else 1
    start = positive_axis(int(node.attrs.get("axis", default)), rank)
    covered = state.axis >= start if node.op in ("LayerNormalization", "RMSNormalization") else \
        state.axis == start or node.op == "MeanVarianceNormalization"
    if covered:
        a.block(state, f"{node.name} ({node.op}): normalises over the channel axis")
        return
    a.set_state(node.outputs[0], state)


def reduced_axes(node: gs.Node, rank: int | None) -> list[int] | None:
    """The non-negative axes a reduction reduces (attribute or constant input), None if unknown or all."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant_values(node.inputs[1])
    if node.op in ("ArgMax", "ArgMin"):
        axes = [node.attrs.get("axis", 0)]
    if axes is None or rank is None:
        return None
    return sorted(positive_axis(int(x), rank) for x in list(axes))


def _linear_reduction(node: gs.Node, state: ChannelState, axes: list[int]) -> str | None:
    """Why a reduction over the channel axis is not a linear consumer of the channels, or None when it
    is: a ReduceSum/ReduceMean of a float tensor over that axis alone, behind the batch axis."""
    if node.op not in LINEAR_REDUCTIONS or axes != [state.axis] or state.axis == 0:
        return "reduces over the channel axis"
    dtype = node.inputs[0].dtype
    if dtype is not None and not (isinstance(dtype, (type, np.dtype)) and np.dtype(dtype).kind == "f"):
        return "reduces integer channels"
    return None


def reduce(node: gs.Node, a: Analysis) -> None:
    state, rank = a.state(node.inputs[0]), a.rank(node.inputs[0])
    if state is None:
        return
    axes = reduced_axes(node, rank)
    if axes is None:
        a.block(state, f"{node.name} ({node.op}): reduces over all axes")
        return
    if state.axis in axes:
        why = _linear_reduction(node, state, axes)
        if why is not None:
            a.block(state, f"{node.name} ({node.op}): {why}")
            return
        a.site("reduce", node, state, axis=state.axis, role="consumer")
        a.statistics[node.outputs[0].name] = (state,)
        return
    keep = int(node.attrs.get("keepdims", 1))
    shift = 0 if keep else sum(1 for x in axes if x < state.axis)
    a.set_state(node.outputs[0], ChannelState(state.axis - shift, state.atoms, state.factor))


def _reduction_mixing(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    """A sum or mean mixes the axes it reduces; keepdims=0 drops them from the output's axes."""
    rank = rank_of(tensor)
    axes = reduced_axes(node, rank)
    if rank is None:
        return "rank unknown"
    if axes is None or (not axes and not int(node.attrs.get("noop_with_empty_axes", 0))):
        return "reduces over all axes or over axes that are not constant"
    if int(node.attrs.get("keepdims", 1)):
        return Mixing(frozenset(axes), tuple(range(rank)))
    kept = [i for i in range(rank) if i not in axes]
    return Mixing(frozenset(axes), tuple(kept.index(i) if i in kept else None for i in range(rank)))


register("BatchNormalization", channels=norm_per_channel, constant=batchnorm,
         rotation=gated("per-channel scale (BatchNorm)"))
register("InstanceNormalization", channels=norm_per_channel, rotation=gated("per-channel scale"))
register("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "MeanVarianceNormalization",
         "RMSNormalization", channels=normalising)
register("GroupNormalization", channels=group_normalization)
register("ReduceMean", "ReduceSum", channels=reduce, rotation=linear(_reduction_mixing))
register("ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp",
         "ArgMax", "ArgMin", channels=reduce)

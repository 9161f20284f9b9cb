"""Per-channel constant values and how they pass through ops (for dead-unit elimination).

A channel whose producer weights are all zero writes its bias at every position. Such values are kept
per group root as float64 arrays over the root's channels; NaN means "not a known constant". The
builders here make the `constant` rules of graphopt.analysis.registry: each evaluates its op exactly,
elementwise in float64, or returns None when it cannot (the walk in graphopt.analysis.constant_flow then
names the op as unsupported).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import AtomTable, ChannelState
from graphopt.analysis.registry import ConstantRule, Values
from graphopt.analysis.state import Analysis, constant_values

Elementwise = Callable[[np.ndarray], np.ndarray]


def leaf_positions(atoms: AtomTable, state: ChannelState) -> list[tuple[int, np.ndarray]]:
    """(root, positions[channel, factor]) for each leaf of `state`, positions along the state's axis."""
    pieces, offset = [], 0
    for leaf in atoms.leaves(state.atoms):
        size = atoms.sizes[leaf]
        channels = offset + np.arange(size)
        pieces.append((atoms.find(leaf), channels[:, None] * state.factor + np.arange(state.factor)[None, :]))
        offset += size
    return pieces


def agree(result: Values, root: int, values: np.ndarray) -> None:
    """Record `values` for `root`. A root met again in the same tensor (channels coupled across heads, each
    head a leaf of the same group) keeps a value only where every occurrence has it: its channels are folded
    or removed as one."""
    result[root] = values if root not in result else np.where(result[root] == values, values, np.nan)


def nonzero_rows(values: np.ndarray, axis: int) -> np.ndarray:
    """For each index along `axis`: does any entry of that slice differ from zero?"""
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    return np.any(rows != 0, axis=1)


def attr_or_input(node: gs.Node, attr: str, index: int, default: float) -> float:
    """A scalar parameter given as attribute `attr` (older opsets) or constant input `index` (NaN if variable)."""
    if attr in node.attrs:
        return float(node.attrs[attr])
    if len(node.inputs) > index and node.inputs[index].name:
        values = constant_values(node.inputs[index])
        return float(values.reshape(-1)[0]) if values is not None else float("nan")
    return default


def merge_inputs(a: Analysis, node: gs.Node, known: dict[str, Values], inputs: list[Values]) -> Values:
    """Values that pass unchanged (layout ops, pooling of a constant): unknown where inputs disagree, and
    where an input carries a root's channels without known values (Concat of a constant with what a
    convolution made of it)."""
    merged: Values = {}
    for values in inputs:
        for root, array in values.items():
            agree(merged, root, array)
    for tensor in node.inputs:
        state = a.state(tensor)
        for root, _ in leaf_positions(a.atoms, state) if state is not None else []:
            if root in merged and root not in known.get(tensor.name, {}):
                merged[root] = np.full(merged[root].shape, np.nan)
    return merged


def keeps_when(condition: Callable[[gs.Node], bool]) -> ConstantRule:
    """Passes constants on when `condition(node)` holds (pooling without padding, nearest resize, ...)."""
    def rule(a: Analysis, node: gs.Node, known: dict[str, Values], inputs: list[Values]) -> Values | None:
        return merge_inputs(a, node, known, inputs) if condition(node) else None
    return rule


def elementwise(make: Callable[[gs.Node], Elementwise]) -> ConstantRule:
    """A one-input activation applied to every known constant; `make(node)` reads its attributes."""
    def rule(a: Analysis, node: gs.Node, known: dict[str, Values], inputs: list[Values]) -> Values | None:
        if len(inputs) != 1:
            return None
        function = make(node)
        with np.errstate(all="ignore"):
            return {root: function(array) for root, array in inputs[0].items()}
    return rule


def _per_channel_operand(a: Analysis, node: gs.Node, tensor: gs.Tensor, state: ChannelState) -> Values | None:
    """A constant operand broadcast per channel of the output `state`, per root (None: not per-channel)."""
    values = constant_values(tensor)
    out_rank = a.rank(node.outputs[0])
    if values is None or out_rank is None or values.ndim > out_rank:
        return None
    shaped = values.reshape((1,) * (out_rank - values.ndim) + values.shape).astype(np.float64)
    if any(size != 1 for axis, size in enumerate(shaped.shape) if axis != state.axis):
        return None
    vector = shaped.reshape(-1)
    result: Values = {}
    for root, positions in leaf_positions(a.atoms, state):
        per_position = vector[positions] if vector.size > 1 else np.full(positions.shape, vector[0])
        uniform = np.all(per_position == per_position[:, :1], axis=1)
        agree(result, root, np.where(uniform, per_position[:, 0], np.nan))
    return result


def binary(function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> ConstantRule:
    """Add/Sub/Mul/Div of two tensors of the same group, or of one and a per-channel or scalar constant."""
    def rule(a: Analysis, node: gs.Node, known: dict[str, Values], inputs: list[Values]) -> Values | None:
        state = a.state(node.outputs[0])
        if state is None or len(node.inputs) != 2:
            return None
        operands: list[Values] = []
        for tensor in node.inputs:
            operand = known.get(tensor.name, {}) if a.state(tensor) is not None \
                else _per_channel_operand(a, node, tensor, state)
            if operand is None:
                return None
            operands.append(operand)
        roots = set(operands[0]) & set(operands[1])
        with np.errstate(all="ignore"):
            return {root: function(operands[0][root], operands[1][root]) for root in roots}
    return rule


def batchnorm(a: Analysis, node: gs.Node, known: dict[str, Values], inputs: list[Values]) -> Values | None:
    """BatchNormalization in inference form, per channel. On flattened channels (a factor above 1) its
    parameters are per feature: a channel stays a known constant only where they map it to one value."""
    state = a.state(node.outputs[0])
    if state is None or node.inputs[0].name not in known:
        return None
    values = known[node.inputs[0].name]
    scale, bias, mean, var = (constant_values(t).astype(np.float64) for t in node.inputs[1:5])
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    result: Values = {}
    for root, positions in leaf_positions(a.atoms, state):
        if root in values:
            per_feature = (values[root][:, None] - mean[positions]) / np.sqrt(var[positions] + epsilon) \
                * scale[positions] + bias[positions]
            uniform = np.all(per_feature == per_feature[:, :1], axis=1)
            agree(result, root, np.where(uniform, per_feature[:, 0], np.nan))
    return result


def pad(a: Analysis, node: gs.Node, known: dict[str, Values], inputs: list[Values]) -> Values | None:
    """Edge and reflect padding keep a constant; constant padding keeps it where the fill equals it."""
    mode = node.attrs.get("mode", "constant")
    if mode in ("edge", "reflect"):
        return merge_inputs(a, node, known, inputs)
    if mode != "constant":
        return None
    fill = attr_or_input(node, "value", 2, 0.0)
    return {root: np.where(array == fill, array, np.nan) for root, array in inputs[0].items()}

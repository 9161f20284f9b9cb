"""Per-channel constant values of the tensors a channel group flows through (for dead-unit elimination).

A channel whose producer weights are all zero writes its bias (Conv/ConvTranspose: B, Gemm: beta*C,
MatMul: 0) at every position. `channel_constants` carries that value through the graph in topological
order, per tensor and per group root, as float64 arrays over the root's channels; NaN means "not a known
constant" (a live channel, or one that went through an op this module does not evaluate).

Evaluated exactly (elementwise, in float64): layout ops that move channels without changing values
(Identity, Dropout, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice), pooling that
keeps a constant constant (MaxPool, GlobalAveragePool, GlobalMaxPool, AveragePool without padding or with
count_include_pad=0, Resize nearest/linear, Pad in edge/reflect mode or with the constant's own value),
activations (Relu, LeakyRelu, Clip, Sigmoid, HardSigmoid, HardSwish, Tanh, Elu, Softplus, Neg, Abs),
BatchNormalization (inference form) and Add/Sub/Mul/Div with a per-channel or scalar constant or with
another tensor of the same group. Any other op leaves its outputs unknown and is named in `unsupported`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import AtomTable, ChannelState
from graphopt.analysis.groups import Analysis, constant_values

Values = dict[int, np.ndarray]  # group root -> per-channel constant (NaN: unknown)

_LAYOUT = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
                     "Split", "Slice", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"})
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def leaf_positions(atoms: AtomTable, state: ChannelState) -> list[tuple[int, np.ndarray]]:
    """(root, positions[channel, factor]) for each leaf of `state`, positions along the state's axis."""
    pieces, offset = [], 0
    for leaf in atoms.leaves(state.atoms):
        size = atoms.sizes[leaf]
        channels = offset + np.arange(size)
        pieces.append((atoms.find(leaf), channels[:, None] * state.factor + np.arange(state.factor)[None, :]))
        offset += size
    return pieces


def nonzero_rows(values: np.ndarray, axis: int) -> np.ndarray:
    """For each index along `axis`: does any entry of that slice differ from zero?"""
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    return np.any(rows != 0, axis=1)


def _attr_or_input(node: gs.Node, attr: str, index: int, default: float) -> float:
    if attr in node.attrs:
        return float(node.attrs[attr])
    if len(node.inputs) > index and node.inputs[index].name:
        values = constant_values(node.inputs[index])
        return float(values.reshape(-1)[0]) if values is not None else float("nan")
    return default


def _activation(node: gs.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    op = node.op
    if op == "Relu":
        return lambda x: np.maximum(x, 0.0)
    if op == "LeakyRelu":
        slope = float(node.attrs.get("alpha", 0.01))
        return lambda x: np.where(x >= 0, x, slope * x)
    if op == "Clip":
        low = _attr_or_input(node, "min", 1, -np.inf)
        high = _attr_or_input(node, "max", 2, np.inf)
        return lambda x: np.clip(x, low, high)
    if op == "Sigmoid":
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    if op == "HardSigmoid":
        slope, shift = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        return lambda x: np.clip(slope * x + shift, 0.0, 1.0)
    if op == "HardSwish":
        return lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if op == "Elu":
        scale = float(node.attrs.get("alpha", 1.0))
        return lambda x: np.where(x >= 0, x, scale * (np.exp(x) - 1.0))
    simple = {"Tanh": np.tanh, "Softplus": lambda x: np.log1p(np.exp(x)), "Neg": np.negative, "Abs": np.abs}
    return simple.get(op)


def _keeps_constants(node: gs.Node) -> bool:
    """Layout and pooling ops under which a spatially constant channel stays the same constant."""
    if node.op in _LAYOUT:
        return True
    if node.op == "AveragePool":
        return not any(node.attrs.get("pads", [])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
            or not node.attrs.get("count_include_pad", 0)
    if node.op in ("Resize", "Upsample"):
        return node.attrs.get("mode", "nearest") in ("nearest", "linear")
    return False


def _merge(inputs: list[Values]) -> Values:
    merged: Values = {}
    for values in inputs:
        for root, array in values.items():
            merged[root] = array if root not in merged else np.where(merged[root] == array, array, np.nan)
    return merged


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
        result[root] = np.where(uniform, per_position[:, 0], np.nan)
    return result


def _batchnorm(a: Analysis, node: gs.Node, state: ChannelState, values: Values) -> Values:
    scale, bias, mean, var = (constant_values(t).astype(np.float64) for t in node.inputs[1:5])
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    result: Values = {}
    for root, positions in leaf_positions(a.atoms, state):
        if root in values:
            index = positions[:, 0]
            result[root] = (values[root] - mean[index]) / np.sqrt(var[index] + epsilon) * scale[index] + bias[index]
    return result


def _binary(a: Analysis, node: gs.Node, known: dict[str, Values]) -> Values | None:
    state = a.state(node.outputs[0])
    if state is None or len(node.inputs) != 2:
        return None
    operands: list[Values] = []
    for tensor in node.inputs:
        if a.state(tensor) is not None:
            operands.append(known.get(tensor.name, {}))
        else:
            operand = _per_channel_operand(a, node, tensor, state)
            if operand is None:
                return None
            operands.append(operand)
    roots = set(operands[0]) & set(operands[1])
    with np.errstate(all="ignore"):
        return {root: _BINARY[node.op](operands[0][root], operands[1][root]) for root in roots}


def channel_constants(a: Analysis, graph: gs.Graph, producers: dict[str, Values],
                      unsupported: dict[int, set[str]]) -> dict[str, Values]:
    """Known per-channel constants of every tensor the groups flow through, by tensor name.

    `producers` maps producer node names to their output's values; ops that stop evaluation are added
    to `unsupported[root]` for every root whose known values they drop.
    """
    known: dict[str, Values] = {}
    for node in graph.nodes:
        if node.name in producers:
            known[node.outputs[0].name] = producers[node.name]
            continue
        inputs = [known[t.name] for t in node.inputs if t.name in known]
        if not inputs:
            continue
        state = a.state(node.outputs[0]) if node.outputs else None
        result: Values | None = None
        activation = _activation(node)
        if _keeps_constants(node) or node.op == "Pad" and _pad_keeps(node):
            result = _merge(inputs) if node.op != "Pad" else _pad_values(node, inputs[0])
        elif activation is not None and len(inputs) == 1:
            with np.errstate(all="ignore"):
                result = {root: activation(array) for root, array in inputs[0].items()}
        elif node.op == "BatchNormalization" and state is not None and node.inputs[0].name in known:
            result = _batchnorm(a, node, state, known[node.inputs[0].name])
        elif node.op in _BINARY:
            result = _binary(a, node, known)
        if result is None:
            for values in inputs:
                for root, array in values.items():
                    if np.any(np.isfinite(array)):
                        unsupported.setdefault(root, set()).add(node.op)
            continue
        for output in node.outputs:
            if output.name and a.state(output) is not None:
                known[output.name] = result
    return known


def _pad_keeps(node: gs.Node) -> bool:
    return node.attrs.get("mode", "constant") in ("constant", "edge", "reflect")


def _pad_values(node: gs.Node, values: Values) -> Values:
    if node.attrs.get("mode", "constant") != "constant":
        return values
    fill = _attr_or_input(node, "value", 2, 0.0)
    return {root: np.where(array == fill, array, np.nan) for root, array in values.items()}

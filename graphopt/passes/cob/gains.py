"""Weighted RMS norms: fold the gain into the norm's readers so the stream stays rotatable.

A weighted RMS norm y = g ⊙ x / rms(x) is recognised as graphopt.RMSNorm followed by a Mul with a
constant g per channel (graphopt.passes.channels.function_patterns matches the weightless part).
The per-channel scale is not equivariant to a rotation (Q diag(g) ≠ diag(g) Q), so it would end the
change-of-basis group. When every reader of the product is a linear consumer of that channel axis
(Conv group 1, Gemm, MatMul with a constant weight), W (g ⊙ n) = (W diag(g)) n: the gain is folded
into each reader's weight along its input-channel axis (in float64, cast back) and the readers read
the norm directly; readers of the shape alone (Shape, Size: attention reading batch and sequence length)
read the norm too, which has the same shape. Exact up to float rounding; a gain read by anything else
is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.ops.functions import DOMAIN
from graphopt.passes.cob.chains import consumer_axis

SHAPE_READERS = ("Shape", "Size")


def _gain(node: gs.Node) -> tuple[gs.Tensor, np.ndarray, int] | None:
    """(normalised tensor, gain per channel, channel axis) of Mul(graphopt.RMSNorm(x), g), else None."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for data, gain in (node.inputs, reversed(node.inputs)):
        norm = ir.producer(data)
        if norm is None or norm.op != "RMSNorm" or norm.domain != DOMAIN or not isinstance(gain, gs.Constant) \
                or data.shape is None:
            continue
        rank, values = len(data.shape), np.asarray(gain.values)
        axis = int(norm.attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        shape = (1,) * (rank - values.ndim) + values.shape
        if values.ndim <= rank and all(d == 1 for i, d in enumerate(shape) if i != axis) \
                and shape[axis] == data.shape[axis]:
            return data, values.reshape(-1).astype(np.float64), axis
    return None


def _fold_one(graph: gs.Graph, node: gs.Node) -> bool:
    """Fold the gain of `node` (a Mul after a weightless RMS norm) into its readers, where all can take it."""
    found = _gain(node)
    product = node.outputs[0]
    if found is None or ir.is_graph_io(graph, product) or not product.outputs:
        return False
    data, gain, axis = found
    readers = ir.consumers(product)
    shapes = [reader for reader in readers if reader.op in SHAPE_READERS]
    readers = [reader for reader in readers if reader.op not in SHAPE_READERS]
    axes = [consumer_axis(reader, product, axis, len(data.shape)) for reader in readers]
    if not readers or any(weight_axis is None for weight_axis in axes):
        return False
    for reader in shapes:
        reader.inputs[0] = data
    for reader, weight_axis in zip(readers, axes):
        weight = np.asarray(reader.inputs[1].values)
        shape = [1] * weight.ndim
        shape[weight_axis] = gain.size
        ir.set_input_array(graph, reader, 1, (weight.astype(np.float64) * gain.reshape(shape)).astype(weight.dtype))
        reader.inputs[0] = data
    return True


def fold_gains(graph: gs.Graph) -> int:
    """Fold the gains of weighted RMS norms into their linear readers; returns how many were folded."""
    folded = sum(_fold_one(graph, node) for node in list(graph.nodes))
    if folded:
        ir.cleanup(graph)
    return folded

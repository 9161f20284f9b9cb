"""Quantized layers: ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul (onnxruntime's dynamic and
QOperator static quantization, and its com.microsoft fused kernels), DynamicQuantizeLinear, and
QuantizeLinear/DequantizeLinear (QDQ).

Integer layers are left alone, with the reason: a quantized layer's output channels form a group that is
blocked with it, and the channels it reads are blocked too, so `inspect --groups` and each pass's skipped
list say why. A Conv, Gemm or MatMul whose weight is the DequantizeLinear of a constant (QDQ) is a quantized
layer the same way (graphopt.analysis.oprules.producers asks `dequantized`) where it is still one when the
analysis runs: the pruning methods and `inspect` first read such weights as the floats they stand for
(graphopt.passes.quantize.through), so what remains here is blocked quantization and weights other readers
share.
DynamicQuantizeLinear blocks what it quantizes (its scale is a statistic over every channel).
QuantizeLinear/DequantizeLinear of activations act on each element alone: with a per-tensor scale they
pass the channels through; with a constant per-axis scale on the channel axis, the scale and zero point
are sliced with the channels; anything else blocks.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.registry import positive_axis, register
from graphopt.analysis.state import Analysis, constant_values
from graphopt.ir.sparse import WEIGHTED_OPS

MICROSOFT = "com.microsoft"
LEFT_ALONE = "quantized layer: its integer weights, scales and zero points are left alone"

# (weight input, output-channel axis of the weight) of the layers that write new channels
_WEIGHTS = {"ConvInteger": (1, 0), "QLinearConv": (3, 0), "MatMulInteger": (1, -1), "QLinearMatMul": (3, -1)}


def dequantized(tensor: gs.Tensor) -> np.ndarray | None:
    """The stored (integer) constant a tensor dequantizes, when it is DequantizeLinear of a constant."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not producer.inputs:
        return None
    return constant_values(producer.inputs[0])


def left_alone(node: gs.Node, a: Analysis, channels: int | None, axis: int | None) -> None:
    """Block what `node` reads and give its output a group of `channels` on `axis`, blocked too."""
    reason = f"{node.name} ({node.op}): {LEFT_ALONE}"
    a.block_inputs(node, LEFT_ALONE)
    if channels is not None and axis is not None:
        out = a.new_state(axis, channels)
        a.block(out, reason)
        a.set_state(node.outputs[0], out)


LAYERS = (*_WEIGHTS, "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QGemm")


def quantized_layers(graph: gs.Graph) -> list[str]:
    """One line per quantized layer of `graph` (an integer or fused quantized op, or a float layer whose weight is
    the DequantizeLinear of a constant), for a method's skipped list: every method leaves them alone."""
    return [f"{node.name} ({node.op}): {LEFT_ALONE}" for node in graph.nodes
            if node.op in LAYERS or (node.op in WEIGHTED_OPS and len(node.inputs) > 1
                                     and dequantized(node.inputs[1]) is not None)]


def integer_layer(node: gs.Node, a: Analysis) -> None:
    index, weight_axis = _WEIGHTS[node.op]
    weight = constant_values(node.inputs[index]) if len(node.inputs) > index else None
    rank = a.rank(node.outputs[0])
    if weight is None or rank is None:
        left_alone(node, a, None, None)
    elif weight_axis == 0:
        left_alone(node, a, int(weight.shape[0]), 1)
    else:
        left_alone(node, a, int(weight.shape[-1]), rank - 1)


def quantized_op(node: gs.Node, a: Analysis) -> None:
    """A quantized op that is not a layer of its own (a fused quantized kernel, DynamicQuantizeLinear)."""
    a.block_inputs(node, "quantized op: left alone")


def _per_axis(node: gs.Node, a: Analysis, state: ChannelState, scale: np.ndarray) -> bool:
    """Record the scale and zero point as per-channel parameters; False when they are not on the channels."""
    rank = a.rank(node.inputs[0])
    axis = positive_axis(int(node.attrs.get("axis", 1)), rank) if rank is not None else None
    if axis != state.axis or scale.ndim != 1 or state.factor != 1 or int(node.attrs.get("block_size", 0)):
        return False
    for index in range(1, len(node.inputs)):
        if node.inputs[index].name:
            a.site("weight", node, state, index=index, axis=0, role="param")
    return True


def quantize_linear(node: gs.Node, a: Analysis) -> None:
    """QuantizeLinear/DequantizeLinear: elementwise, with a per-tensor or per-channel constant scale."""
    state = a.state(node.inputs[0])
    for tensor in node.inputs[1:]:
        a.block(a.state(tensor), f"{node.name} ({node.op}): channels on a scale or zero point")
    if state is None:
        return
    scale = constant_values(node.inputs[1])
    zero_point = constant_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if scale is None or (len(node.inputs) > 2 and node.inputs[2].name and zero_point is None):
        a.block(state, f"{node.name} ({node.op}): scale or zero point is not constant")
    elif math.prod(scale.shape) == 1 or _per_axis(node, a, state, scale):
        a.set_state(node.outputs[0], state)
    else:
        a.block(state, f"{node.name} ({node.op}): quantizes per axis, not per tensor or per channel")


register("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", channels=integer_layer)
register("DynamicQuantizeLinear", channels=quantized_op)
register("QuantizeLinear", "DequantizeLinear", channels=quantize_linear)
register("DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul",
         "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
         "QLinearSoftmax", "QAttention", "QGemm", domain=MICROSOFT, channels=quantized_op)

"""Elementwise ops: numpy-broadcasting binaries and one-input activations.

Channels: a binary merges the channel states of its variable inputs (a residual Add couples its
branches) and slices per-channel constant operands with the channels (an operand that is a statistic
over those very channels, mean(x) in x - mean(x), blocks: that normalises over them); an activation
carries its input's state to its output. Constants: Add/Sub/Mul/Div and the activations listed with a function
evaluate a dead unit's constant exactly. Rotations: nonlinear activations are not equivariant, nor is
a per-channel bias, scale or gate; a product or quotient by a factor constant along the channels (a
scalar, a per-position gate [N, 1, H, W]) is, as are Identity, Dropout and float Casts; Add, Sub, Sum
and Mean of variables (a residual join) pass a rotation only when every input carries it (`Carried.joins`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.constants import Elementwise, attr_or_input, binary, elementwise
from graphopt.analysis.registry import Carried, RotationRule, declines, equivariant, rank_of, reads_once, register
from graphopt.analysis.state import Analysis

NONLINEAR = "elementwise nonlinearity is not equivariant to rotations"
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def gated(reason: str) -> RotationRule:
    """Not equivariant for `reason`; combining the channels with another variable tensor says so first."""
    def rule(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
        if any(t is not tensor and not isinstance(t, gs.Constant) for t in node.inputs):
            return "combines the channels with another variable tensor (a residual add or a gate)"
        return reads_once(node, tensor) or reason
    return rule


# -- channels ---------------------------------------------------------------------------------

def _broadcast_axis(node: gs.Node, a: Analysis, out_rank: int) -> ChannelState | None:
    """The merged state of the tracked inputs on their common output axis (None: blocked)."""
    tracked = [(t, a.state(t)) for t in node.inputs if a.state(t) is not None]
    axes = {out_rank - a.rank(t) + s.axis for t, s in tracked}
    if len(axes) != 1:
        a.block_inputs(node, "inputs carry channels on different axes")
        return None
    first = tracked[0][1]
    if not all(a.unify(first, state, node) for _, state in tracked[1:]):
        return None
    return ChannelState(axes.pop(), first.atoms, first.factor)


def _operand_sites(node: gs.Node, a: Analysis, merged: ChannelState, out_rank: int) -> bool:
    """Record per-channel constant operands as sites; False (and blocked) for any other operand."""
    width = a.size(merged) * merged.factor
    for index, tensor in enumerate(node.inputs):
        if a.state(tensor) is not None or not tensor.name:
            continue
        if a.statistic_over(tensor, merged):
            a.block(merged, f"{node.name} ({node.op}): combines channels with a statistic over them "
                            f"('{tensor.name}'): normalises over the channel axis")
            return False
        shape = a.shape(tensor)
        aligned = len(shape) - (out_rank - merged.axis) if shape is not None else -1
        if shape is None or (aligned >= 0 and shape[aligned] not in (1, width)):
            a.block(merged, f"{node.name} ({node.op}): operand '{tensor.name}' does not broadcast per channel")
            return False
        if aligned >= 0 and shape[aligned] != 1:
            if not isinstance(tensor, gs.Constant):
                a.block(merged, f"{node.name} ({node.op}): untracked variable operand '{tensor.name}'")
                return False
            a.site("weight", node, merged, index=index, axis=aligned, role="param")
    return True


def broadcast(node: gs.Node, a: Analysis) -> None:
    """Elementwise ops with numpy broadcasting: variables merge, constants are sliced per channel."""
    out_rank = a.rank(node.outputs[0])
    if out_rank is None:
        a.block_inputs(node, "output rank unknown")
        return
    merged = _broadcast_axis(node, a, out_rank)
    if merged is not None and _operand_sites(node, a, merged, out_rank):
        a.set_state(node.outputs[0], merged)


def extra_outputs_read(node: gs.Node, a: Analysis) -> bool:
    """True when an output after the first (Dropout's mask, MaxPool's indices) is read or is a graph output."""
    outputs = {t.name for t in a.graph.outputs}
    return any(t.name and (t.outputs or t.name in outputs) for t in node.outputs[1:])


def unary(node: gs.Node, a: Analysis) -> None:
    state = a.state(node.inputs[0])
    for tensor in node.inputs[1:]:
        if a.state(tensor) is not None:
            a.block(a.state(tensor), f"{node.name} ({node.op}): channels on a parameter input")
    if state is None:
        return
    if node.op == "Dropout":  # the mask has the data's layout
        for output in node.outputs:
            a.set_state(output, state)
        return
    if extra_outputs_read(node, a):
        a.block(state, f"{node.name} ({node.op}): a second output (flat indices) is read")
        return
    a.set_state(node.outputs[0], state)


# -- constants --------------------------------------------------------------------------------

def _fixed(function: Elementwise) -> Elementwise:
    return lambda node: function  # type: ignore[return-value]


def _leaky_relu(node: gs.Node) -> Elementwise:
    slope = float(node.attrs.get("alpha", 0.01))
    return lambda x: np.where(x >= 0, x, slope * x)


def _clip(node: gs.Node) -> Elementwise:
    low, high = attr_or_input(node, "min", 1, -np.inf), attr_or_input(node, "max", 2, np.inf)
    return lambda x: np.clip(x, low, high)


def _hard_sigmoid(node: gs.Node) -> Elementwise:
    slope, shift = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return lambda x: np.clip(slope * x + shift, 0.0, 1.0)


def _elu(node: gs.Node) -> Elementwise:
    scale = float(node.attrs.get("alpha", 1.0))
    return lambda x: np.where(x >= 0, x, scale * (np.exp(x) - 1.0))


def _shrink(node: gs.Node) -> Elementwise:
    lambd, bias = float(node.attrs.get("lambd", 0.5)), float(node.attrs.get("bias", 0.0))
    return lambda x: np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0.0))


def _dropout_rotation(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
    if any(t.outputs for t in node.outputs[1:]):
        return "not equivariant to a rotation of the channels"
    return axis


def _float_cast(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
    """A cast between float types changes no value beyond rounding; to an integer type it is nonlinear."""
    return axis if int(node.attrs.get("to", 0)) in FLOAT_TYPES else "casts to a type that is not float"


def _aligned(node: gs.Node, tensor: gs.Tensor, axis: int, other: gs.Tensor) -> tuple[int, int] | str:
    """(output channel axis, the axis of `other` broadcast against it: negative when `other` has none)."""
    rank, out_rank, other_rank = rank_of(tensor), rank_of(node.outputs[0]), rank_of(other)
    if rank is None or out_rank is None or other_rank is None:
        return "ranks unknown"
    out_axis = axis + out_rank - rank
    return out_axis, out_axis - (out_rank - other_rank)


def _joined(node: gs.Node, tensor: gs.Tensor, axis: int) -> Carried | str:
    """A sum of variables (a residual Add) passes a rotation that every input carries on the channels."""
    if sum(t is tensor for t in node.inputs) != 1:
        return "reads the channels twice"
    found = _aligned(node, tensor, axis, tensor)
    if isinstance(found, str):
        return found
    joins = []
    for index, other in enumerate(node.inputs):
        if other is tensor:
            continue
        if isinstance(other, gs.Constant):
            return f"adds a constant ({'per-channel bias add' if other.values.size > 1 else 'a scalar'})"
        aligned = _aligned(node, tensor, axis, other)
        if isinstance(aligned, str):
            return aligned
        if aligned[1] < 0 or other.shape[aligned[1]] != tensor.shape[axis]:
            return "adds a tensor that does not carry the channels"
        joins.append((index, aligned[1]))
    return Carried(found[0], joins=tuple(joins))


def _scaled(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
    """x·g and x/g pass a rotation when g is constant along the channels (a scalar, a per-position gate)."""
    if len(node.inputs) != 2 or sum(t is tensor for t in node.inputs) != 1:
        return "reads the channels twice"
    if node.op == "Div" and node.inputs[0] is not tensor:
        return "divides by the channels"
    other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
    found = _aligned(node, tensor, axis, other)
    if isinstance(found, str):
        return found
    if found[1] >= 0 and other.shape[found[1]] != 1:
        if isinstance(other, gs.Constant):
            return "per-channel scale"
        return "combines the channels with another variable tensor (a per-channel gate)"
    return found[0]


# -- registrations ----------------------------------------------------------------------------

register("Add", channels=broadcast, constant=binary(np.add), rotation=_joined)
register("Sub", channels=broadcast, constant=binary(np.subtract), rotation=_joined)
register("Sum", "Mean", channels=broadcast, rotation=_joined)
register("Mul", channels=broadcast, constant=binary(np.multiply), rotation=_scaled)
register("Div", channels=broadcast, constant=binary(np.divide), rotation=_scaled)
register("PRelu", channels=broadcast, rotation=declines(NONLINEAR))
register("Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "LessOrEqual",
         "GreaterOrEqual", "And", "Or", "Xor", "Mod", channels=broadcast)

ACTIVATIONS: dict[str, Callable[[gs.Node], Elementwise] | None] = {
    "Relu": _fixed(lambda x: np.maximum(x, 0.0)), "LeakyRelu": _leaky_relu, "Clip": _clip,
    "Sigmoid": _fixed(lambda x: 1.0 / (1.0 + np.exp(-x))), "HardSigmoid": _hard_sigmoid,
    "HardSwish": _fixed(lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)), "Elu": _elu, "Tanh": _fixed(np.tanh),
    "Softplus": _fixed(lambda x: np.log1p(np.exp(x))), "Abs": _fixed(np.abs),
    "Gelu": None, "Selu": None, "Mish": None, "Swish": None, "Exp": None, "Log": None, "Sqrt": None, "Erf": None,
}  # nonlinear: constants evaluated where a function is given; none is equivariant to rotations
for _op, _function in ACTIVATIONS.items():
    register(_op, channels=unary, constant=elementwise(_function) if _function else None, rotation=declines(NONLINEAR))
register("Shrink", channels=unary, constant=elementwise(_shrink), rotation=declines(NONLINEAR))
register("Neg", channels=unary, constant=elementwise(_fixed(np.negative)))
register("Celu", "Softsign", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "ThresholdedRelu",
         "CastLike", "IsNaN", channels=unary)
register("Cast", channels=unary, rotation=equivariant(_float_cast))
register("Gelu", domain="com.microsoft", channels=unary, rotation=declines(NONLINEAR))  # onnxruntime's fusions
register("QuickGelu", domain="com.microsoft", channels=unary)
# Gelu(x + bias) with a per-channel bias, as onnxruntime's transformers optimizer fuses a Linear's bias into it
register("BiasGelu", "FastGelu", domain="com.microsoft", channels=broadcast, rotation=declines(NONLINEAR))
register("Identity", channels=unary, layout=True, rotation=equivariant(lambda node, tensor, axis: axis))
register("Dropout", channels=unary, layout=True, rotation=equivariant(_dropout_rotation))

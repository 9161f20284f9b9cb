"""Channel rules, one per op type: adding an op is adding one rule.

A rule reads the channel states of a node's inputs, sets the states of its outputs, couples atoms and
records sites (see graphopt.analysis.groups). Rules never change the graph. Any input state a rule does
not explicitly handle must be blocked with a reason: silence would let the engine cut a tensor whose
reader it does not know how to rewrite. This module holds the registry and the rules for producers,
consumers, elementwise and normalising ops; layout_rules, reshape_rules and function_rules hold the rest.
"""

from __future__ import annotations

import math
from typing import Callable

import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.groups import Analysis, constant_values
from graphopt.analysis.function_rules import rms_norm_rule, tsra_rule
from graphopt.analysis.reshape_rules import flatten_rule, reshape_rule

Rule = Callable[[gs.Node, Analysis], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            if op in RULES:
                raise ValueError(f"duplicate channel rule for {op}")
            RULES[op] = fn
        return fn
    return register


def no_rule(node: gs.Node, a: Analysis) -> None:
    a.block_inputs(node, "no channel rule for this op")


def positive_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _constant_or_absent(node: gs.Node, index: int) -> bool:
    return len(node.inputs) <= index or not node.inputs[index].name or constant_values(node.inputs[index]) is not None


def _extra_outputs_read(node: gs.Node, a: Analysis) -> bool:
    """True when an output after the first (Dropout's mask, MaxPool's indices) is read or is a graph output."""
    outputs = {t.name for t in a.graph.outputs}
    return any(t.name and (t.outputs or t.name in outputs) for t in node.outputs[1:])


# -- producers and consumers ------------------------------------------------------------------

@rule("Conv")
def conv(node: gs.Node, a: Analysis) -> None:
    weight = constant_values(node.inputs[1])
    x, y = node.inputs[0], node.outputs[0]
    incoming = a.state(x)
    if weight is None or not _constant_or_absent(node, 2):
        a.block_inputs(node, "weight or bias is not constant")
        return
    groups = int(node.attrs.get("group", 1))
    if incoming is not None and incoming.axis != 1:
        a.block(incoming, f"{node.name} (Conv): input channels are not on axis 1")
        incoming = None
    if groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1:  # depthwise: in and out coupled
        if incoming is None:
            return
        a.site("weight", node, incoming, index=1, axis=0, role="param")
        if len(node.inputs) > 2 and node.inputs[2].name:
            a.site("weight", node, incoming, index=2, axis=0, role="param")
        a.site("group", node, incoming)
        a.set_state(y, incoming)
        a.cost(node, incoming)
        return
    out = a.new_state(1, weight.shape[0])
    if groups > 1:
        reason = f"{node.name} (Conv): grouped convolution (groups={groups})"
        a.block(incoming, reason)
        a.block(out, reason)
        incoming = None
    elif incoming is not None:
        a.site("weight", node, incoming, index=1, axis=1, role="consumer")
    a.site("weight", node, out, index=1, axis=0, role="producer")
    if len(node.inputs) > 2 and node.inputs[2].name:
        a.site("weight", node, out, index=2, axis=0, role="param")
    a.set_state(y, out)
    a.cost(node, incoming, out)


@rule("ConvTranspose")
def conv_transpose(node: gs.Node, a: Analysis) -> None:
    weight = constant_values(node.inputs[1])
    incoming = a.state(node.inputs[0])
    if weight is None or int(node.attrs.get("group", 1)) != 1 or node.attrs.get("output_shape") \
            or not _constant_or_absent(node, 2):
        a.block_inputs(node, "ConvTranspose with groups, output_shape or a non-constant weight or bias")
        return
    if incoming is not None and incoming.axis != 1:
        a.block(incoming, f"{node.name} (ConvTranspose): input channels are not on axis 1")
        incoming = None
    if incoming is not None:
        a.site("weight", node, incoming, index=1, axis=0, role="consumer")
    out = a.new_state(1, weight.shape[1])
    a.site("weight", node, out, index=1, axis=1, role="producer")
    if len(node.inputs) > 2 and node.inputs[2].name:
        a.site("weight", node, out, index=2, axis=0, role="param")
    a.set_state(node.outputs[0], out)
    a.cost(node, incoming, out)


@rule("Gemm")
def gemm(node: gs.Node, a: Analysis) -> None:
    weight = constant_values(node.inputs[1])
    incoming = a.state(node.inputs[0])
    if weight is None or node.attrs.get("transA", 0):
        a.block_inputs(node, "Gemm with transA or a non-constant B")
        return
    trans_b = bool(node.attrs.get("transB", 0))
    if incoming is not None:
        if incoming.axis != 1:
            a.block(incoming, f"{node.name} (Gemm): input features are not on axis 1")
            incoming = None
        else:
            a.site("weight", node, incoming, index=1, axis=1 if trans_b else 0, role="consumer")
    out = a.new_state(1, weight.shape[0] if trans_b else weight.shape[1])
    a.site("weight", node, out, index=1, axis=0 if trans_b else 1, role="producer")
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_values(node.inputs[2])
        if bias is None or bias.ndim == 0 or (bias.shape[-1] != 1 and bias.shape[-1] != a.size(out)) \
                or math.prod(bias.shape[:-1]) != 1:
            a.block(out, f"{node.name} (Gemm): bias C is not a per-output constant")
        elif bias.shape[-1] != 1:
            a.site("weight", node, out, index=2, axis=bias.ndim - 1, role="param")
    a.set_state(node.outputs[0], out)
    a.cost(node, incoming, out)


@rule("MatMul")
def matmul(node: gs.Node, a: Analysis) -> None:
    left, right = node.inputs
    rank_l, rank_r, rank_y = a.rank(left), a.rank(right), a.rank(node.outputs[0])
    left_state, right_state = a.state(left), a.state(right)
    if rank_l is None or rank_r is None or rank_y is None or rank_l < 2 or rank_r < 2:
        a.block_inputs(node, "MatMul operands of unknown or vector rank")
        return
    if isinstance(left, gs.Constant):
        a.block_inputs(node, "MatMul with a constant left operand")
        return
    weight = constant_values(right)
    contracted = left_state if left_state is not None and left_state.axis == rank_l - 1 else None
    if left_state is not None and contracted is None and left_state.axis != rank_l - 2:
        a.block(left_state, f"{node.name} (MatMul): channels on a batch axis")
    if weight is not None:
        if rank_r != 2:
            a.block(left_state, f"{node.name} (MatMul): constant weight of rank {rank_r}")
            return
        if left_state is not None and left_state.axis == rank_l - 2:  # a tensor tracks one channel axis
            a.block(left_state, f"{node.name} (MatMul): channels on the row axis")
        if contracted is not None:
            a.site("weight", node, contracted, index=1, axis=0, role="consumer")
        out = a.new_state(rank_y - 1, weight.shape[1])
        a.site("weight", node, out, index=1, axis=1, role="producer")
        a.set_state(node.outputs[0], out)
        a.cost(node, contracted, out)
        return
    # two variables (attention): the contracted axes are coupled; rows and columns carry through
    right_contracted = right_state if right_state is not None and right_state.axis == rank_r - 2 else None
    if (contracted is None) != (right_contracted is None):
        a.block(contracted or right_contracted, f"{node.name} (MatMul): only one side of the contraction is tracked")
    elif contracted is not None and right_contracted is not None:
        a.unify(contracted, right_contracted, node)
    columns = right_state if right_state is not None and right_state.axis == rank_r - 1 else None
    if right_state is not None and right_state not in (columns, right_contracted):
        a.block(right_state, f"{node.name} (MatMul): channels on a batch axis")
    if columns is not None:
        a.set_state(node.outputs[0], ChannelState(rank_y - 1, columns.atoms, columns.factor))
    if left_state is not None and left_state.axis == rank_l - 2:
        a.block(left_state, f"{node.name} (MatMul): channels on the row axis")
    a.cost(node, contracted, columns)


# -- per-channel and elementwise --------------------------------------------------------------

def _broadcast(node: gs.Node, a: Analysis) -> None:
    """Elementwise ops with numpy broadcasting: variables merge, constants are sliced per channel."""
    out_rank = a.rank(node.outputs[0])
    tracked = [(t, a.state(t)) for t in node.inputs if a.state(t) is not None]
    if out_rank is None:
        a.block_inputs(node, "output rank unknown")
        return
    axes = {out_rank - a.rank(t) + s.axis for t, s in tracked}
    if len(axes) != 1:
        a.block_inputs(node, "inputs carry channels on different axes")
        return
    axis = axes.pop()
    first = tracked[0][1]
    channels = a.size(first)
    merged = ChannelState(axis, first.atoms, first.factor)
    for _, state in tracked[1:]:
        if not a.unify(first, state, node):
            return
    for index, tensor in enumerate(node.inputs):
        if a.state(tensor) is not None or not tensor.name:
            continue
        shape = a.shape(tensor)
        aligned = len(shape) - (out_rank - axis) if shape is not None else -1
        if shape is None or (aligned >= 0 and shape[aligned] not in (1, channels * first.factor)):
            a.block(merged, f"{node.name} ({node.op}): operand '{tensor.name}' does not broadcast per channel")
            return
        if aligned >= 0 and shape[aligned] != 1:
            if not isinstance(tensor, gs.Constant):
                a.block(merged, f"{node.name} ({node.op}): untracked variable operand '{tensor.name}'")
                return
            a.site("weight", node, merged, index=index, axis=aligned, role="param")
    for output in node.outputs[:1]:
        a.set_state(output, merged)


rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
     "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod")(_broadcast)


@rule("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "LeakyRelu", "Tanh", "Elu",
      "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal",
      "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "ThresholdedRelu", "Cast", "Identity",
      "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "IsNaN",
      "CastLike", "QuickGelu", "Swish")
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
    if _extra_outputs_read(node, a):
        a.block(state, f"{node.name} ({node.op}): a second output (flat indices) is read")
        return
    a.set_state(node.outputs[0], state)


@rule("BatchNormalization", "InstanceNormalization")
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


@rule("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization",
      "MeanVarianceNormalization", "GroupNormalization", "RMSNormalization")
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
        state.axis == start or node.op in ("MeanVarianceNormalization", "GroupNormalization")
    if covered:
        a.block(state, f"{node.name} ({node.op}): normalises over the channel axis")
        return
    a.set_state(node.outputs[0], state)


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin")
def reduce(node: gs.Node, a: Analysis) -> None:
    state, rank = a.state(node.inputs[0]), a.rank(node.inputs[0])
    if state is None:
        return
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant_values(node.inputs[1])
    if node.op in ("ArgMax", "ArgMin"):
        axes = [node.attrs.get("axis", 0)]
    if axes is None or rank is None:
        a.block(state, f"{node.name} ({node.op}): reduces over all axes")
        return
    axes = sorted(positive_axis(int(x), rank) for x in list(axes))
    if state.axis in axes:
        a.block(state, f"{node.name} ({node.op}): reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    shift = 0 if keep else sum(1 for x in axes if x < state.axis)
    a.set_state(node.outputs[0], ChannelState(state.axis - shift, state.atoms, state.factor))


rule("Reshape")(reshape_rule)
rule("Flatten")(flatten_rule)
rule("TSRA")(tsra_rule)  # graphopt function ops (graphopt.ops)
rule("RMSNorm")(rms_norm_rule)

# layout rules register themselves on import; imported last because they use `rule`
from graphopt.analysis import layout_rules  # noqa: E402,F401

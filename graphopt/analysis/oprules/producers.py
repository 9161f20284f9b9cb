"""Channel rules of the producers and consumers of channels: Conv, ConvTranspose, Gemm, MatMul, and
Gather from a constant embedding table.

A producer with a constant weight creates a new channel state (its output channels) and records the
weight and bias sites a pruning engine slices; as a consumer it records the weight axis that reads the
incoming channels. MatMul between two variables (attention) couples the contracted axes and carries
rows and columns through. Any input state a rule does not handle is blocked with a reason. A layer
whose weight is dequantized from stored integers (QDQ) is left alone (graphopt.analysis.oprules.quantized).
LSTM, GRU and RNN consume their input's features through W and produce their hidden units (`recurrent`).
An embedding lookup Gather(table [rows, C], ids) along axis 0 produces C channels on its output's last
axis (the table's columns are its weight site, input 0, axis 1): the first writer of a transformer's
residual stream. Any other Gather (shape arithmetic, a Gather of data) has no channel rule.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.oprules.quantized import dequantized, left_alone
from graphopt.analysis.registry import positive_axis, register
from graphopt.analysis.state import Analysis, constant_values


def constant_or_absent(node: gs.Node, index: int) -> bool:
    return len(node.inputs) <= index or not node.inputs[index].name or constant_values(node.inputs[index]) is not None


def _optional_bias_site(node: gs.Node, a: Analysis, state: ChannelState) -> None:
    if len(node.inputs) > 2 and node.inputs[2].name:
        a.site("weight", node, state, index=2, axis=0, role="param")


def _quantized(node: gs.Node, a: Analysis) -> bool:
    """A layer whose weight is dequantized from stored integers is left alone (graphopt.analysis.oprules.quantized)."""
    stored = dequantized(node.inputs[1])
    if stored is None:
        return False
    rank = a.rank(node.outputs[0])
    if node.op == "Conv":
        channels, axis = stored.shape[0], 1
    elif node.op == "ConvTranspose":
        channels, axis = stored.shape[1] * int(node.attrs.get("group", 1)), 1
    elif node.op == "Gemm":
        channels, axis = stored.shape[0 if node.attrs.get("transB", 0) else 1], 1
    else:
        channels, axis = stored.shape[-1], None if rank is None else rank - 1
    left_alone(node, a, int(channels), axis)
    return True


def conv(node: gs.Node, a: Analysis) -> None:
    if _quantized(node, a):
        return
    weight = constant_values(node.inputs[1])
    x, y = node.inputs[0], node.outputs[0]
    incoming = a.state(x)
    if weight is None or not constant_or_absent(node, 2):
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
        _optional_bias_site(node, a, incoming)
        a.site("group", node, incoming)
        a.set_state(y, incoming)
        a.cost(node, incoming)
        return
    if groups > 1:
        _grouped(node, a, incoming, weight.shape, groups)
        return
    out = a.new_state(1, weight.shape[0])
    if incoming is not None:
        a.site("weight", node, incoming, index=1, axis=1, role="consumer")
    a.site("weight", node, out, index=1, axis=0, role="producer")
    _optional_bias_site(node, a, out)
    a.set_state(y, out)
    a.cost(node, incoming, out)


def _grouped(node: gs.Node, a: Analysis, incoming: ChannelState | None, shape: tuple[int, ...], groups: int) -> None:
    """A grouped Conv (g groups, not depthwise): every group reads its own C_in/g input channels through the
    same weight columns and writes its own C_out/g outputs, so each group must keep the same count. Its input
    is cut into g equal pieces coupled index by index (a unit is one channel of every group, sliced from the
    weight's axis 1 once), and its output is one new atom of C_out/g channels repeated g times. The input
    side is a "grouped" consumer: the weight's axis 1 holds one piece, which group k reads at offset k·C_in/g
    of the input, so a reconstruction folds group by group (graphopt.passes.snp.fold), never across groups."""
    if shape[0] % groups:  # not a valid grouped convolution (onnxruntime refuses it): nothing to track
        a.block_inputs(node, f"{shape[0]} output channels in {groups} groups")
        return
    factor = incoming.factor if incoming is not None else 1  # features per tracked channel (a channel shuffle: g)
    per_group = shape[1] // factor if shape[1] % factor == 0 else 0
    if incoming is not None and per_group and a.size(incoming) == per_group * groups:
        pieces = [a.atoms.slice(incoming.atoms, g * per_group, (g + 1) * per_group) for g in range(groups)]
        for other in pieces[1:]:
            a.atoms.unify(pieces[0], other)
        a.site("weight", node, ChannelState(1, pieces[0], factor), index=1, axis=1, role="grouped")
    elif incoming is not None:
        a.block(incoming, f"{node.name} (Conv): grouped convolution (groups={groups}) whose groups split the "
                          "channels' coupled units (a channel shuffle of another width)")
        incoming = None
    unit = a.new_state(1, shape[0] // groups)
    out = ChannelState(1, unit.atoms * groups)
    a.site("weight", node, out, index=1, axis=0, role="producer")
    _optional_bias_site(node, a, out)
    a.set_state(node.outputs[0], out)
    a.cost(node, incoming, out)


def conv_transpose(node: gs.Node, a: Analysis) -> None:
    if _quantized(node, a):
        return
    weight = constant_values(node.inputs[1])
    incoming = a.state(node.inputs[0])
    groups = int(node.attrs.get("group", 1))
    depthwise = weight is not None and groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1
    if weight is None or (groups != 1 and not depthwise) or node.attrs.get("output_shape") \
            or not constant_or_absent(node, 2):
        a.block_inputs(node, "ConvTranspose with groups (other than depthwise), output_shape or a non-constant "
                             "weight or bias")
        return
    if incoming is not None and incoming.axis != 1:
        a.block(incoming, f"{node.name} (ConvTranspose): input channels are not on axis 1")
        incoming = None
    if depthwise:  # weight [C, 1, k...], group C: channel c in writes channel c out, as a depthwise Conv
        if incoming is not None:
            a.site("weight", node, incoming, index=1, axis=0, role="param")
            _optional_bias_site(node, a, incoming)
            a.site("group", node, incoming)
            a.set_state(node.outputs[0], incoming)
            a.cost(node, incoming)
        return
    if incoming is not None:
        a.site("weight", node, incoming, index=1, axis=0, role="consumer")
    out = a.new_state(1, weight.shape[1])
    a.site("weight", node, out, index=1, axis=1, role="producer")
    _optional_bias_site(node, a, out)
    a.set_state(node.outputs[0], out)
    a.cost(node, incoming, out)


def _gemm_bias(node: gs.Node, a: Analysis, out: ChannelState) -> None:
    """Gemm's C must be a per-output constant (or a broadcast scalar) for the outputs to be prunable."""
    if len(node.inputs) <= 2 or not node.inputs[2].name:
        return
    bias = constant_values(node.inputs[2])
    if bias is None or bias.ndim == 0 or (bias.shape[-1] != 1 and bias.shape[-1] != a.size(out)) \
            or math.prod(bias.shape[:-1]) != 1:
        a.block(out, f"{node.name} (Gemm): bias C is not a per-output constant")
    elif bias.shape[-1] != 1:
        a.site("weight", node, out, index=2, axis=bias.ndim - 1, role="param")


def gemm(node: gs.Node, a: Analysis) -> None:
    if _quantized(node, a):
        return
    weight = constant_values(node.inputs[1])
    incoming = a.state(node.inputs[0])
    if weight is None or node.attrs.get("transA", 0):
        a.block_inputs(node, "Gemm with transA or a non-constant B")
        return
    trans_b = bool(node.attrs.get("transB", 0))
    if incoming is not None and incoming.axis != 1:
        a.block(incoming, f"{node.name} (Gemm): input features are not on axis 1")
        incoming = None
    elif incoming is not None:
        a.site("weight", node, incoming, index=1, axis=1 if trans_b else 0, role="consumer")
    out = a.new_state(1, weight.shape[0] if trans_b else weight.shape[1])
    a.site("weight", node, out, index=1, axis=0 if trans_b else 1, role="producer")
    _gemm_bias(node, a, out)
    a.set_state(node.outputs[0], out)
    a.cost(node, incoming, out)


def _matmul_weight(node: gs.Node, a: Analysis, weight_rank: int, left_state: ChannelState | None,
                   contracted: ChannelState | None, rank_l: int, rank_y: int) -> None:
    """x @ W with a constant W: W's rows read the contracted channels, its columns produce new ones."""
    if weight_rank != 2:
        a.block(left_state, f"{node.name} (MatMul): constant weight of rank {weight_rank}")
        return
    if left_state is not None and left_state.axis == rank_l - 2:  # a tensor tracks one channel axis
        a.block(left_state, f"{node.name} (MatMul): channels on the row axis")
    if contracted is not None:
        a.site("weight", node, contracted, index=1, axis=0, role="consumer")
    out = a.new_state(rank_y - 1, constant_values(node.inputs[1]).shape[1])
    a.site("weight", node, out, index=1, axis=1, role="producer")
    a.set_state(node.outputs[0], out)
    a.cost(node, contracted, out)


def _matmul_variables(node: gs.Node, a: Analysis, left_state: ChannelState | None,
                      contracted: ChannelState | None, rank_l: int, rank_y: int) -> None:
    """Two variables (attention): the contracted axes are coupled; rows and columns carry through."""
    right_state, rank_r = a.state(node.inputs[1]), a.rank(node.inputs[1])
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


def matmul(node: gs.Node, a: Analysis) -> None:
    if _quantized(node, a):
        return
    left, right = node.inputs
    rank_l, rank_r, rank_y = a.rank(left), a.rank(right), a.rank(node.outputs[0])
    if rank_l is None or rank_r is None or rank_y is None or rank_l < 2 or rank_r < 2:
        a.block_inputs(node, "MatMul operands of unknown or vector rank")
        return
    if isinstance(left, gs.Constant):
        a.block_inputs(node, "MatMul with a constant left operand")
        return
    left_state = a.state(left)
    contracted = left_state if left_state is not None and left_state.axis == rank_l - 1 else None
    if left_state is not None and contracted is None and left_state.axis != rank_l - 2:
        a.block(left_state, f"{node.name} (MatMul): channels on a batch axis")
    if constant_values(right) is not None:
        _matmul_weight(node, a, rank_r, left_state, contracted, rank_l, rank_y)
    else:
        _matmul_variables(node, a, left_state, contracted, rank_l, rank_y)


def fused_attention(node: gs.Node) -> bool:
    """onnxruntime's com.microsoft Attention (a packed q/k/v projection of its first input, then attention)."""
    return node.op == "Attention" and node.domain == "com.microsoft"


def attention(node: gs.Node, a: Analysis) -> None:
    """com.microsoft Attention reads the last axis of its input [batch, tokens, hidden] through the rows of its
    packed q/k/v weight [hidden, q + k + v]: a linear consumer of those channels. Its output (the heads) is the
    head analysis's (graphopt.analysis.heads) and carries no channel state. The projection's share of its MACs
    scales with the input channels kept; q·kᵀ and p·v over the tokens do not."""
    for tensor in node.inputs[1:]:
        a.block(a.state(tensor), f"{node.name} (Attention): channels reach an input other than the first")
    incoming, shape = a.state(node.inputs[0]), a.shape(node.inputs[0])
    weight = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
    if incoming is None:
        return
    if weight is None or weight.ndim != 2 or not constant_or_absent(node, 2) or shape is None or len(shape) != 3 \
            or incoming.axis != 2:
        a.block(incoming, f"{node.name} (Attention): not a constant 2-D weight and bias read along the last of 3 axes")
        return
    a.site("weight", node, incoming, index=1, axis=0, role="consumer")
    sizes = [int(v) for v in node.attrs.get("qkv_hidden_sizes", [])] or [weight.shape[1] // 3] * 3
    projection = shape[2] * weight.shape[1]
    a.cost(node, incoming, share=projection / (projection + shape[1] * (sizes[0] + sizes[2])))


GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# ops whose output is all zeros when their data inputs are (a recurrent layer's initial state as exporters build it)
_ZERO_KEEPING = frozenset({"Slice", "Expand", "Reshape", "Transpose", "Cast", "Identity", "Unsqueeze", "Squeeze",
                           "Tile", "Concat"})


def zero_at_run_time(tensor: gs.Tensor) -> bool:
    """Whether every value of `tensor` is 0 whatever the model's inputs: a zero constant, a ConstantOfShape of
    0, or that sliced, expanded, re-laid, cast or concatenated (torch's exports of an LSTM's zero initial state)."""
    values = constant_values(tensor)
    if values is not None:
        return values.size > 0 and not np.any(values)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return False
    if producer.op == "ConstantOfShape":
        value = producer.attrs.get("value")
        return value is None or not np.any(np.asarray(getattr(value, "values", value)))
    if producer.op in _ZERO_KEEPING:
        data = producer.inputs if producer.op == "Concat" else producer.inputs[:1]
        return bool(data) and all(zero_at_run_time(t) for t in data)
    return False


def _present(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index].name)


def _hidden_units(node: gs.Node, a: Analysis, weight: np.ndarray, recurrence: np.ndarray) -> ChannelState | None:
    """The hidden units of an LSTM/GRU/RNN as a channel group: a unit is its row of every gate in W, R, B (both
    halves) and P, its column of R and its entry of the outputs' last axis (Y [seq, directions, batch, hidden],
    Y_h and Y_c [directions, batch, hidden]; the same units in every direction) and of constant initial states;
    a zero initial state computed at run time is dropped (an absent one is zero). W's and R's rows are the units'
    incoming weights (both producer sites: magnitude scores a unit by them). None where the layer's
    shapes do not fit its op; a group blocked with the reason where an initial state or P is not a constant."""
    gates, hidden = GATES[node.op], recurrence.shape[2]
    if weight.shape[1] != gates * hidden or recurrence.shape[1] != gates * hidden \
            or int(node.attrs.get("hidden_size", hidden)) != hidden:
        return None
    unit = a.new_state(3, hidden)
    atoms = unit.atoms
    a.site("weight", node, ChannelState(1, atoms * gates), index=1, axis=1, role="producer")
    a.site("weight", node, ChannelState(1, atoms * gates), index=2, axis=1, role="producer")
    a.site("weight", node, unit, index=2, axis=2, role="recurrent")  # R's columns read Y's units
    if _present(node, 3):
        a.site("weight", node, ChannelState(1, atoms * (2 * gates)), index=3, axis=1, role="param")
    if _present(node, 7):
        a.site("weight", node, ChannelState(1, atoms * 3), index=7, axis=1, role="param")
    for index, name in ((5, "initial_h"), (6, "initial_c"), (7, "P")):
        if not _present(node, index) or constant_values(node.inputs[index]) is not None:
            if index < 7 and _present(node, index):
                a.site("weight", node, ChannelState(2, atoms), index=index, axis=2, role="param")
        elif index < 7 and zero_at_run_time(node.inputs[index]):
            a.site("empty", node, unit, index=index)
        else:
            a.block(unit, f"{node.name} ({node.op}): {name} is neither a constant nor zero")
    a.site("count", node, unit, role="hidden_size")
    a.set_state(node.outputs[0], unit)
    for output in node.outputs[1:]:
        a.set_state(output, ChannelState(2, atoms))
    return unit


def recurrent(node: gs.Node, a: Analysis) -> None:
    """LSTM, GRU and RNN read their input X ([seq, batch, features], or [batch, seq, features] with layout 1)
    through W [directions, gates x hidden, features]: a linear consumer of X's features, whose columns of W
    go with them. Their hidden units are a channel group of their own (`_hidden_units`): R reads them back
    (a "recurrent" read of the layer's output, which dead-unit elimination honours and SNP reconstructs removed
    units into). MACs: the input products scale with the features and the units kept, the recurrent ones
    with the square of the units kept."""
    for tensor in node.inputs[1:]:
        a.block(a.state(tensor), f"{node.name} ({node.op}): channels reach an input other than X")
    incoming = a.state(node.inputs[0])
    weight, recurrence = (constant_values(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
    if weight is None or recurrence is None or weight.ndim != 3 or recurrence.ndim != 3 \
            or not constant_or_absent(node, 3):
        a.block(incoming, f"{node.name} ({node.op}): weights not constant")
        return
    if incoming is not None and incoming.axis != 2:
        a.block(incoming, f"{node.name} ({node.op}): features not on the last of 3 axes")
        incoming = None
    if incoming is not None:
        a.site("weight", node, incoming, index=1, axis=2, role="consumer")
    hidden = _hidden_units(node, a, weight, recurrence)
    inputs, units = weight.shape[2], recurrence.shape[2]
    if incoming is not None or hidden is not None:
        a.cost(node, incoming, hidden, share=inputs / (inputs + units))
    if hidden is not None:
        a.cost(node, hidden, hidden, share=units / (inputs + units))


def embedding_table(node: gs.Node) -> np.ndarray | None:
    """The constant table [rows, C] of an embedding lookup Gather(table, ids) along axis 0, else None."""
    if node.op != "Gather" or not node.inputs:
        return None
    table = constant_values(node.inputs[0])
    if table is None or table.ndim != 2 or int(node.attrs.get("axis", 0)) not in (0, -2):
        return None
    return table


def _gather_carried(node: gs.Node, a: Analysis, state: ChannelState) -> None:
    """Gather from a tensor with channels, along another axis by constant indices (a section of a packed
    q/k/v tensor): the channels go on; a scalar index before the channel axis removes one axis in front."""
    indices, rank = constant_values(node.inputs[1]), a.rank(node.inputs[0])
    axis = positive_axis(int(node.attrs.get("axis", 0)), rank) if rank is not None else None
    if indices is None or axis is None or axis == state.axis:
        a.block(state, f"{node.name} (Gather): gathers along the channel axis or by computed indices")
        return
    shift = indices.ndim - 1 if axis < state.axis else 0
    a.set_state(node.outputs[0], ChannelState(state.axis + shift, state.atoms, state.factor))


def gather(node: gs.Node, a: Analysis) -> None:
    carried = a.state(node.inputs[0])
    if carried is not None:
        _gather_carried(node, a, carried)
        return
    table, rank = embedding_table(node), a.rank(node.outputs[0])
    if table is None or rank is None or rank < 1 or a.state(node.inputs[1]) is not None:
        a.block_inputs(node, "not an embedding lookup of a constant table")
        return
    out = a.new_state(rank - 1, table.shape[1])
    a.site("weight", node, out, index=0, axis=1, role="producer")
    a.set_state(node.outputs[0], out)


register("Conv", channels=conv)
register("ConvTranspose", channels=conv_transpose)
register("Gemm", channels=gemm)
register("MatMul", channels=matmul)
register("Gather", channels=gather)
register("LSTM", "GRU", "RNN", channels=recurrent)
register("Attention", domain="com.microsoft", channels=attention)

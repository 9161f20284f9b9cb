"""Fold what removed input channels contributed into a linear consumer's bias.

When input features P of a Conv/Gemm/MatMul consumer are removed and they carried values v_P (a
constant, or the constant part of a reconstruction), the consumer loses, per output channel o,
    shift[o] = alpha * sum over taps of W[o, P, taps] · v_P
(alpha is Gemm's, 1 otherwise). `consumer_shift` computes it from the weights before they are cut;
`apply_with_shifts` cuts the graph with the pruning engine and then adds each shift to its consumer's
bias, sliced to the output channels the consumer itself keeps. A consumer without a bias gets one
(Conv, Gemm, onnxruntime's com.microsoft Attention: its packed q/k/v bias; LSTM, GRU and RNN: the input
half Wb of B, per direction and gate unit, for what the input products lose, the recurrent half Rb for what the
recurrent ones lose) or a following Add (MatMul;
for a reduction's row of weights, an Add after the sum); a MatMul whose only reader is an Add of a
per-output constant (a Linear's bias) has the shift folded into that constant. SNP's and CoB's least-squares
fits give a bias-free MatMul (`bias_costs_a_node`) no constant term where it is worth at most 1% of their error
(graphopt.passes.snp.maths.intercept_pays), so it stays a bare MatMul: an Add per such reader cost a small
decoder 3-10% of its speed. For Conv consumers this is
exact only without zero padding: at padded positions the removed channels were 0, not v_P.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.groups import Analysis, Site
from graphopt.analysis.macs import RECURRENT
from graphopt.ir import graph as ir
from graphopt.passes.channels.engine import apply_kept, kept_positions
from graphopt.passes.channels.reduction import reader

Shifts = dict[tuple[str, bool], tuple[gs.Node, np.ndarray]]  # (consumer, into a recurrent bias): its shift


def output_axis(node: gs.Node) -> int:
    """The output-channel axis of a consumer's weight."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1 if node.op in ("MatMul", "ConvTranspose", "Attention", *RECURRENT) else 0


def consumer_shift(site: Site, values: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Per-output-channel shift of `site`'s consumer from input features carrying `values` (0 where
    nothing was removed); `weight` overrides the consumer's current weight."""
    weight = np.asarray(site.node.inputs[site.index].values if weight is None else weight, dtype=np.float64)
    shift = np.moveaxis(weight, site.axis, -1) @ values  # weight shape without the input axis
    if site.node.op in RECURRENT:  # one value per direction and gate unit, added to the input bias Wb
        return shift.reshape(-1)
    axis = output_axis(site.node)
    axis -= 1 if axis > site.axis else 0
    per_output = np.moveaxis(shift, axis, 0).reshape(shift.shape[axis], -1).sum(axis=1)
    if site.node.op == "Gemm":
        per_output *= float(site.node.attrs.get("alpha", 1.0))
    return per_output


def add_shift(shifts: Shifts, node: gs.Node, shift: np.ndarray, recurrent: bool = False) -> None:
    """Accumulate a consumer's shift; `recurrent`: what an LSTM/GRU/RNN's recurrent products (R) lose."""
    if np.any(shift):
        previous = shifts.get((node.name, recurrent), (node, 0.0))[1]
        shifts[node.name, recurrent] = (node, previous + shift)


def add_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray, recurrent: bool = False) -> None:
    """Add a per-output-channel shift to a consumer's output (its bias, created where missing); `recurrent`: a
    shift of an LSTM/GRU/RNN's recurrent products."""
    weight = np.asarray(node.inputs[1].values)
    if node.op in RECURRENT:
        _into_recurrent_bias(graph, node, shift, weight, 1 if recurrent else 0)
        return
    if node.op in ("Conv", "Gemm", "Attention") and _into_own_bias(graph, node, shift, weight.dtype):
        return
    if node.op == "Attention":  # its output is the heads' context, not the projection: only its bias can take it
        raise ValueError(f"{node.name} (Attention): a shift of {shift.size} values does not fit its packed bias")
    if node.op == "MatMul" and _fold_into_bias_add(graph, node, shift):
        return
    if node.op == "Mul":  # a reduction's row of weights (graphopt.passes.channels.reduction): shift the sum
        node = reader(node)
    shape = (shift.size,) + (1,) * (weight.ndim - 2) if node.op == "Conv" else (shift.size,)
    _add_after(graph, node, shift.astype(weight.dtype).reshape(shape))


def _into_own_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray, dtype: np.dtype) -> bool:
    """Add `shift` to a Conv's, Gemm's or fused Attention's bias input (input 2), created where absent; False
    where it cannot (a bias of another shape or not constant, or a Gemm with beta 0)."""
    scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    bias = ir.constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and bias.size == shift.size and scale != 0.0:
        new_bias = bias.astype(np.float64) + shift.reshape(bias.shape) / scale
        ir.set_input_array(graph, node, 2, new_bias.astype(bias.dtype))
        return True
    if len(node.inputs) < 3 or not node.inputs[2].name:
        constant = gs.Constant(ir.unique_name(graph, f"{node.name}_bias"), shift.astype(dtype))
        if len(node.inputs) > 2:  # an empty optional bias, perhaps before other inputs (an Attention's mask)
            node.inputs[2] = constant
        else:
            node.inputs.append(constant)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return True
    return False


def _into_recurrent_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray, weight: np.ndarray, half: int) -> None:
    """LSTM/GRU/RNN: B is [directions, 2 x gates x hidden], the input products' bias Wb (`half` 0) then the
    recurrent ones' Rb (`half` 1); every gate adds X·Wᵀ and Wb together (GRU's hidden gate too, outside its
    reset product) and H·Rᵀ and Rb together (inside GRU's reset product with linear_before_reset), so a shift
    of either product goes into its own half, exactly. B is created (zeros) where absent."""
    directions, units = weight.shape[0], weight.shape[1]
    present = len(node.inputs) > 3 and node.inputs[3].name
    bias = ir.constant_array(node.inputs[3]) if present else np.zeros((directions, 2 * units), weight.dtype)
    new_bias = bias.astype(np.float64)
    new_bias[:, half * units:(half + 1) * units] += shift.reshape(directions, units)
    if present:
        ir.set_input_array(graph, node, 3, new_bias.astype(bias.dtype))
        return
    constant = gs.Constant(ir.unique_name(graph, f"{node.name}_bias"), new_bias.astype(bias.dtype))
    if len(node.inputs) > 3:  # an empty optional B before sequence_lens or an initial state
        node.inputs[3] = constant
    else:
        node.inputs.append(constant)


def bias_costs_a_node(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether a shift of this consumer's outputs needs a node of its own: a MatMul whose output no Add of a
    per-output constant alone reads (Conv and Gemm take it in their bias input)."""
    return node.op == "MatMul" and _bias_add(graph, node) is None


def _bias_add(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int, np.ndarray] | None:
    """(the Add, its constant's input index, the constant) where that Add alone reads a MatMul's output and its
    constant holds one float per output channel (shape [O] or [1, ..., 1, O])."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out in graph.outputs or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    index = 1 if add.inputs[0] is out else 0
    bias = ir.constant_array(add.inputs[index]) if len(add.inputs) == 2 else None
    channels = np.asarray(node.inputs[1].values).shape[-1] if isinstance(node.inputs[1], gs.Constant) else None
    if bias is None or bias.shape[-1:] != (channels,) or bias.size != channels or bias.dtype.kind != "f":
        return None
    return add, index, bias


def _fold_into_bias_add(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> bool:
    """Add `shift` to the constant of the Add that alone reads a MatMul's output, where that constant is
    one value per output channel (shape [O] or [1, ..., 1, O]); False where there is no such Add."""
    found = _bias_add(graph, node)
    if found is None or found[2].size != shift.size:
        return False
    add, index, bias = found
    ir.set_input_array(graph, add, index, (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype))
    return True


def _add_after(graph: gs.Graph, node: gs.Node, values: np.ndarray) -> None:
    """Make `node` write an inner tensor and add the constant `values` to it where it wrote its output."""
    out = node.outputs[0]
    inner = gs.Variable(ir.unique_name(graph, f"{out.name}_unbiased"), dtype=out.dtype)
    ir.replace_output(node, out, inner)
    offset = gs.Constant(ir.unique_name(graph, f"{node.name}_shift"), values)
    graph.nodes.append(gs.Node("Add", ir.unique_name(graph, f"{node.name}_shift"), inputs=[inner, offset], outputs=[out]))


def apply_with_shifts(graph: gs.Graph, analysis: Analysis, kept: dict[int, np.ndarray], shifts: Shifts) -> None:
    """Cut the graph to `kept`, then add each consumer's shift on the output channels it keeps."""
    out_states = {s.node.name: s.state for s in analysis.sites if s.kind == "weight" and s.role == "producer"}
    apply_kept(graph, analysis, kept)
    for (name, recurrent), (node, shift) in shifts.items():
        state = out_states.get(name)
        add_bias(graph, node, kept_outputs(analysis, node, state, kept, shift) if state is not None else shift,
                 recurrent)


def kept_outputs(analysis: Analysis, node: gs.Node, state: ChannelState, kept: dict[int, np.ndarray],
                 shift: np.ndarray) -> np.ndarray:
    """A consumer's per-output `shift` on the output channels it keeps (its producer `state`); an LSTM/GRU/RNN's
    holds one value per direction and gate unit, the gate units cut alike in every direction."""
    positions = kept_positions(analysis.atoms, state, kept)
    if node.op in RECURRENT:
        return shift.reshape(-1, analysis.size(state) * state.factor)[:, positions].reshape(-1)
    return shift[positions]

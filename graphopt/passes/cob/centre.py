"""Pre-norm LayerNorm streams made rotatable: the mean subtraction folded into the stream's writers.

LayerNorm(x) = γ ⊙ (x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) + β over the channel axis does not
commute with a rotation of the channels (the mean is a fixed direction, γ and β are per channel). In a
pre-norm transformer the residual stream x is only written by linear layers (the token and position
embedding lookups, every attention output and FFN down projection, with their biases) and only read by
LayerNorms and by the next residual Add. Centring every writer's output, W' = W C and b' = C b with
C = I - 11ᵀ/d on the output channels (an embedding table's rows centred), makes every stream tensor
zero-mean without changing any LayerNorm's output (LN(Cx) = LN(x)); on a zero-mean stream the norm is
exactly the weightless RMS norm followed by γ and β, so each LayerNorm is rewritten as
graphopt.RMSNorm(axis=-1, channels=d, eps) -> Mul γ -> Add β. β is then folded into the norm's linear
readers (their bias gains βᵀW; a reader without one gets a bias Add) and γ by graphopt.passes.cob.gains,
which leaves the stream and its norms rotatable (SliceGPT's first step, exact up to float rounding).

A stream is rewritten only when all of it qualifies: every tensor joined to it through residual Adds is
written by a rotatable writer (graphopt.passes.cob.chains; directly, or through ops that pass the channel
axis and feed nothing else, such as the Unsqueeze after a position lookup), read only by residual Adds, LayerNorms over
the last axis with constant scale and bias, and shape readers, and is no graph output. Anything else
(a post-norm model, where the LayerNorm's output is itself the stream, until graphopt.passes.cob.postnorm
writes its shortcuts as linear layers; a reader of the raw stream) leaves the stream as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.registry import opsets_of, rank_of
from graphopt.ir import graph as ir
from graphopt.passes.channels.consumer_shift import add_bias
from graphopt.passes.cob.chains import Writer, back_through, bias_add, consumer_axis, writer_of
from graphopt.passes.channels.function_patterns import rms_norm_node
from graphopt.passes.cob.gains import SHAPE_READERS


@dataclass
class Stream:
    writers: list[Writer] = field(default_factory=list)
    norms: list[gs.Node] = field(default_factory=list)


def layer_norm_of(node: gs.Node, tensor: gs.Tensor) -> bool:
    """A LayerNormalization of `tensor` over its last axis alone with a constant scale and bias."""
    if node.op != "LayerNormalization" or node.inputs[0] is not tensor or len(node.inputs) < 2:
        return False
    rank = rank_of(tensor)
    axis = int(node.attrs.get("axis", -1))
    constant = all(isinstance(t, gs.Constant) for t in node.inputs[1:3] if t.name)
    used = [t for t in node.outputs[1:] if t.name and t.outputs]
    return rank is not None and axis in (-1, rank - 1) and constant and not used


def residual_add(node: gs.Node) -> bool:
    return node.op == "Add" and len(node.inputs) == 2 and not any(isinstance(t, gs.Constant) for t in node.inputs)


def _read(graph: gs.Graph, tensor: gs.Tensor, stream: Stream, pending: list[gs.Tensor]) -> bool:
    """Record what reads a stream tensor; False when a reader needs the raw (uncentred) values."""
    for reader in ir.consumers(tensor):
        if layer_norm_of(reader, tensor):
            if reader not in stream.norms:
                stream.norms.append(reader)
        elif residual_add(reader):
            pending.append(reader.outputs[0])
        elif reader.op not in SHAPE_READERS:
            return False
    return True


def _source(graph: gs.Graph, tensor: gs.Tensor, opsets: dict[str, int]) -> Writer | None:
    """The writer of a stream tensor: a rotatable writer, or one behind ops that pass the channel axis
    (an Unsqueeze after a position lookup) and feed nothing else."""
    while tensor.shape is not None:
        writer = writer_of(graph, tensor, len(tensor.shape) - 1)
        node = ir.producer(tensor)
        if writer is not None or node is None:
            return writer
        found = back_through(node, tensor, len(tensor.shape) - 1, opsets)
        if isinstance(found, str) or len(found) != 1 or found[0][0].shape is None:
            return None
        source, axis, _ = found[0]
        if axis != len(source.shape) - 1 or len(ir.consumers(source)) != 1 or ir.is_graph_io(graph, source):
            return None
        tensor = source
    return None


def find_stream(graph: gs.Graph, start: gs.Tensor) -> Stream | None:
    """The LayerNorm stream `start` belongs to, when all of it can be centred (see the module docstring)."""
    stream, seen, pending = Stream(), set(), [start]
    outputs, opsets = {t.name for t in graph.outputs}, opsets_of(graph)
    while pending:
        tensor = pending.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs or tensor.shape is None or not _read(graph, tensor, stream, pending):
            return None
        node = ir.producer(tensor)
        if node is not None and residual_add(node):
            pending.extend(node.inputs)
            continue
        writer = _source(graph, tensor, opsets)
        if writer is None:
            return None
        if all(w.node is not writer.node for w in stream.writers):
            stream.writers.append(writer)
    return stream if stream.norms else None


def _centred(values: np.ndarray, axis: int) -> np.ndarray:
    wide = values.astype(np.float64)
    return (wide - wide.mean(axis=axis, keepdims=True)).astype(values.dtype)


def _rewrite_norm(graph: gs.Graph, norm: gs.Node, channels: int) -> gs.Node | None:
    """LayerNormalization -> graphopt.RMSNorm (last axis, divisor `channels`) -> Mul γ -> Add β; returns
    the Add (None without β)."""
    from graphopt.ops.rms_norm import build_rms_norm_function

    x, y = norm.inputs[0], norm.outputs[0]
    eps = float(norm.attrs.get("epsilon", 1e-5))
    normed = gs.Variable(ir.unique_name(graph, f"{norm.name}_rms"), dtype=y.dtype, shape=x.shape)
    scaled = gs.Variable(ir.unique_name(graph, f"{norm.name}_scaled"), dtype=y.dtype, shape=x.shape)
    nodes = [rms_norm_node(graph, f"{norm.name}_rms_node", x, normed, channels, eps, -1),
             gs.Node("Mul", ir.unique_name(graph, f"{norm.name}_scale"), inputs=[normed, norm.inputs[1]],
                     outputs=[scaled])]
    if len(norm.inputs) > 2 and norm.inputs[2].name:
        nodes.append(gs.Node("Add", ir.unique_name(graph, f"{norm.name}_shift"), inputs=[scaled, norm.inputs[2]],
                             outputs=[y]))
    else:
        nodes[-1].outputs = [y]
    norm.outputs = []
    graph.nodes.extend(nodes)
    ir.add_function(graph, build_rms_norm_function(graph.opset))
    return nodes[2] if len(nodes) > 2 else None


def _fold_shift(graph: gs.Graph, add: gs.Node) -> bool:
    """Fold the constant β of Add(γ ⊙ n, β) into its linear readers (MatMul, fused Attention): bias += βᵀW."""
    data, shift = add.inputs
    product = add.outputs[0]
    if not isinstance(shift, gs.Constant) or ir.is_graph_io(graph, product) or data.shape is None:
        return False
    rank, beta = len(data.shape), np.asarray(shift.values, dtype=np.float64).reshape(-1)
    readers = [r for r in ir.consumers(product) if r.op not in SHAPE_READERS]
    if not readers or any(r.op not in ("MatMul", "Attention") or consumer_axis(r, product, rank - 1, rank) is None
                          for r in readers):
        return False
    for reader in readers:
        weight = np.asarray(reader.inputs[1].values)
        offset = beta @ weight.astype(np.float64)
        if reader.op == "Attention":  # its packed q/k/v bias (input 2)
            add_bias(graph, reader, offset)
        elif (found := bias_add(graph, reader, rank - 1, weight.shape[1])) is None:
            _insert_bias(graph, reader, offset.astype(weight.dtype))
        else:
            node, index = found
            bias = np.asarray(node.inputs[index].values)
            ir.set_input_array(graph, node, index, (bias.astype(np.float64) + offset).astype(bias.dtype))
        reader.inputs[0] = data
    for reader in ir.consumers(product):
        if reader.op in SHAPE_READERS:
            reader.inputs[0] = data
    return True


def _insert_bias(graph: gs.Graph, reader: gs.Node, offset: np.ndarray) -> None:
    out = reader.outputs[0]
    raw = gs.Variable(ir.unique_name(graph, f"{reader.name}_unbiased"), dtype=out.dtype, shape=out.shape)
    constant = gs.Constant(ir.unique_name(graph, f"{reader.name}_bias"), offset)
    reader.outputs = [raw]
    graph.nodes.append(gs.Node("Add", ir.unique_name(graph, f"{reader.name}_bias_add"), inputs=[raw, constant],
                               outputs=[out]))


def centre_layer_norms(graph: gs.Graph) -> int:
    """Rewrite every pre-norm LayerNorm stream as described in the module docstring; returns how many
    LayerNorms were rewritten."""
    shifts: list[gs.Node] = []
    rewritten: set[int] = set()
    for norm in [n for n in graph.nodes if n.op == "LayerNormalization"]:
        if id(norm) in rewritten or not layer_norm_of(norm, norm.inputs[0]):
            continue
        stream = find_stream(graph, norm.inputs[0])
        if stream is None:
            continue
        channels = int(norm.inputs[0].shape[-1])
        for writer in stream.writers:
            writer.transform(graph, channels, _centred)
        for member in stream.norms:
            rewritten.add(id(member))
            shifts.append(_rewrite_norm(graph, member, channels))
    if rewritten:
        for add in filter(None, shifts):
            _fold_shift(graph, add)
        ir.cleanup(graph)
    return len(rewritten)

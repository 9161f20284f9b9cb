"""Where a change of basis is legal: groups writers -> equivariant ops -> linear consumers.

A group starts at a producer (Conv with group 1, Gemm without transA, MatMul; constant weight; an
embedding lookup Gather(table, ids), whose table's columns are its output channels) and
follows its output through ops that commute with an orthogonal Q on the channel axis, as each op's
rule in graphopt.analysis.oprules says (the axes it mixes: average pooling and ReduceMean/ReduceSum
over other axes, Resize, zero Pad, Slice/Split/Concat on other axes, Transpose and Reshape keeping the
channel axis whole, products by factors constant along the channels, Identity/Dropout/float Cast,
graphopt.RMSNorm (any Q) and graphopt.TSRA (Q = blockdiag over its split only; the group's cut points
are the union of its TSRAs' splits) over the channel axis), until linear consumers (Conv group 1 /
Gemm / MatMul reading it as the data operand, constant weight).
A join (a residual Add, Sub, Sum, Mean; a Concat on another axis) passes a rotation only when every
input carries the same one: the walk then goes back from the other inputs, through equivariant ops,
to the producers writing them, which join the group as writers, and forward again from every tensor
it reaches, so every reader of the stream (each branch, the next residual Add, the head) is in it.
Rotating a group is exact: every writer W' = Q W, b' = Q b on its output channels, every consumer
W' = W Qᵀ on its input channels (at every Conv tap; zero padding is rotation invariant), so every
tensor of the group holds Q h instead of h and every consumer computes what it did. Anything else
on the way (ReLU, BatchNorm, MaxPool, a per-channel bias or gate, ...), a graph input or constant
joined in, or a graph output makes the group illegal; the reason names the op.

The channel axis is 1 for Conv/Gemm producers and the last axis for MatMul producers (token-major
[N, T, C] activations; statistics then take every leading position as a row); Transpose moves it.
A constant bias Add that is the producer's only reader (how exporters write nn.Linear on [N, T, C])
belongs to the producer: its vector is rotated as b' = Q b. A Reshape splitting a last channel axis
into attention heads [H, dh] hands over to graphopt.passes.cob.heads, which follows the heads through
the token mixing to the Reshape merging them back; the rotation is then block-diagonal per head
(`heads` > 1, cut points every dh channels) and pruning keeps the same count in every head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.oprules import rule_for
from graphopt.analysis.oprules.producers import constant_or_absent, embedding_table, fused_attention
from graphopt.analysis.registry import Carried, opsets_of
from graphopt.ir import graph as ir
from graphopt.passes.cob.heads import head_split, through_heads

@dataclass
class Writer:
    node: gs.Node
    out_axis: int                                                       # output-channel axis of its weight
    bias: tuple[gs.Node, int] | None = None                             # (Add, index of its constant input)

    @property
    def index(self) -> int:
        """The input holding the weight: 0 for an embedding table, else 1."""
        return weight_index(self.node)

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(self.node.inputs[self.index].values)

    def transform(self, graph: gs.Graph, channels: int, along: Callable[[np.ndarray, int], np.ndarray]) -> None:
        """Apply the same linear map of the output channels to the weight (`along(values, axis)` on its output
        axis) and to every bias (its own input, or the constant Add it owns), broadcast to all `channels`."""
        ir.set_input_array(graph, self.node, self.index, along(self.weight, self.out_axis))
        biases = [(self.node, 2)] if len(self.node.inputs) > 2 and self.node.inputs[2].name else []
        for node, index in biases + ([self.bias] if self.bias is not None else []):
            bias = np.asarray(node.inputs[index].values)
            full = np.ascontiguousarray(np.broadcast_to(bias, (*bias.shape[:-1], channels)) if bias.ndim
                                        else np.full(channels, bias, dtype=bias.dtype))
            ir.set_input_array(graph, node, index, along(full, full.ndim - 1))


@dataclass
class Chain:
    writers: list[Writer]
    channels: int
    consumers: list[tuple[gs.Node, int]] = field(default_factory=list)  # (node, input-channel axis of weight)
    reads: dict[str, int] = field(default_factory=dict)                 # tensor a consumer reads -> channel axis
    cuts: set[int] = field(default_factory=set)                         # TSRA split points, head bounds
    heads: int = 1                                                      # > 1: rotated per attention head

    @property
    def producer(self) -> gs.Node:
        """The writer the group was found from (the first one)."""
        return self.writers[0].node

    @property
    def subspaces(self) -> list[tuple[int, int]]:
        bounds = [0, *sorted(c for c in self.cuts if 0 < c < self.channels), self.channels]
        return list(zip(bounds, bounds[1:]))


def _constant_weight(node: gs.Node) -> bool:
    return len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)


def weight_index(node: gs.Node) -> int:
    return 0 if node.op == "Gather" else 1


def producer_axis(node: gs.Node) -> int | None:
    """Output-channel axis of the weight of a rotatable producer, else None."""
    if node.op == "Gather":
        return 1 if embedding_table(node) is not None and isinstance(node.inputs[0], gs.Constant) else None
    if not _constant_weight(node):
        return None
    weight = node.inputs[1].values
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
        return 0
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul" and weight.ndim == 2:
        return 1
    return None


def _weight_input_axis(node: gs.Node) -> tuple[int, str] | None:
    """(input-channel axis of the weight, where the data's channels must be) of a rotatable consumer."""
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
        return 1, "first"
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return (1 if node.attrs.get("transB", 0) else 0), "first"
    if node.op == "MatMul" and node.inputs[1].values.ndim == 2:
        return 0, "last"
    if fused_attention(node) and node.inputs[1].values.ndim == 2 and constant_or_absent(node, 2):
        return 0, "last"  # its packed q/k/v weight [hidden, q + k + v]; its bias takes the shifts
    return None


def consumer_axis(node: gs.Node, tensor: gs.Tensor, axis: int, rank: int | None) -> int | None:
    """The input-channel axis of `node`'s weight when it is a linear consumer reading `tensor` (of
    `rank`) with its channels on `axis`, else None."""
    if not _constant_weight(node) or node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return None
    found = _weight_input_axis(node)
    if found is None:
        return None
    weight_axis, where = found
    data_axis = 1 if where == "first" else (rank - 1 if rank is not None else None)
    return weight_axis if axis == data_axis else None


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _data_axis(producer: gs.Node) -> int | None:
    """The axis of the producer's output that holds its channels (last for MatMul and Gather, else 1)."""
    rank = _rank(producer.outputs[0])
    return 1 if producer.op not in ("MatMul", "Gather") else (None if rank is None else rank - 1)


def _passes(node: gs.Node, tensor: gs.Tensor, axis: int, opsets: dict[str, int]) -> Carried | str:
    """Where a rotation of `tensor`'s `axis` goes through `node`, or why it does not: the op's registered
    rotation rule (graphopt.analysis.oprules) decides."""
    outcome = rule_for(node, opsets).rotation(node, tensor, axis)
    return Carried(outcome) if isinstance(outcome, int) else outcome


def _only_add_reader(graph: gs.Graph, output: gs.Tensor) -> gs.Node | None:
    readers = ir.consumers(output)
    if len(readers) != 1 or readers[0].op != "Add" or ir.is_graph_io(graph, output):
        return None
    add = readers[0]
    return add if len(add.inputs) == 2 and sum(t is output for t in add.inputs) == 1 else None


def bias_add(graph: gs.Graph, producer: gs.Node, axis: int, channels: int) -> tuple[gs.Node, int] | None:
    """(Add, constant index) when the producer's only reader adds a constant vector along `axis`, the
    last axis, alone (a bias on channels that are not last stays an illegal per-channel Add)."""
    output = producer.outputs[0]
    rank = _rank(output)
    add = _only_add_reader(graph, output)
    if add is None or rank is None or axis != rank - 1:
        return None
    index = 1 if add.inputs[0] is output else 0
    constant = add.inputs[index]
    if not isinstance(constant, gs.Constant) or constant.values.ndim > rank:
        return None
    shape = (1,) * (rank - constant.values.ndim) + tuple(constant.values.shape)
    if shape[axis] not in (1, channels) or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return add, index


def writer_of(graph: gs.Graph, tensor: gs.Tensor, axis: int) -> Writer | None:
    """The rotatable producer writing `tensor` with its channels on `axis` (itself, or through the bias
    Add it owns), else None."""
    node = ir.producer(tensor)
    if node is not None and node.op == "Add":
        for source in node.inputs:
            owner = ir.producer(source)
            out_axis = None if owner is None else producer_axis(owner)
            if out_axis is None or _data_axis(owner) != axis or (len(owner.inputs) > 2 and owner.inputs[2].name):
                continue
            bias = bias_add(graph, owner, axis, int(Writer(owner, out_axis).weight.shape[out_axis]))
            if bias is not None and bias[0] is node:
                return Writer(owner, out_axis, bias)
        return None
    out_axis = None if node is None else producer_axis(node)
    return None if out_axis is None or _data_axis(node) != axis else Writer(node, out_axis)


def _split_heads(graph: gs.Graph, chain: Chain, node: gs.Node, tensor: gs.Tensor,
                 axis: int) -> list[gs.Tensor] | str | None:
    """Merged tensors after the attention heads that Reshape `node` opens (None: not a head split)."""
    split = head_split(node, tensor, axis)
    if split is None:
        return None
    heads, head_dim = split
    if heads * head_dim != chain.channels or chain.heads not in (1, heads):
        return f"{chain.producer.name} -> {node.name} (Reshape): heads do not tile the producer's channels"
    chain.heads = heads
    chain.cuts.update(range(head_dim, chain.channels, head_dim))
    return through_heads(graph, node, heads, head_dim)


Step = tuple[gs.Tensor, int, bool]  # (tensor, channel axis, whether its writer is known to pass the rotation)


def _start(graph: gs.Graph, producer: gs.Node, axis_w: int) -> tuple[Chain, gs.Tensor, int]:
    """The group's record, the tensor its walk starts from (after a bias Add it owns) and its channel axis."""
    output = producer.outputs[0]
    first = Writer(producer, axis_w)
    chain = Chain([first], int(first.weight.shape[axis_w]))
    start = _data_axis(producer)
    has_bias = len(producer.inputs) > 2 and producer.inputs[2].name
    bias = None if has_bias or start is None else bias_add(graph, producer, start, chain.channels)
    if bias is not None:
        chain.writers[0].bias = bias
        output = bias[0].outputs[0]
    return chain, output, start


def _visit(graph: gs.Graph, chain: Chain, node: gs.Node, tensor: gs.Tensor, axis: int,
           opsets: dict[str, int]) -> list[Step] | str:
    """Follow the group through one reader of `tensor`: the tensors it reaches, or why it ends."""
    consumer = consumer_axis(node, tensor, axis, _rank(tensor))
    if consumer is not None:
        chain.consumers.append((node, consumer))
        chain.reads[tensor.name] = axis
        return []
    merged = _split_heads(graph, chain, node, tensor, axis) if node.op == "Reshape" else None
    if isinstance(merged, str):
        return merged
    if merged is not None:
        return [(t, len(t.shape) - 1, True) for t in merged]
    carried = _passes(node, tensor, axis, opsets)
    if isinstance(carried, str):
        return f"{chain.producer.name} -> {node.name} ({node.op}): {carried}"
    if node.op == "TSRA":
        chain.cuts.add(int(node.attrs["split"]))
    return [(node.outputs[i], carried.axis, True) for i in carried.outputs] + \
        [(node.inputs[i], joined, False) for i, joined in carried.joins]


def _source(graph: gs.Graph, chain: Chain, tensor: gs.Tensor, axis: int, opsets: dict[str, int]) -> list[Step] | str:
    """Go back from a tensor a join needs rotated: its writer joins the group, or the input of the
    equivariant op writing it is rotated in its place; else why the join cannot be rotated."""
    node = ir.producer(tensor)
    if node is None or isinstance(tensor, gs.Constant):
        return f"{chain.producer.name}: a join reads '{tensor.name}', which no rotatable layer writes"
    writer = writer_of(graph, tensor, axis)
    if writer is not None:
        if int(writer.weight.shape[writer.out_axis]) != chain.channels:
            return f"{chain.producer.name}: writer {writer.node.name} has another number of channels"
        chain.writers.append(writer)
        return []
    found = back_through(node, tensor, axis, opsets)
    return found if isinstance(found, list) else f"{chain.producer.name} <- {node.name} ({node.op}) writes a joined tensor: {found}"


def back_through(node: gs.Node, tensor: gs.Tensor, axis: int, opsets: dict[str, int]) -> list[Step] | str:
    """The input (and its channel axis) whose rotation `node` carries onto `axis` of `tensor`, or why none."""
    index = next((i for i, t in enumerate(node.outputs) if t is tensor), 0)
    why = "passes no rotation back to its inputs"
    for source in (t for t in node.inputs if not isinstance(t, gs.Constant)):
        for source_axis in range(_rank(source) or 0):
            carried = _passes(node, source, source_axis, opsets)
            if not isinstance(carried, str) and carried.axis == axis and index in carried.outputs:
                return [(source, source_axis, False)]
            why = carried if isinstance(carried, str) and source_axis == axis and source is node.inputs[0] else why
    return why


def _grow(graph: gs.Graph, chain: Chain, start: gs.Tensor, axis: int, opsets: dict[str, int]) -> str | None:
    """Walk the group from its first writer's output; None when every tensor reached is legal."""
    outputs = {t.name for t in graph.outputs}
    axes: dict[str, int] = {}
    sourced: set[str] = set()
    pending: list[Step] = [(start, axis, True)]
    while pending:
        tensor, axis, known = pending.pop()
        if axes.get(tensor.name, axis) != axis:
            return f"{chain.producer.name}: '{tensor.name}' would be rotated on two axes"
        if not known and tensor.name not in sourced:
            found = _source(graph, chain, tensor, axis, opsets)
            if isinstance(found, str):
                return found
            pending.extend(found)
        sourced.add(tensor.name)
        if tensor.name in axes:
            continue
        axes[tensor.name] = axis
        if tensor.name in outputs:
            return f"{chain.producer.name} -> graph output '{tensor.name}'"
        for node in ir.consumers(tensor):
            found = _visit(graph, chain, node, tensor, axis, opsets)
            if isinstance(found, str):
                return found
            pending.extend(found)
    return None


def find_chain(graph: gs.Graph, producer: gs.Node) -> Chain | str:
    """The legal group starting at `producer` (with every writer joined to it), or the reason there is none."""
    axis_w = producer_axis(producer)
    if axis_w is None:
        return f"{producer.name} ({producer.op}): not a rotatable producer"
    chain, output, start = _start(graph, producer, axis_w)
    if start is None:
        return f"{producer.name} ({producer.op}): output rank unknown"
    why = _grow(graph, chain, output, start, opsets_of(graph))
    if why is not None:
        return why
    if not chain.consumers:
        return f"{producer.name} ({producer.op}): no linear consumer"
    return chain


def find_chains(graph: gs.Graph) -> tuple[list[Chain], list[str]]:
    """Every legal group (each found once, from its first writer in graph order) and the reasons for
    the producers that start none."""
    chains, reasons, claimed = [], [], set()
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul", "Gather") or id(node) in claimed:
            continue
        if node.op == "Gather" and producer_axis(node) is None:  # shape arithmetic, not an embedding
            continue
        found = find_chain(graph, node)
        if isinstance(found, str):
            if found not in reasons:
                reasons.append(found)
            continue
        chains.append(found)
        claimed.update(id(writer.node) for writer in found.writers)
    return chains, reasons

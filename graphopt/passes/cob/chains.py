"""Where a change of basis is legal: chains producer -> equivariant ops -> linear consumers.

A chain starts at a producer (Conv with group 1, Gemm without transA, MatMul; constant weight) and
follows its output through ops that commute with an orthogonal Q on the channel axis:
Identity, Dropout (mask unread), AveragePool / GlobalAveragePool (NCHW), Flatten (or Reshape to
[N, C]) of a 1x1 map, keepdims ReduceMean/ReduceSum over spatial axes, graphopt.RMSNorm (any Q) and
graphopt.TSRA (Q = blockdiag over its split only; the chain's cut points are the union of its TSRAs'
splits) over the chain's channel axis (`axis` 1, or the last axis of token-major tensors; either op
over another axis is not equivariant and ends the chain), until linear consumers (Conv
group 1 / Gemm / MatMul reading it as the data operand, constant weight). Rotating such a chain is
exact: producer W' = Q W, b' = Q b on its output channels, every consumer W' = W Qᵀ on its input
channels (at every Conv tap; zero padding is rotation invariant). Anything else on the way (ReLU,
BatchNorm, MaxPool, bias Add, ...) or a graph output makes the chain illegal; the reason names the op.

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

import onnx_graphsurgeon as gs

from graphopt.analysis.oprules import rule_for
from graphopt.analysis.registry import opsets_of
from graphopt.ir import graph as ir
from graphopt.passes.cob.heads import head_split, through_heads

@dataclass
class Chain:
    producer: gs.Node
    out_axis: int                     # output-channel axis of the producer's weight
    channels: int
    consumers: list[tuple[gs.Node, int]] = field(default_factory=list)  # (node, input-channel axis of weight)
    reads: dict[str, int] = field(default_factory=dict)                 # tensor a consumer reads -> channel axis
    cuts: set[int] = field(default_factory=set)                         # TSRA split points, head bounds
    bias: tuple[gs.Node, int] | None = None                             # (Add, index of its constant input)
    heads: int = 1                                                      # > 1: rotated per attention head

    @property
    def subspaces(self) -> list[tuple[int, int]]:
        bounds = [0, *sorted(c for c in self.cuts if 0 < c < self.channels), self.channels]
        return list(zip(bounds, bounds[1:]))


def _constant_weight(node: gs.Node) -> bool:
    return len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)


def producer_axis(node: gs.Node) -> int | None:
    """Output-channel axis of the weight of a rotatable producer, else None."""
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
    return None


def _consumer_axis(node: gs.Node, tensor: gs.Tensor, axis: int, rank: int | None) -> int | None:
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


def _passes(node: gs.Node, tensor: gs.Tensor, axis: int, opsets: dict[str, int]) -> tuple[int, str | None]:
    """(output channel axis, None) when `node` commutes with a rotation of `tensor`'s axis, else (-1, why):
    the op's registered rotation rule (graphopt.analysis.oprules) decides."""
    outcome = rule_for(node, opsets).rotation(node, tensor, axis)
    return (-1, outcome) if isinstance(outcome, str) else (outcome, None)


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


def _start(graph: gs.Graph, producer: gs.Node, axis_w: int) -> tuple[Chain, gs.Tensor, int]:
    """The chain's record, the tensor its walk starts from (after a bias Add it owns) and its channel axis."""
    output = producer.outputs[0]
    rank = _rank(output)
    chain = Chain(producer, axis_w, int(producer.inputs[1].values.shape[axis_w]))
    start = 1 if producer.op != "MatMul" or rank is None else rank - 1
    has_bias = len(producer.inputs) > 2 and producer.inputs[2].name
    chain.bias = None if has_bias else bias_add(graph, producer, start, chain.channels)
    if chain.bias is not None:
        output = chain.bias[0].outputs[0]
    return chain, output, start


def _visit(graph: gs.Graph, chain: Chain, node: gs.Node, tensor: gs.Tensor, axis: int,
           opsets: dict[str, int]) -> list[tuple[gs.Tensor, int]] | str:
    """Follow the chain through one reader of `tensor`: the tensors to continue from, or why it ends."""
    consumer = _consumer_axis(node, tensor, axis, _rank(tensor))
    if consumer is not None:
        chain.consumers.append((node, consumer))
        chain.reads[tensor.name] = axis
        return []
    merged = _split_heads(graph, chain, node, tensor, axis) if node.op == "Reshape" else None
    if isinstance(merged, str):
        return merged
    if merged is not None:
        return [(t, len(t.shape) - 1) for t in merged]
    next_axis, why = _passes(node, tensor, axis, opsets)
    if why is not None:
        return f"{chain.producer.name} -> {node.name} ({node.op}): {why}"
    if node.op == "TSRA":
        chain.cuts.add(int(node.attrs["split"]))
    return [(node.outputs[0], next_axis)]


def find_chain(graph: gs.Graph, producer: gs.Node) -> Chain | str:
    """The legal chain starting at `producer`, or the reason there is none."""
    axis_w = producer_axis(producer)
    if axis_w is None:
        return f"{producer.name} ({producer.op}): not a rotatable producer"
    chain, output, start = _start(graph, producer, axis_w)
    outputs, opsets = {t.name for t in graph.outputs}, opsets_of(graph)
    pending, seen = [(output, start)], set()
    while pending:
        tensor, axis = pending.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs:
            return f"{producer.name} -> graph output '{tensor.name}'"
        for node in ir.consumers(tensor):
            found = _visit(graph, chain, node, tensor, axis, opsets)
            if isinstance(found, str):
                return found
            pending.extend(found)
    if not chain.consumers:
        return f"{producer.name} ({producer.op}): no linear consumer"
    return chain


def find_chains(graph: gs.Graph) -> tuple[list[Chain], list[str]]:
    chains, reasons = [], []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        found = find_chain(graph, node)
        if isinstance(found, str):
            reasons.append(found)
        else:
            chains.append(found)
    return chains, reasons

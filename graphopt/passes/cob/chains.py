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

from graphopt.analysis.function_rules import normalised_axis
from graphopt.ir import graph as ir
from graphopt.ops.functions import DOMAIN
from graphopt.passes.cob.heads import head_split, through_heads

_NONLINEAR = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "HardSwish", "HardSigmoid",
              "Clip", "Mish", "Swish", "PRelu", "Abs", "Exp", "Log", "Sqrt", "Erf"}
_WHY = {"BatchNormalization": "per-channel scale (BatchNorm)", "InstanceNormalization": "per-channel scale",
        "MaxPool": "max pooling is not equivariant to rotations", "GlobalMaxPool": "max pooling is not equivariant",
        "Add": "per-channel bias add", "Sub": "per-channel bias add", "Mul": "per-channel scale",
        "Div": "per-channel scale"}


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


def _consumer_axis(node: gs.Node, tensor: gs.Tensor, axis: int, rank: int | None) -> int | None:
    if not _constant_weight(node) or node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return None
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and axis == 1:
        return 1
    if node.op == "Gemm" and not node.attrs.get("transA", 0) and axis == 1:
        return 1 if node.attrs.get("transB", 0) else 0
    if node.op == "MatMul" and node.inputs[1].values.ndim == 2 and rank is not None and axis == rank - 1:
        return 0
    return None


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _squeezes_unit_map(tensor: gs.Tensor, output: gs.Tensor) -> bool:
    """A Reshape of [N, C, 1, ..., 1] to [N, C] (a Flatten of a 1x1 map, as the dynamo exporter writes it)."""
    before, after = tensor.shape, output.shape
    if before is None or after is None or len(after) != 2 or len(before) < 2:
        return False
    return all(isinstance(d, int) and d == 1 for d in before[2:]) and after[1] == before[1]


def _spatial_axes(node: gs.Node, tensor: gs.Tensor, axis: int) -> bool:
    """A keepdims reduction over constant axes that leave the channel axis alone (per-channel linear)."""
    rank = _rank(tensor)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values.reshape(-1).tolist()
    if rank is None or not axes or not int(node.attrs.get("keepdims", 1)):
        return False
    return axis not in {int(a) % rank for a in axes}


def _through_norm(node: gs.Node, tensor: gs.Tensor, axis: int) -> tuple[int, str | None]:
    """graphopt.RMSNorm (any Q) and graphopt.TSRA (Q block-diagonal over its split) commute with
    rotations of the axis they normalise, and with no rotation of another."""
    normalised = normalised_axis(node, _rank(tensor))
    if normalised is None:
        return -1, f"{node.op} axis {node.attrs.get('axis', 1)} with unknown or smaller rank"
    if normalised != axis:
        return -1, f"{node.op} over axis {normalised}, not the chain's channel axis {axis}: not equivariant"
    return axis, None


def _passes(node: gs.Node, tensor: gs.Tensor, axis: int) -> tuple[int, str | None]:
    """(output channel axis, None) when `node` commutes with a rotation of `tensor`'s axis, else (-1, why)."""
    if node.op in _WHY and any(t is not tensor and not isinstance(t, gs.Constant) for t in node.inputs):
        return -1, "combines the channels with another variable tensor (a residual add or a gate)"
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return -1, "reads the channels twice or as a parameter"
    op = node.op
    if op == "Identity" or (op == "Dropout" and not any(t.outputs for t in node.outputs[1:])):
        return axis, None
    if op == "Transpose":
        perm, rank = node.attrs.get("perm"), _rank(tensor)
        if perm is None and rank is None:
            return -1, "Transpose of unknown rank"
        return [int(p) for p in (perm if perm is not None else range(rank - 1, -1, -1))].index(axis), None
    if op in ("AveragePool", "GlobalAveragePool") and axis == 1:
        return axis, None
    if op == "Flatten" and axis == 1 and int(node.attrs.get("axis", 1)) == 1:
        shape = tensor.shape
        if shape is not None and all(isinstance(d, int) and d == 1 for d in shape[2:]):
            return 1, None
        return -1, "Flatten of a map larger than 1x1 mixes positions into features"
    if op == "Reshape" and axis == 1 and _squeezes_unit_map(tensor, node.outputs[0]):
        return 1, None
    if op in ("ReduceMean", "ReduceSum") and _spatial_axes(node, tensor, axis):  # e.g. a global average pool
        return axis, None
    if node.domain == DOMAIN and op in ("RMSNorm", "TSRA"):
        return _through_norm(node, tensor, axis)
    if op in _NONLINEAR:
        return -1, "elementwise nonlinearity is not equivariant to rotations"
    return -1, _WHY.get(op, "not equivariant to a rotation of the channels")


def bias_add(graph: gs.Graph, producer: gs.Node, axis: int, channels: int) -> tuple[gs.Node, int] | None:
    """(Add, constant index) when the producer's only reader adds a constant vector along `axis`, the
    last axis, alone (a bias on channels that are not last stays an illegal per-channel Add)."""
    output = producer.outputs[0]
    readers = ir.consumers(output)
    rank = _rank(output)
    if len(readers) != 1 or readers[0].op != "Add" or rank is None or axis != rank - 1 \
            or ir.is_graph_io(graph, output):
        return None
    add = readers[0]
    if len(add.inputs) != 2 or sum(t is output for t in add.inputs) != 1:
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


def find_chain(graph: gs.Graph, producer: gs.Node) -> Chain | str:
    """The legal chain starting at `producer`, or the reason there is none."""
    axis_w = producer_axis(producer)
    if axis_w is None:
        return f"{producer.name} ({producer.op}): not a rotatable producer"
    output = producer.outputs[0]
    rank = _rank(output)
    chain = Chain(producer, axis_w, int(producer.inputs[1].values.shape[axis_w]))
    outputs = {t.name for t in graph.outputs}
    start = 1 if producer.op != "MatMul" or rank is None else rank - 1
    has_bias = len(producer.inputs) > 2 and producer.inputs[2].name
    chain.bias = None if has_bias else bias_add(graph, producer, start, chain.channels)
    if chain.bias is not None:
        output = chain.bias[0].outputs[0]
    pending = [(output, start)]
    seen: set[str] = set()
    while pending:
        tensor, axis = pending.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs:
            return f"{producer.name} -> graph output '{tensor.name}'"
        for node in ir.consumers(tensor):
            consumer = _consumer_axis(node, tensor, axis, _rank(tensor))
            if consumer is not None:
                chain.consumers.append((node, consumer))
                chain.reads[tensor.name] = axis
                continue
            merged = _split_heads(graph, chain, node, tensor, axis) if node.op == "Reshape" else None
            if isinstance(merged, str):
                return merged
            if merged is not None:
                pending.extend((t, len(t.shape) - 1) for t in merged)
                continue
            next_axis, why = _passes(node, tensor, axis)
            if why is not None:
                return f"{producer.name} -> {node.name} ({node.op}): {why}"
            if node.op == "TSRA":
                chain.cuts.add(int(node.attrs["split"]))
            pending.append((node.outputs[0], next_axis))
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

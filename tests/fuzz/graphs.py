"""Layout and structure ops of random graphs, and whole graphs: a random input, up to 7 ops drawn among
those that apply to the current tensor, maybe a classifier head, maybe a second graph output, and some of
the exporters' quirks (weights as Constant nodes, initializers listed as inputs, nodes without names)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.fuzz.builder import OPSETS, Builder, Chooser, Example, Planting, Tensor, chance, none, pick
from tests.fuzz.ops import activation, affine, batchnorm, conv, pad, pool, producer, resize


# -- layout ------------------------------------------------------------------------------------

def transpose(b: Builder, t: Tensor) -> Tensor:
    c = t.channels
    h, w = t.spatial
    if t.layout == "nchw":
        (name,) = b.node("Transpose", [t.name], perm=[0, 2, 3, 1])
        shape, layout = (1, h, w, c), "nhwc"
    else:
        (name,) = b.node("Transpose", [t.name], perm=[0, 3, 1, 2])
        shape, layout = (1, c, h, w), "nchw"
    b.ops.append(f"Transpose(to {layout})")
    return b.tensor(name, shape, layout, t.planted, t.dead)


def flatten(b: Builder, t: Tensor) -> Tensor:
    """Flatten(axis 1), or a Reshape to [N, C*H*W] (a batch entry of 0 or -1): channels become blocks."""
    h, w = t.spatial
    spread = np.repeat if t.layout == "nchw" else np.tile
    features = t.channels * h * w
    if chance(b.chooser, 50):
        (name,) = b.node("Flatten", [t.name], axis=1)
        b.ops.append("Flatten")
    elif chance(b.chooser, 25):
        (name,) = b.node("Reshape", [t.name, _runtime_flat_shape(b, t)])
        b.ops.append("Reshape(Shape)")
    else:
        shape = pick(b.chooser, [[0, -1], [-1, features], [0, features]])
        (name,) = b.node("Reshape", [t.name, b.const(np.array(shape, np.int64), "shape")])
        b.ops.append(f"Reshape{shape}")
    return b.tensor(name, (1, features), "flat", spread(t.planted, h * w), spread(t.dead, h * w))


def _runtime_flat_shape(b: Builder, t: Tensor) -> str:
    """Concat(Unsqueeze(Gather(Shape(t), 0)), [-1]): [N, -1] computed at run time."""
    (shape,) = b.node("Shape", [t.name])
    (batch,) = b.node("Gather", [shape, b.const(np.array(0, np.int64), "i")], axis=0)
    if b.opset >= 13:
        (batch,) = b.node("Unsqueeze", [batch, b.const(np.array([0], np.int64), "axes")])
    else:
        (batch,) = b.node("Unsqueeze", [batch], axes=[0])
    (joined,) = b.node("Concat", [batch, b.const(np.array([-1], np.int64), "rest")], axis=0)
    return joined


def channel_slice(b: Builder, t: Tensor) -> Tensor:
    """Slice of a channel range (bounds possibly negative or past the end, as exporters write them)."""
    c = t.channels
    start = b.chooser.integer(0, c - 1)
    stop = b.chooser.integer(start + 1, c)
    starts = [start - c if chance(b.chooser, 30) else start]
    ends = [2 ** 62 if stop == c and chance(b.chooser, 50) else stop]
    axes = [t.axis - len(t.shape) if chance(b.chooser, 30) else t.axis]
    (name,) = b.node("Slice", [t.name, b.const(np.array(starts, np.int64), "starts"),
                               b.const(np.array(ends, np.int64), "ends"), b.const(np.array(axes, np.int64), "axes")])
    shape = list(t.shape)
    shape[t.axis] = stop - start
    b.ops.append("Slice")
    return b.tensor(name, tuple(shape), t.layout, t.planted[start:stop], t.dead[start:stop])


def gate(b: Builder, t: Tensor) -> Tensor:
    """t * act(producer(t)): a gate from another producer, coupled with t channel by channel."""
    gating = activation(b, producer(b, t, t.channels, keep_size=True))
    operands = [t.name, gating.name] if chance(b.chooser, 50) else [gating.name, t.name]
    (name,) = b.node("Mul", operands)
    b.ops.append("Mul(gate)")
    return b.tensor(name, t.shape, t.layout, t.planted & gating.planted, t.dead | gating.dead)


def identity(b: Builder, t: Tensor) -> Tensor:
    (name,) = b.node(pick(b.chooser, ["Identity", "Dropout"]), [t.name])
    b.ops.append("Identity")
    return b.tensor(name, t.shape, t.layout, t.planted, t.dead)


def tokens(b: Builder, t: Tensor) -> Tensor:
    """NCHW to [N, H*W, C] tokens: Reshape [N, C, H*W] (a batch entry of 0 or -1), Transpose (0, 2, 1)."""
    h, w = t.spatial
    shape = [pick(b.chooser, [0, -1]), t.channels, h * w]
    (flat,) = b.node("Reshape", [t.name, b.const(np.array(shape, np.int64), "shape")])
    (name,) = b.node("Transpose", [flat], perm=[0, 2, 1])
    b.ops.append("Tokens")
    return b.tensor(name, (1, h * w, t.channels), "tokens", t.planted, t.dead)


def token_mean(b: Builder, t: Tensor) -> Tensor:
    """ReduceMean over the tokens, without keeping the axis: [N, C]."""
    if b.opset >= 18:
        (name,) = b.node("ReduceMean", [t.name, b.const(np.array([1], np.int64), "axes")], keepdims=0)
    else:
        (name,) = b.node("ReduceMean", [t.name], axes=[1], keepdims=0)
    b.ops.append("ReduceMean")
    return b.tensor(name, (1, t.channels), "flat", t.planted, t.dead)


def shuffle(b: Builder, t: Tensor) -> Tensor:
    """Channel shuffle: Reshape [N, g, C/g, H, W], Transpose (0, 2, 1, 3, 4), Reshape [N, C, H, W]."""
    c = t.channels
    h, w = t.spatial
    groups = pick(b.chooser, [g for g in range(2, c) if c % g == 0])
    batch = pick(b.chooser, [0, -1])
    (split,) = b.node("Reshape", [t.name, b.const(np.array([batch, groups, c // groups, h, w], np.int64), "shape")])
    (moved,) = b.node("Transpose", [split], perm=[0, 2, 1, 3, 4])
    (name,) = b.node("Reshape", [moved, b.const(np.array([batch, c, h, w], np.int64), "shape")])
    order = np.arange(c).reshape(groups, c // groups).T.reshape(-1)  # new channel j holds old channel order[j]
    b.ops.append(f"Shuffle(g{groups})")
    return b.tensor(name, t.shape, "nchw", t.planted[order], t.dead[order])


# -- structure ---------------------------------------------------------------------------------

def _add(b: Builder, first: Tensor, second: Tensor) -> Tensor:
    if chance(b.chooser, 50):
        first, second = second, first
    (name,) = b.node("Add", [first.name, second.name])
    return b.tensor(name, first.shape, first.layout, first.planted & second.planted, first.dead | second.dead)


def residual(b: Builder, t: Tensor) -> Tensor:
    """t + branch(t) (or a projection of t + branch(t)); the branch's last producer plants the stream's channels."""
    width = t.channels
    shortcut = t
    if chance(b.chooser, 25):  # projection shortcut: both sides plant the same channels
        width = b.chooser.integer(2, 8)
        must = none(width) if not chance(b.chooser, 50) else b.subset(width, 40)
        shortcut = producer(b, t, width, must, keep_size=True)
    branch = t
    if chance(b.chooser, 50):
        branch = activation(b, producer(b, t, keep_size=True))
    branch = producer(b, branch, width, shortcut.planted, keep_size=True)
    if branch.layout in ("nchw", "flat") and chance(b.chooser, 30):
        branch = batchnorm(b, branch)
    b.ops.append("Add(residual)")
    return _add(b, shortcut, branch)


def squeeze_excite(b: Builder, t: Tensor) -> Tensor:
    """t * Sigmoid(Conv(Relu(Conv(GlobalAveragePool(t))))): the gate's producer plants the stream's channels,
    so a planted channel is 0 * 0.5."""
    (pooled,) = b.node("GlobalAveragePool", [t.name])
    squeezed = conv(b, b.tensor(pooled, (1, t.channels, 1, 1), "nchw", t.planted, t.dead),
                    b.chooser.integer(1, 4), plain=True)
    (relu,) = b.node("Relu", [squeezed.name])
    expanded = conv(b, replace(squeezed, name=relu), t.channels, t.planted, plain=True)
    (gate,) = b.node("Sigmoid", [expanded.name])
    operands = [t.name, gate] if chance(b.chooser, 50) else [gate, t.name]
    (name,) = b.node("Mul", operands)
    b.ops.append("SqueezeExcite")
    return b.tensor(name, t.shape, "nchw", t.planted & expanded.planted, t.dead)


def tied(b: Builder, t: Tensor) -> Tensor:
    """Two producers C -> C with one weight initializer (when their shapes agree), an activation between."""
    first = producer(b, t, t.channels, keep_size=True)
    b.tie = True
    second = producer(b, activation(b, first), t.channels, keep_size=True)
    b.tie = False
    b.ops.append("Tied")
    return second


def _concat(b: Builder, pieces: list[Tensor]) -> Tensor:
    axis = pieces[0].axis
    if chance(b.chooser, 30):
        axis -= len(pieces[0].shape)
    (name,) = b.node("Concat", [p.name for p in pieces], axis=axis)
    shape = list(pieces[0].shape)
    shape[pieces[0].axis] = sum(p.channels for p in pieces)
    return b.tensor(name, tuple(shape), pieces[0].layout, np.concatenate([p.planted for p in pieces]),
                    np.concatenate([p.dead for p in pieces]))


def concat(b: Builder, t: Tensor) -> Tensor:
    """Concat on the channel axis of new producers on t (and t itself, DenseNet-style)."""
    pieces = [producer(b, t, keep_size=True) for _ in range(b.chooser.integer(1, 2))]
    copies = int(len(pieces) == 1 or chance(b.chooser, 40)) + int(chance(b.chooser, 10))  # t once, twice
    for _ in range(copies):
        pieces.insert(b.chooser.integer(0, len(pieces)), t)
    b.ops.append(f"Concat({len(pieces)})")
    return _concat(b, pieces)


def split(b: Builder, t: Tensor) -> Tensor:
    """Split the channels into 2 or 3 pieces, transform some, Concat them back in any order (C2f-style:
    sometimes with a producer on the last piece appended)."""
    c = t.channels
    cuts = sorted({b.chooser.integer(1, c - 1) for _ in range(b.chooser.integer(1, min(2, c - 1)))})
    sizes = np.diff([0, *cuts, c]).astype(np.int64)
    axis = t.axis - (len(t.shape) if chance(b.chooser, 30) else 0)
    if b.opset >= 13:
        names = b.node("Split", [t.name, b.const(sizes, "split")], outputs=len(sizes), axis=axis)
    else:
        names = b.node("Split", [t.name], outputs=len(sizes), axis=axis, split=[int(s) for s in sizes])
    pieces, start = [], 0
    for name, size in zip(names, sizes):
        shape = list(t.shape)
        shape[t.axis] = int(size)
        piece = b.tensor(name, tuple(shape), t.layout, t.planted[start:start + size], t.dead[start:start + size])
        start += size
        transform = pick(b.chooser, ["none", "activation", "producer"])
        pieces.append(piece if transform == "none" else
                      activation(b, piece) if transform == "activation" else producer(b, piece, keep_size=True))
    if chance(b.chooser, 30):
        pieces.append(producer(b, pieces[-1], keep_size=True))
    if chance(b.chooser, 15):  # an output nobody reads
        pieces.pop(b.chooser.integer(0, len(pieces) - 1))
    if chance(b.chooser, 50):
        pieces.reverse()
    b.ops.append(f"Split({len(sizes)})")
    return _concat(b, pieces) if len(pieces) > 1 else pieces[0]


# -- whole graphs ------------------------------------------------------------------------------

Op = Callable[[Builder, Tensor], Tensor]


def _ops(t: Tensor) -> list[Op]:
    """The ops that apply to `t`, simplest first."""
    ops: list[Op] = [activation, producer, affine, residual, gate, identity, tied]
    ops += [concat, split, channel_slice] if t.channels > 1 else [concat]
    if t.layout == "nchw":
        ops += [batchnorm, pool, squeeze_excite, transpose, flatten, tokens, pad]
        if max(t.spatial) <= 8:
            ops.append(resize)
        if any(t.channels % g == 0 for g in range(2, t.channels)):
            ops.append(shuffle)
    elif t.layout == "nhwc":
        ops += [transpose, flatten]
    elif t.layout == "tokens":
        ops.append(token_mean)
    else:
        ops.append(batchnorm)
    return ops


def _head(b: Builder, t: Tensor) -> Tensor:
    classes = b.chooser.integer(2, 6)
    if t.layout == "nchw" and chance(b.chooser, 50):
        (pooled,) = b.node("GlobalAveragePool", [t.name])
        (flat,) = b.node("Flatten", [pooled], axis=1)
        t = b.tensor(flat, (1, t.channels), "flat", t.planted, t.dead)
    b.ops.append("head")
    return producer(b, t, classes)


def _graph_input(b: Builder) -> Tensor:
    layout = pick(b.chooser, ["nchw", "flat", "nchw", "nhwc", "tokens"])
    channels = b.chooser.integer(1, 4) if layout in ("nchw", "nhwc") else b.chooser.integer(2, 12)
    size = b.chooser.integer(4, 8)
    shape = {"nchw": (1, channels, size, size), "nhwc": (1, size, size, channels), "flat": (1, channels),
             "tokens": (1, size, channels)}[layout]
    return Tensor("x", shape, layout, none(channels), none(channels))


def _value_info(t: Tensor, dims: dict[int, str | None]) -> onnx.ValueInfoProto:
    """`t` declared with a symbolic batch and the given symbolic (or unknown, None) dims by axis."""
    shape = ["N", *(dims.get(axis, size) for axis, size in enumerate(t.shape[1:], 1))]
    return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, shape)


def _symbolic(chooser: Chooser, x: Tensor) -> dict[int, str]:
    """Symbolic spatial (or token) dims of the input, by axis, sometimes: the sizes come from --input-shape."""
    if x.layout == "flat" or not chance(chooser, 15):
        return {}
    return {1: "T"} if x.layout == "tokens" else dict(zip((1, 2) if x.layout == "nhwc" else (2, 3), ("H", "W")))


def build(chooser: Chooser, planting: Planting) -> Example:
    """One random graph with planted channels (see the module docstring), checked by the ONNX checker."""
    opset = pick(chooser, OPSETS)
    b = Builder(chooser, planting, opset, chooser.integer(0, 2 ** 16))
    x = _graph_input(b)
    symbols = _symbolic(chooser, x)
    t = x
    for _ in range(chooser.integer(1, 7)):
        t = pick(chooser, _ops(t))(b, t)
    if chance(chooser, 60):
        t = _head(b, t)
    outputs = [t]
    inner = [s for s in b.tensors if s.name != t.name]
    if inner and chance(chooser, 15):
        outputs.append(pick(chooser, inner))
    # outputs of a graph with symbolic input dims leave every non-batch dim but the channels' unknown
    unknown = [{axis: None for axis in range(1, len(o.shape)) if axis != o.axis} if symbols else {} for o in outputs]
    graph = helper.make_graph(b.nodes, "fuzz", [_value_info(x, symbols)],
                              [_value_info(o, dims) for o, dims in zip(outputs, unknown)], b.initializers)
    _exporter_quirks(chooser, graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8,
                              producer_name="graphopt-fuzz")
    onnx.checker.check_model(model, full_check=True)
    return Example(model, planting, b.ops, {symbol: x.shape[axis] for axis, symbol in symbols.items()})


def _exporter_quirks(chooser: Chooser, graph: onnx.GraphProto) -> None:
    """What exporters do besides: weights as Constant nodes, initializers listed as graph inputs, nodes
    without names."""
    if chance(chooser, 20):
        moved = [t for t in graph.initializer if chance(chooser, 50)]
        constants = [helper.make_node("Constant", [], [t.name], value=t) for t in moved]
        kept = [t for t in graph.initializer if all(t is not m for m in moved)]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = constants + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    if chance(chooser, 15):
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
    if chance(chooser, 15):
        for node in graph.node:
            node.name = ""

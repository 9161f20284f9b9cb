"""Read one piece of a Concat directly: a Gather or Slice that only picks from one input of a Concat along the
concatenated axis reads that input instead.

Exporters gather per-layer results into one tensor and pick one back out: torch's exports of a multi-layer
LSTM/GRU concatenate every layer's final hidden state (`_, (h, _) = lstm(x)`, `h` is [layers, batch, hidden])
and `h[-1]` gathers the last. Through the Concat every layer's hidden units would have to be pruned alike
(a Concat on another axis joins its inputs' channels); read directly, each layer is a group of its own and
the Concat, read by nothing else, is dead. Exact: the picked values are the same. Only constant indices,
starts and ends, unit steps and inputs whose sizes along the axis are known (inferred shapes) are taken.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register


def _concat_pieces(node: gs.Node, axis: int) -> tuple[gs.Node, list[int]] | None:
    """The Concat feeding `node`'s data input along `axis` (negative allowed) and its inputs' sizes there."""
    concat = ir.producer(node.inputs[0])
    shape = node.inputs[0].shape
    if concat is None or concat.op != "Concat" or shape is None:
        return None
    rank = len(shape)
    if int(concat.attrs.get("axis", 0)) % rank != axis % rank:
        return None
    sizes = [t.shape[axis % rank] if t.shape is not None and len(t.shape) == rank else None for t in concat.inputs]
    if not all(isinstance(size, (int, np.integer)) for size in sizes):
        return None
    return concat, [int(size) for size in sizes]


def _piece(sizes: list[int], start: int, end: int) -> tuple[int, int] | None:
    """(input index, its offset) of the Concat input holding [start, end), if one does."""
    offset = 0
    for index, size in enumerate(sizes):
        if offset <= start and end <= offset + size:
            return index, offset
        offset += size
    return None


def _gather(graph: gs.Graph, node: gs.Node) -> bool:
    axis = int(node.attrs.get("axis", 0))
    found = _concat_pieces(node, axis)
    index = ir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if found is None or index is None or index.size != 1:
        return False
    concat, sizes = found
    position = int(index.flat[0]) + (sum(sizes) if int(index.flat[0]) < 0 else 0)
    piece = _piece(sizes, position, position + 1) if 0 <= position < sum(sizes) else None
    if piece is None:
        return False
    node.inputs[0] = concat.inputs[piece[0]]
    ir.set_input_array(graph, node, 1, np.full(index.shape, position - piece[1], dtype=index.dtype))
    return True


def _slice_bounds(node: gs.Node, opset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Constant starts, ends and axes of a Slice with unit steps (opset 10 on, axes given), else None."""
    if opset < 10 or len(node.inputs) < 4 or not node.inputs[3].name:
        return None  # attributes (opset 1-9) or every axis sliced: not taken
    bounds = [ir.constant_array(node.inputs[i]) for i in (1, 2, 3)]
    steps = ir.constant_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    if any(b is None for b in bounds) or (steps is not None and np.any(steps != 1)):
        return None
    return bounds[0].copy(), bounds[1].copy(), bounds[2]


def _slice(graph: gs.Graph, node: gs.Node, opset: int) -> bool:
    bounds = _slice_bounds(node, opset)
    if bounds is None:
        return False
    starts, ends, axes = bounds
    hits = [(i, found) for i, axis in enumerate(axes.tolist()) if (found := _concat_pieces(node, int(axis)))]
    if len(hits) != 1:
        return False
    at, (concat, sizes) = hits[0]
    total = sum(sizes)
    start, end = (min(max(int(v) + (total if int(v) < 0 else 0), 0), total) for v in (starts[at], ends[at]))
    piece = _piece(sizes, start, end) if start < end else None
    if piece is None:
        return False
    starts[at], ends[at] = start - piece[1], end - piece[1]
    node.inputs[0] = concat.inputs[piece[0]]
    ir.set_input_array(graph, node, 1, starts)
    ir.set_input_array(graph, node, 2, ends)
    return True


@register
class SelectThroughConcat(Pass):
    name = "select_through_concat"
    description = "a Gather or Slice picking from one input of a Concat reads that input"
    requires = frozenset({"shapes_inferred"})
    ensures = frozenset({"concat_selections_resolved"})
    preserves = all_but()  # the picked tensor and every shape stay; the Concat, if now unread, is cleaned up

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = int(graph.opset) if graph.opset else 0
        resolved = 0
        for node in list(graph.nodes):
            if node.op == "Gather" and node.inputs:
                resolved += _gather(graph, node)
            elif node.op == "Slice" and node.inputs:
                resolved += _slice(graph, node, opset)
        return PassResult(modified=resolved > 0, stats={"resolved": resolved})

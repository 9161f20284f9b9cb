"""Constant folding: every node whose inputs are all constant is evaluated and replaced.

Exact: values are computed by onnxruntime on the node itself. Shapes are inferred first, so that
`Shape` of a tensor whose queried dimensions are static (channel counts behind a dynamic batch) folds
too. If/Loop subgraphs are left untouched, and so is a node whose output a subgraph reads: folding it would
write the result into every subgraph that reads it (graphopt.passes.exprune.dispatch derives the op's
permuted weight from the dense one in the main graph; onnxruntime folds it when it loads the model).

Size limit: a node whose result would take more than `FOLD_LIMIT_BYTES` (64 MiB) and more than
`GROWTH_LIMIT` (10) times the bytes of the constants it is computed from stays a node, computed at run
time, and is listed in the pass's skipped reasons; so Range/Tile/Expand/ConstantOfShape of a few small
constants cannot blow the file up, while a Transpose or Cast of a large weight still folds. The sizes
are those shape inference gives; a result whose shape it cannot tell is folded. Nodes downstream of a
node left in place stay too (their inputs are no longer all constant).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register

FOLD_LIMIT_BYTES = 64 * 2**20
GROWTH_LIMIT = 10


def too_large(result_bytes: int, source_bytes: int) -> bool:
    """Whether a folded result of `result_bytes`, computed from constants of `source_bytes`, would grow the
    model too much to be worth storing."""
    return result_bytes > FOLD_LIMIT_BYTES and result_bytes > GROWTH_LIMIT * source_bytes


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} bytes"


def _nbytes(tensor: gs.Tensor) -> int | None:
    """Bytes of `tensor` from its (inferred) static shape and dtype, None when either is unknown."""
    shape, dtype = tensor.shape, tensor.dtype
    if shape is None or dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    try:
        return math.prod(shape) * np.dtype(dtype).itemsize
    except TypeError:  # a type numpy lacks
        return None


class _SizeGuard:
    """Asked node by node in topological order while folding: refuses results `too_large` says would grow
    the file, and remembers which (by output name) with the reason."""

    def __init__(self) -> None:
        self.sources: dict[str, dict[str, int]] = {}  # tensor -> the constants it is computed from, their bytes
        self.refused: dict[str, str] = {}

    def _sources_of(self, tensor: gs.Tensor) -> dict[str, int]:
        if isinstance(tensor, gs.Constant):
            return {tensor.name: _nbytes(tensor) or 0}
        return self.sources.get(tensor.name, {})

    def __call__(self, node: gs.Node) -> bool:
        sources: dict[str, int] = {}
        for tensor in node.inputs:
            sources.update(self._sources_of(tensor))
        for tensor in node.outputs:
            self.sources[tensor.name] = sources
        sizes = [_nbytes(t) for t in node.outputs]
        if any(size is None for size in sizes):
            return False
        result, source = sum(sizes), sum(sources.values())
        if not too_large(result, source):
            return False
        self.refused[node.outputs[0].name] = (
            f"{node.name or node.outputs[0].name} ({node.op}): result of {_size(result)} from {_size(source)} of "
            f"constants is above the folding limit ({_size(FOLD_LIMIT_BYTES)} and {GROWTH_LIMIT}x its inputs), "
            f"left to run time")
        return True


@register
class ConstantFold(Pass):
    name = "constant_fold"
    description = "evaluate nodes whose inputs are all constant"
    ensures = frozenset({"constants_folded"})
    preserves = all_but("batchnorm_folded")  # BatchNormalization parameters computed from constants become foldable

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ir.apply_inferred_shapes(graph, ctx.template)  # static dims let Shape->Gather chains fold
        guard = _SizeGuard()
        captured = ir.body_reads(graph)

        def excluded(node: gs.Node) -> bool:  # a value a control-flow body reads stays computed where it is
            return any(out.name in captured for out in node.outputs) or guard(node)

        folded = ir.fold_constants(graph, exclude=excluded)
        remaining = graph.tensors()
        skipped = [reason for name, reason in guard.refused.items() if name in remaining]
        return PassResult(modified=folded > 0, stats={"nodes_folded": folded}, skipped=skipped)

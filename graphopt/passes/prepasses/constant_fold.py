"""Constant folding: every node whose inputs are all constant is evaluated and replaced.

Exact: values are computed by onnxruntime on the node itself. Shapes are inferred first, so that
`Shape` of a tensor whose queried dimensions are static (channel counts behind a dynamic batch) folds
too. If/Loop subgraphs are left untouched.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register


@register
class ConstantFold(Pass):
    name = "constant_fold"
    description = "evaluate nodes whose inputs are all constant"
    ensures = frozenset({"constants_folded"})
    preserves = all_but("batchnorm_folded")  # BatchNormalization parameters computed from constants become foldable

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ir.apply_inferred_shapes(graph, ctx.template)  # static dims let Shape->Gather chains fold
        folded = ir.fold_constants(graph)
        return PassResult(modified=folded > 0, stats={"nodes_folded": folded})

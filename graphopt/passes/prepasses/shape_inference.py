"""Shape inference: dtypes and shapes of intermediate tensors from ONNX shape inference.

Changes no computation; later passes and the MAC counter read the shapes.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register


@register
class ShapeInference(Pass):
    name = "shape_inference"
    description = "annotate tensors with inferred dtypes and shapes"
    ensures = frozenset({"shapes_inferred"})
    preserves = all_but()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        typed = ir.apply_inferred_shapes(graph, ctx.template)
        return PassResult(modified=False, stats={"tensors_typed": typed})

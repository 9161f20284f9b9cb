"""Shape inference: dtypes and shapes of intermediate tensors from ONNX shape inference.

Changes no computation; later passes and the MAC counter read the shapes. The graph's inputs and
outputs are annotated too (the passes read what inference proves about them), but an exported model
keeps the dims they declare (graphopt.ir.interface): `Concatoutput_dim_1` is not written as 84.
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

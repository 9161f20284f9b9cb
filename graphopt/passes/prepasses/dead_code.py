"""Dead-code elimination: nodes and initializers no graph output depends on are removed.

Graph inputs stay even when unused: they are the model's interface.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register


@register
class DeadCode(Pass):
    name = "dead_code"
    description = "remove nodes and initializers that no output depends on"
    ensures = frozenset({"dead_code_removed"})
    preserves = all_but()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = len(graph.nodes)
        constants_before = sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
        ir.cleanup(graph)
        constants_after = sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
        stats = {"nodes_removed": nodes_before - len(graph.nodes),
                 "initializers_removed": constants_before - constants_after}
        return PassResult(modified=any(stats.values()), stats=stats)

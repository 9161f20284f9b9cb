"""Remove Identity and inference-mode Dropout nodes.

Exact: in inference, Dropout (without a consumed mask output, and without training_mode=True) and
Identity return their input unchanged. When the node's output is a graph output, the producer of its
input is made to write the graph output directly, so output names never change. A node whose input
is itself a graph input or output, or an initializer, is kept (removing it would rename an interface). An
Identity of a constant whose output a control-flow body reads is kept too: without it the constant would be
written into every body that reads it (graphopt.passes.exprune.dispatch shares one weight between an If's
branches this way).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register


def _removable(graph: gs.Graph, node: gs.Node, captured: set[str]) -> str | None:
    """None when the node can go, else why not (`captured`: the names control-flow bodies read)."""
    label = node.name or node.outputs[0].name
    if isinstance(node.inputs[0], gs.Constant) and node.outputs[0].name in captured:
        return f"{label}: kept, a control-flow body reads this constant through it"
    if node.op == "Dropout":
        if len(node.outputs) > 1 and (node.outputs[1].outputs or ir.is_graph_io(graph, node.outputs[1])):
            return f"{label}: Dropout mask is consumed"
        if len(node.inputs) > 2 and node.inputs[2].name:
            mode = ir.constant_array(node.inputs[2])
            if mode is None or bool(mode):
                return f"{label}: Dropout training_mode is not a constant False"
    return None


@register
class RemoveIdentity(Pass):
    name = "remove_identity"
    description = "drop Identity and inference-mode Dropout nodes"
    ensures = frozenset({"identities_removed"})
    preserves = all_but("batchnorm_folded")  # Conv -> Identity -> BatchNormalization becomes foldable

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        removed = 0
        captured = ir.body_reads(graph)
        for node in list(graph.nodes):
            if node.op not in ("Identity", "Dropout") or not node.inputs or not node.inputs[0].name:
                continue
            reason = _removable(graph, node, captured)
            if reason:
                result.skipped.append(reason)
                continue
            source, out = node.inputs[0], node.outputs[0]
            if ir.is_graph_io(graph, out):
                upstream = ir.producer(source)
                if upstream is None or ir.is_graph_io(graph, source) or len(source.outputs) != 1:
                    result.skipped.append(f"{node.name or out.name}: kept, its input '{source.name}' is an "
                                          "initializer, a graph input or output, or read elsewhere")
                    continue
                ir.detach(node)
                ir.replace_output(upstream, source, out)
            else:
                ir.replace_uses(graph, out, source)
                ir.detach(node)
            removed += 1
        result.modified = removed > 0
        result.stats["removed"] = removed
        return result

"""Per-channel constant values of the tensors a channel group flows through (for dead-unit elimination).

`channel_constants` carries each dead producer's per-channel constant through the graph in topological
order, asking every node's registered `constant` rule (graphopt.analysis.oprules); a layout op without
one passes the values on, any other op without one leaves its outputs unknown and is named in
`unsupported`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.constants import merge_inputs
from graphopt.analysis.oprules import rule_for
from graphopt.analysis.registry import Values, opsets_of
from graphopt.analysis.state import Analysis


def channel_constants(a: Analysis, graph: gs.Graph, producers: dict[str, Values],
                      unsupported: dict[int, set[str]]) -> dict[str, Values]:
    """Known per-channel constants of every tensor the groups flow through, by tensor name.

    `producers` maps producer node names to their output's values; ops that stop evaluation are added
    to `unsupported[root]` for every root whose known values they drop.
    """
    known: dict[str, Values] = {}
    opsets = opsets_of(graph)
    for node in graph.nodes:
        if node.name in producers:
            known[node.outputs[0].name] = producers[node.name]
            continue
        inputs = [known[t.name] for t in node.inputs if t.name in known]
        if not inputs:
            continue
        rule = rule_for(node, opsets)
        evaluate = rule.constant or (merge_inputs if rule.layout else None)
        result = evaluate(a, node, known, inputs) if evaluate is not None else None
        if result is None:
            _unsupported(node, inputs, unsupported)
            continue
        _lost(node, inputs, result, unsupported)
        for output in node.outputs:
            if output.name and a.state(output) is not None:
                known[output.name] = result
    return known


def _unsupported(node: gs.Node, inputs: list[Values], unsupported: dict[int, set[str]]) -> None:
    for values in inputs:
        for root, array in values.items():
            if np.any(np.isfinite(array)):
                unsupported.setdefault(root, set()).add(node.op)


def _lost(node: gs.Node, inputs: list[Values], result: Values, unsupported: dict[int, set[str]]) -> None:
    """Name `node` for the roots whose known values it turned unknown (a BatchNorm over flattened channels
    whose per-feature parameters spread one constant over several values)."""
    for values in inputs:
        for root, array in values.items():
            if root in result and np.any(np.isfinite(array) & ~np.isfinite(result[root])):
                unsupported.setdefault(root, set()).add(node.op)

"""Channel groups: every coupled set of channels that can shrink together, and where it lives.

`find_groups(graph, shapes)` walks the graph in topological order. Each op type has a rule
(registered once per op in graphopt.analysis.oprules) that reads the `ChannelState` of its inputs, sets those of its outputs,
couples atoms (merges), and records *sites*: the places a pruning engine must rewrite (a weight axis
to slice, a Split's sizes, a Reshape's shape entry, ...). An input that carries channels into an op
without a rule blocks its group, as do graph outputs and tensors read inside subgraphs.

The result lists each group (a class of coupled atoms): its size, its sites, whether it is prunable
and, if not, why. Shapes come from a batch-1 shape inference (`shapes`, by tensor name).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.analysis.oprules import rule_for
from graphopt.analysis.registry import opsets_of
from graphopt.analysis.state import Analysis, CostTerm, Group, Site, constant_values

__all__ = ["Analysis", "CostTerm", "Group", "Site", "constant_values", "find_groups", "name_nodes", "subgraph_reads"]


def subgraph_reads(graph: gs.Graph) -> set[str]:
    """Names of outer tensors read inside If/Loop/Scan bodies (at any depth)."""
    names: set[str] = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            bodies = attr if isinstance(attr, list) else [attr]
            for body in bodies:
                if isinstance(body, gs.Graph):
                    inner = {t.name for n in body.nodes for t in n.outputs} | {t.name for t in body.inputs}
                    names |= {t.name for n in body.nodes for t in n.inputs if t.name not in inner}
                    names |= subgraph_reads(body)
    return names


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a distinct name (sites, reports and MAC counts refer to nodes by name)."""
    taken = {n.name for n in graph.nodes}
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            candidate = f"{node.op}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
        seen.add(node.name)


def find_groups(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> Analysis:
    analysis = Analysis(graph, shapes)
    name_nodes(graph)
    captured = subgraph_reads(graph)
    opsets = opsets_of(graph)
    for node in graph.nodes:
        rule_for(node, opsets).channels(node, analysis)
    for name in captured:
        state = analysis.states.get(name)
        analysis.block(state, f"tensor '{name}' is read inside a subgraph")
    for output in graph.outputs:
        analysis.block(analysis.state(output), f"graph output '{output.name}'")
    return analysis

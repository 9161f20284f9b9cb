"""Channel groups: every coupled set of channels that can shrink together, and where it lives.

`find_groups(graph, shapes)` walks the graph in topological order. Each op type has a rule
(registered once per op in graphopt.analysis.oprules) that reads the `ChannelState` of its inputs, sets those of its outputs,
couples atoms (merges), and records *sites*: the places a pruning engine must rewrite (a weight axis
to slice, a Split's sizes, a Reshape's shape entry, ...). An input that carries channels into an op
without a rule blocks its group, as do graph outputs and tensors read inside subgraphs.

A reduction over the channel axis (a linear consumer, a sum being a row of ones) marks its output as a
*statistic* over those channels, and so is everything computed from it alone; an elementwise op that
broadcasts a statistic back onto the channels it is over normalises over them (a decomposed LayerNorm:
x - mean(x)) and blocks their group, as the normalisation ops do.

The result lists each group (a class of coupled atoms): its size, its sites, whether it is prunable
and, if not, why. Shapes come from a batch-1 shape inference (`shapes`, by tensor name).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.analysis.macs import COUNTED_OPS
from graphopt.analysis.oprules import rule_for
from graphopt.analysis.oprules.quantized import quantized_layers
from graphopt.analysis.registry import opsets_of
from graphopt.analysis.state import Analysis, CostTerm, Group, Site, constant_values
from graphopt.ir import graph as ir

__all__ = ["Analysis", "CostTerm", "Group", "Site", "constant_values", "find_groups", "layers_in_bodies",
           "layers_left_alone", "name_nodes"]


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


def _carry_statistics(node: gs.Node, analysis: Analysis) -> None:
    """What is computed from a statistic over channels (and carries no channels itself) is one too."""
    sources = tuple(dict.fromkeys(source for tensor in node.inputs  # each once, however often combined
                                  for source in analysis.statistics.get(tensor.name, ())))
    if sources:
        for output in node.outputs:
            if analysis.state(output) is None and output.name:
                analysis.statistics.setdefault(output.name, sources)


def find_groups(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> Analysis:
    analysis = Analysis(graph, shapes)
    name_nodes(graph)
    captured = ir.body_reads(graph)
    opsets = opsets_of(graph)
    for node in graph.nodes:
        rule_for(node, opsets).channels(node, analysis)
        _carry_statistics(node, analysis)
    for name in captured:
        state = analysis.states.get(name)
        analysis.block(state, f"tensor '{name}' is read inside a subgraph")
    for output in graph.outputs:
        analysis.block(analysis.state(output), f"graph output '{output.name}'")
    return analysis


def layers_in_bodies(graph: gs.Graph) -> list[str]:
    """One line per main-graph If/Loop/Scan node whose bodies hold layers (Conv, Gemm, MatMul, recurrent and
    attention ops: what MACs count), which the methods, reading the main graph, do not reach."""
    def count(body: gs.Graph) -> int:
        return sum(node.op in COUNTED_OPS for node in body.nodes) + \
            sum(count(inner) for node in body.nodes for inner in node.attrs.values() if isinstance(inner, gs.Graph))

    found = []
    for node in graph.nodes:
        layers = sum(count(body) for body in node.attrs.values() if isinstance(body, gs.Graph))
        if layers:
            found.append(f"{node.name} ({node.op}): {layers} layers inside its bodies are not pruned "
                         "(the methods prune the main graph only)")
    return found


def layers_left_alone(graph: gs.Graph) -> list[str]:
    """What a pass that does not read channel groups (whose blocked groups say it already) reports as out of its
    reach: the layers inside If/Loop/Scan bodies and every quantized layer, one line each."""
    return layers_in_bodies(graph) + quantized_layers(graph)

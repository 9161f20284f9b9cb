"""One-shot magnitude pruning (OMP) of weights, then dead-unit elimination so the network shrinks.

Layers: Conv, ConvTranspose, Gemm and MatMul nodes whose weight (input 1) is a float constant read by
that node alone. With `sparsity` S, the round(S * n) weights of smallest |w| become 0 — over all
layers at once (`omp_scope="global"`, the IUNET/lottery-ticket setting) or within each layer
(`omp_scope="layer"`). Weights already zero are the smallest, so a second run at the same S changes
nothing. `keep_first_last` spares the first layers (no weighted layer upstream of them) and the last
(none downstream), which also leaves them out of the global count. Zeroing is not exact (it is the
method); the dead-unit elimination that follows (graphopt.passes.sparse.dead_units) is, so the pruned graph
and the smaller one compute the same function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import layers_left_alone, name_nodes
from graphopt.errors import OptionError
from graphopt.ir import graph as ir
from graphopt.ir.sparse import WEIGHTED_OPS
from graphopt.passes.base import CHANGES_CHANNELS, READS_FOLDED_WEIGHTS, Pass, PassContext, PassResult, register
from graphopt.passes.sparse.dead_units import eliminate
from graphopt.passes.methods import Method, Options, option, register_method

log = logging.getLogger(__name__)


def weighted_layers(graph: gs.Graph, result: PassResult | None = None) -> list[gs.Node]:
    """Nodes with a prunable weight, in graph order; shared or non-float weights are declined."""
    layers = []
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        weight = node.inputs[1]
        if np.asarray(weight.values).dtype.kind != "f":
            reason = "weight is not floating point"
        elif len(weight.outputs) > 1 or ir.is_graph_io(graph, weight):
            reason = f"weight '{weight.name}' is shared or a graph input"
        else:
            layers.append(node)
            continue
        if result is not None:
            result.skipped.append(f"{node.name}: {reason}, left dense")
    return layers


def boundary_layers(graph: gs.Graph, layers: list[gs.Node]) -> set[str]:
    """Names of first layers (no weighted layer upstream) and last layers (none downstream)."""
    weighted = {node.name for node in layers}
    ir.cleanup(graph)  # topological order

    def reached(nodes: list[gs.Node], sources: Callable, sinks: Callable) -> set[str]:
        behind: dict[str, bool] = {}  # tensor name -> a weighted layer lies behind it
        unreached = set()
        for node in nodes:
            seen = any(behind.get(t.name, False) for t in sources(node))
            if node.name in weighted and not seen:
                unreached.add(node.name)
            for tensor in sinks(node):
                behind[tensor.name] = behind.get(tensor.name, False) or seen or node.name in weighted
        return unreached

    first = reached(graph.nodes, lambda n: n.inputs, lambda n: n.outputs)
    last = reached(list(reversed(graph.nodes)), lambda n: n.outputs, lambda n: n.inputs)
    return first | last


def magnitude_masks(weights: dict[str, np.ndarray], sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """Boolean keep-masks zeroing the round(sparsity * n) smallest |w| (globally or per layer)."""
    if scope == "layer":
        return {name: magnitude_masks({name: w}, sparsity, "global")[name] for name, w in weights.items()}
    magnitudes = np.concatenate([np.abs(w).reshape(-1).astype(np.float64) for w in weights.values()]) \
        if weights else np.zeros(0)
    count = int(round(sparsity * magnitudes.size))
    keep = np.ones(magnitudes.size, dtype=bool)
    if count > 0:
        keep[np.argpartition(magnitudes, count - 1, kind="introselect")[:count]] = False
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset:offset + w.size].reshape(w.shape)
        offset += w.size
    return masks


def sparsity_of(arrays: list[np.ndarray]) -> float:
    total = sum(a.size for a in arrays)
    return sum(a.size - np.count_nonzero(a) for a in arrays) / total if total else 0.0


@register
class OneShotMagnitudePruning(Pass):
    name = "omp"
    kind = "method"
    through_quantized = True
    description = "one-shot magnitude pruning of Conv/Gemm/MatMul weights, then dead-unit elimination"
    # |w| judges a weight only once BatchNorm's scale is folded in; the dead-unit step needs what dead-units does
    requires = READS_FOLDED_WEIGHTS
    preserves = CHANGES_CHANNELS

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        sparsity = ctx.option("sparsity")
        if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
            raise OptionError(f"--method omp needs --sparsity in [0, 1), got {sparsity}")
        scope = ctx.option("omp_scope", "global")
        if scope not in ("global", "layer"):
            raise OptionError(f"--omp-scope must be global or layer, got {scope}")
        result = PassResult(modified=False)
        ir.cleanup(graph)
        name_nodes(graph)  # masks and the report are keyed by node name
        layers = weighted_layers(graph, result)
        spared = boundary_layers(graph, layers) if ctx.option("keep_first_last", False) else set()
        result.skipped.extend(f"{name}: first or last layer, spared (--keep-first-last)" for name in sorted(spared))
        result.skipped.extend(layers_left_alone(graph))
        pruned = [node for node in layers if node.name not in spared]
        weights = {node.name: np.asarray(node.inputs[1].values) for node in pruned}
        masks = magnitude_masks(weights, float(sparsity), scope)
        zeroed = 0
        for node in pruned:
            weight = weights[node.name]
            newly = int(np.count_nonzero(weight[~masks[node.name]]))
            if newly:
                ir.set_input_array(graph, node, 1, np.where(masks[node.name], weight, 0).astype(weight.dtype))
                zeroed += newly
        result.modified = zeroed > 0
        result.stats = {"layers": len(layers), "layers_pruned": len(pruned), "weights_zeroed": zeroed,
                        "sparsity_pruned_layers": sparsity_of([np.asarray(n.inputs[1].values) for n in pruned]),
                        "sparsity_all_layers": sparsity_of([np.asarray(n.inputs[1].values) for n in layers])}
        result.stats.update({f"sparsity:{node.name}": sparsity_of([np.asarray(node.inputs[1].values)])
                             for node in layers})
        _say_already_sparse(weights, zeroed, float(sparsity), result)
        _say_emptied(pruned, weights, masks, scope, result)
        eliminate(graph, ctx, result)
        return result


def _say_already_sparse(weights: dict[str, np.ndarray], zeroed: int, sparsity: float, result: PassResult) -> None:
    """Why nothing was zeroed where every weight the masks drop is zero already: the layers hold at least the
    zeros asked (a mel filterbank is mostly zeros)."""
    if weights and not zeroed and sparsity > 0:
        already = sparsity_of(list(weights.values()))
        result.skipped.append(f"the {len(weights)} pruned layer(s) are already {already:.1%} zeros, at least the "
                              f"--sparsity {sparsity:g} asked: nothing to zero")


def _say_emptied(pruned: list[gs.Node], weights: dict[str, np.ndarray], masks: dict[str, np.ndarray], scope: str,
                 result: PassResult) -> None:
    """Name each layer that had nonzero weights and has none left: its output no longer depends on its input,
    so everything upstream of it goes dead (under the global scope, a layer whose weights are all smaller than
    the other layers' goes whole: a mel filterbank of values near 0.01 beside convolutions of values near 1)."""
    emptied = [node.name for node in pruned if np.any(weights[node.name]) and not np.any(masks[node.name])]
    result.stats["layers_emptied"] = len(emptied)
    if emptied:
        hint = " (--omp-scope layer prunes each layer by its own magnitudes)" if scope == "global" else ""
        message = (f"every weight of {len(emptied)} layer(s) zeroed: {', '.join(emptied[:5])}"
                   f"{' ...' if len(emptied) > 5 else ''}; their outputs no longer depend on their inputs{hint}")
        result.skipped.append(message)
        log.warning("omp: %s", message)


@dataclass
class OmpOptions(Options):
    sparsity: float | None = option(None, help="omp: fraction of weights to zero")
    omp_scope: str = option("global", choices=("global", "layer"),
                            help="omp: one magnitude threshold over all layers, or the same sparsity in each")
    keep_first_last: bool = option(False, help="omp: leave the first and last weighted layers dense")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity is None or not 0.0 <= float(self.sparsity) < 1.0:
            raise OptionError(f"--method omp needs --sparsity in [0, 1), got {self.sparsity}")


OMP = register_method(Method(OneShotMagnitudePruning.name, OneShotMagnitudePruning.description, needs_data=False,
                             passes=(OneShotMagnitudePruning.name,), options=OmpOptions))

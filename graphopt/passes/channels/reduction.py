"""A ReduceSum or ReduceMean over the channel axis as the linear consumer it is.

Over n features on the channel axis c, a sum is Σ_i 1·x_i and a mean Σ_i (1/n)·x_i: a row of weights
(`weights`) applied to the channels and summed. `as_linear` writes that row into the graph: a Mul by
a constant of shape [1, n, 1, ...] (n aligned with axis c) in front of the reduction, which becomes (or
stays) a ReduceSum over the same axis. That computes the same values up to floating-point rounding, and
the constant is a consumer weight like a Conv's: pruning slices it, SNP folds a reconstruction into it
(W[:, K] += W[:, P] C with W the one-row weight), and the constant part of the reconstruction is added
to the reduction's output (`reader` finds it). A Mul is elementwise, so the MAC count does not change.

Removing channels from a ReduceSum needs no rewrite (it sums the kept ones, which is what the sliced
row of ones computes); a ReduceMean must still divide by the original n, so it gets its row of 1/n
before its channels go.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Site
from graphopt.ir import graph as ir

REDUCTIONS = ("ReduceSum", "ReduceMean")


def weights(site: Site, features: int) -> np.ndarray:
    """The row of weights (float64) the reduction of `site` applies to its `features` inputs."""
    return np.full(features, 1.0 / features if site.node.op == "ReduceMean" else 1.0)


def _float_dtype(tensor: gs.Tensor) -> np.dtype:
    dtype = tensor.dtype
    if isinstance(dtype, (type, np.dtype)) and np.dtype(dtype).kind == "f":
        return np.dtype(dtype)
    return np.dtype(np.float32)


def _row_shape(features: int, axis: int, rank: int) -> tuple[int, ...]:
    """[1, n, 1, ...]: n broadcasts onto `axis` of a rank-`rank` tensor (axis >= 1)."""
    return (1, features) + (1,) * (rank - 1 - axis)


def _existing_row(node: gs.Node, shape: tuple[int, ...]) -> gs.Node | None:
    """The Mul by a constant row of `shape` that only this reduction reads (written by an earlier rewrite)."""
    tensor = node.inputs[0]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Mul" or len(tensor.outputs) != 1 or len(producer.inputs) != 2:
        return None
    row = producer.inputs[1]
    return producer if isinstance(row, gs.Constant) and tuple(row.shape) == shape else None


def _as_sum(graph: gs.Graph, node: gs.Node) -> None:
    """Make a ReduceMean the ReduceSum over the same axes (its row of 1/n does the dividing)."""
    if node.op != "ReduceMean":
        return
    node.op = "ReduceSum"
    axes = node.attrs.pop("axes", None)
    if axes is not None and graph.opset >= 13:  # ReduceSum reads its axes as an input from opset 13
        constant = gs.Constant(ir.unique_name(graph, f"{node.name}_axes"), np.asarray(axes, dtype=np.int64))
        while len(node.inputs) > 1:  # onnx-graphsurgeon's input list cannot slice-delete
            node.inputs.pop()
        node.inputs.append(constant)
    elif axes is not None:
        node.attrs["axes"] = axes


def as_linear(graph: gs.Graph, analysis: Analysis, site: Site) -> Site:
    """Weight the channels of a "reduce" site's reduction by its row and sum them; return the weight site
    (the Mul's constant, read along axis 1) that reads the same channels."""
    node = site.node
    features = analysis.size(site.state) * site.state.factor
    shape = _row_shape(features, site.axis, analysis.rank(node.inputs[0]))
    multiply = _existing_row(node, shape)
    if multiply is None:
        x = node.inputs[0]
        row = weights(site, features).astype(_float_dtype(x)).reshape(shape)
        weighted = gs.Variable(ir.unique_name(graph, f"{x.name}_weighted"), dtype=x.dtype)
        multiply = gs.Node("Mul", ir.unique_name(graph, f"{node.name}_weights"),
                           inputs=[x, gs.Constant(ir.unique_name(graph, f"{node.name}_weights"), row)],
                           outputs=[weighted])
        graph.nodes.append(multiply)
        node.inputs[0] = weighted
        _as_sum(graph, node)
    return Site("weight", multiply, site.state, index=1, axis=1, role="consumer")


def reader(multiply: gs.Node) -> gs.Node:
    """The reduction that sums what a weighting Mul (`as_linear`) writes."""
    (node,) = multiply.outputs[0].outputs
    return node


def linear_sites(graph: gs.Graph, analysis: Analysis, sites: list[Site], pruned: set[int]) -> list[Site]:
    """`sites` with each "reduce" site that reads a group of `pruned` (roots) turned into its weight site
    (the reduction weighted by `as_linear`, the analysis's site replaced), and the other "reduce" sites
    left out: they read nothing that goes."""
    linear = []
    for site in sites:
        if site.kind != "reduce":
            linear.append(site)
        elif any(analysis.atoms.find(leaf) in pruned for leaf in analysis.atoms.leaves(site.state.atoms)):
            replacement = as_linear(graph, analysis, site)
            analysis.sites[next(i for i, known in enumerate(analysis.sites) if known is site)] = replacement
            linear.append(replacement)
    return linear

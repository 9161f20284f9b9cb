"""The structured pruning engine: given the kept indices of every channel group, rewrite the graph.

For each site recorded by the channel analysis (graphopt.analysis.groups) the engine computes the
kept positions along the site's axis (atoms laid end to end, each atom's kept indices shifted by its
offset, each channel expanded to `factor` features) and rewrites: weight/parameter constants are
sliced (through `set_input_array`, so shared initializers are copied, never edited for one user),
depthwise group counts, Split sizes, Slice bounds, attributes that count channels (an LSTM's hidden_size)
and Reshape shape entries are recomputed (a site whose entries stand for runs of channels, GroupNorm's
groups, by the runs kept), an input that is zero at run time is dropped, and a ReduceMean over the channel
axis becomes the weighted sum it is (graphopt.passes.channels.reduction).
Removing channels whose values are identically zero everywhere they flow is exact; anything else is as
exact as the importance criterion that chose them.

`removal` describes one group's cut for the pruning history of the report (PassResult.history): the
indices removed, in the group's channel numbering before the pass, with their scores and the budget
decision, recorded by each pass where it decides the cut.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import AtomTable, ChannelState
from graphopt.analysis.groups import Analysis, Group, Site
from graphopt.analysis.oprules.reshape import SHAPE_PASSTHROUGH, ShapeOf, shape_entry
from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.passes.channels.reduction import as_linear


def kept_positions(atoms: AtomTable, state: ChannelState, kept: dict[int, np.ndarray]) -> np.ndarray:
    """Positions along a tensor axis that survive, given kept indices per group root."""
    pieces, offset = [], 0
    for leaf in atoms.leaves(state.atoms):
        size = atoms.sizes[leaf]
        root = atoms.find(leaf)
        indices = kept[root] if root in kept else np.arange(size)
        pieces.append(offset + indices)
        offset += size
    channels = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if state.factor == 1:
        return channels
    return (channels[:, None] * state.factor + np.arange(state.factor)[None, :]).reshape(-1)


def _int_array(values: list[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _weight(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    values = np.asarray(site.node.inputs[site.index].values)
    if positions.size != values.shape[site.axis]:
        ir.set_input_array(graph, site.node, site.index, np.take(values, positions, axis=site.axis))


def _group(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    site.node.attrs["group"] = int(positions.size)


def _count(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    site.node.attrs[site.role] = int(positions.size)  # an integer attribute that counts the state's channels


def _split(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    node = site.node
    sizes = _int_array([kept_positions(a.atoms, out, kept).size for out in site.outputs])
    if len(node.inputs) > 1 and node.inputs[1].name:
        ir.set_input_array(graph, node, 1, sizes)
    elif graph.opset >= 13:
        node.attrs.pop("num_outputs", None)
        node.attrs.pop("split", None)
        constant = gs.Constant(ir.unique_name(graph, f"{node.name}_split"), sizes)
        if len(node.inputs) > 1:  # an omitted optional input (empty name) holds the place
            node.inputs[1] = constant
        else:
            node.inputs.append(constant)
    else:
        node.attrs["split"] = [int(s) for s in sizes]


def _slice(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    node, total = site.node, a.size(site.state)
    bounds = []
    for index in (1, 2):
        values = np.asarray(node.inputs[index].values).copy()
        raw = int(values[site.axis])
        bound = min(max(raw + total if raw < 0 else raw, 0), total)
        values[site.axis] = int(np.searchsorted(positions, bound))
        bounds.append(values)
    for index, values in zip((1, 2), bounds):
        ir.set_input_array(graph, node, index, values.astype(np.asarray(node.inputs[index].values).dtype))


def set_target_entry(graph: gs.Graph, node: gs.Node, position: int, value: int, shape_of: ShapeOf, what: str) -> None:
    """Entry `position` of the Reshape target `node` reads becomes `value` (an inferred -1 stays): in the
    constant target, or in the Concat piece that holds it (a one-element piece computed at run time becomes
    the constant), written on a private copy where the Concat is one other reshapes may read too."""
    located = shape_entry(node, position, shape_of, replaceable=True)
    if located is None:
        raise GraphoptError(f"{node.name}: the reshape target entry {what} cannot be rewritten")
    holder, index, element = located
    if holder is not node:
        holder = _private_concat(graph, node)
    piece = holder.inputs[index]
    constant = isinstance(piece, gs.Constant)
    dtype = np.asarray(piece.values).dtype if constant else np.dtype(piece.dtype or np.int64)
    values = np.array(piece.values, dtype=np.int64).reshape(-1) if constant else np.zeros(1, dtype=np.int64)
    if constant and values[element] == -1:
        return
    values[element] = value
    ir.set_input_array(graph, holder, index, (values.reshape(np.shape(piece.values)) if constant else values)
                       .astype(dtype))


def _private_concat(graph: gs.Graph, reader: gs.Node) -> gs.Node:
    """The Concat building `reader`'s target shape (through the Casts tf2onnx puts after it), each node on the
    way copied where others read it too."""
    node = ir.private_producer(graph, reader, 1)
    while node.op in SHAPE_PASSTHROUGH:
        node = ir.private_producer(graph, node, 0)
    return node


def _shape(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    set_target_entry(graph, site.node, site.axis, positions.size, a.shape, "of the channel axis")


def _reduce(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    if site.node.op == "ReduceMean" and positions.size != a.size(site.state) * site.state.factor:
        _weight(graph, as_linear(graph, a, site), a, kept, positions)  # keeps dividing by the full count
    # a ReduceSum of the kept channels is what the sliced row of ones computes: nothing to rewrite


def _empty(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], positions: np.ndarray) -> None:
    if positions.size != a.size(site.state) * site.state.factor:
        site.node.inputs[site.index] = gs.Variable.empty()  # an absent optional input: zero, as it was


_REWRITES = {"weight": _weight, "group": _group, "count": _count, "split": _split, "slice": _slice, "shape": _shape,
             "reduce": _reduce, "empty": _empty}


def _apply(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray]) -> None:
    rewrite = _REWRITES.get(site.kind)
    if rewrite is None:
        raise AssertionError(f"unknown site kind {site.kind}")
    if not any(a.atoms.find(leaf) in kept for leaf in a.atoms.leaves(site.state.atoms)):
        return  # every channel the site sees stays: nothing to rewrite (nor to copy out of shared nodes)
    positions = kept_positions(a.atoms, site.state, kept)
    rewrite(graph, site, a, kept, whole_runs(positions, site.per) if site.per > 1 else positions)


def whole_runs(positions: np.ndarray, run: int) -> np.ndarray:
    """The runs of `run` consecutive positions that `positions` keeps whole (GroupNorm groups), by run index."""
    runs = np.unique(positions // run)
    if runs.size * run != positions.size:
        raise AssertionError(f"kept channels are not whole runs of {run}")
    return runs


def apply_kept(graph: gs.Graph, analysis: Analysis, kept: dict[int, np.ndarray]) -> None:
    """Rewrite every site; `kept` maps group roots to sorted kept indices (absent: keep all)."""
    for site in analysis.sites:
        _apply(graph, site, analysis, kept)


def _plain(value: Any) -> Any:
    """`value` as plain JSON: numpy numbers become ints and floats (6 significant digits), arrays lists."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.6g}")
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def removal(group: Group, by: str, kept: np.ndarray, criterion: str, scores: np.ndarray | None = None,
            **decision: Any) -> dict[str, Any]:
    """History entry: `by` cut `group` to `kept` (indices of its channels); the removed channels with
    their `criterion` scores (per channel of the group; None where there are none) and the decision."""
    removed = np.setdiff1d(np.arange(group.size), np.asarray(kept, dtype=np.int64))
    entry: dict[str, Any] = {"by": by, "group": int(group.root), "size": int(group.size),
                             "members": group.describe()["members"], "kept": int(group.size - removed.size),
                             "removed": _plain(removed), "criterion": criterion}
    if scores is not None:
        entry["scores"] = _plain(np.asarray(scores, dtype=np.float64)[removed])
    entry.update(_plain(decision))
    return entry

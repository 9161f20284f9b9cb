"""Remove whole attention heads from a head block (graphopt.analysis.heads), with reconstruction.

For each consumer y = x W (+ b) of the merged heads, the removed heads' features x_P are first replaced
by their least-squares estimate from the kept ones, x_P ≈ C x_K + c₀ (graphopt.passes.snp.maths, on
the consumer's input statistics), so the consumer's rows become W_K ← W_K + Cᵀ W_P and its bias
b ← b + c₀ᵀ W_P (bias compensation; a bias-free MatMul is fitted without c₀ instead where that costs at most 1%
more error, so that it stays one node: graphopt.passes.snp.maths.intercept_pays). Then every head slice of the block loses the removed
heads' entries (projection columns, biases, per-channel and per-head constants, consumer rows), every
Reshape target entry that counts heads becomes (kept heads) × its per-head size (an Expand's becomes 1:
it broadcasts, keeping the heads it is given), and every attention
op's `num_heads` (and `qkv_hidden_sizes`, or GroupQueryAttention's `kv_num_heads`)
follows. Without statistics (or with reconstruction off) the
heads are simply cut. Exact when the removed heads' consumer rows are zero, or when their features are
affine in the kept heads' on the data the statistics describe.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.heads import HeadBlock, ShapeEntry
from graphopt.analysis.heads.sources import cut_bounds
from graphopt.analysis.oprules.reshape import shape_entry
from graphopt.calibration.stats import TensorStats
from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.passes.channels.consumer_shift import add_bias, bias_costs_a_node
from graphopt.passes.channels.engine import set_target_entry as set_entry
from graphopt.passes.heads.plan import head_positions
from graphopt.passes.snp.maths import consumer_reconstruction


def _reconstruct(graph: gs.Graph, block: HeadBlock, kept: np.ndarray, removed: np.ndarray,
                 stats: dict[str, TensorStats]) -> int:
    """Fold the removed heads' reconstruction into every consumer with statistics; how many were folded."""
    folded = 0
    for consumer in block.consumers:
        if consumer.tensor not in stats:
            continue
        keep_pos, pruned_pos = head_positions(kept, consumer.width), head_positions(removed, consumer.width)
        tensor_stats = stats[consumer.tensor]
        weight = np.asarray(consumer.node.inputs[consumer.index].values)
        rows = np.moveaxis(weight.astype(np.float64), consumer.axis, 0)
        bias_free = rows[pruned_pos].reshape(pruned_pos.size, -1).T if bias_costs_a_node(graph, consumer.node) \
            else None  # a bias-free projection: its fit may go without a constant term, which would cost an Add
        coupling, constant = consumer_reconstruction(tensor_stats.covariance(), tensor_stats.mean, keep_pos,
                                                     pruned_pos, bias_free)
        shift = np.tensordot(constant, rows[pruned_pos], axes=(0, 0))
        rows[keep_pos] += np.tensordot(coupling, rows[pruned_pos], axes=(0, 0))
        ir.set_input_array(graph, consumer.node, consumer.index,
                           np.moveaxis(rows, 0, consumer.axis).astype(weight.dtype))
        if np.any(shift):
            add_bias(graph, consumer.node, shift.reshape(-1) * float(consumer.node.attrs.get("alpha", 1.0)))
        folded += 1
    return folded


def _cut_slices(graph: gs.Graph, block: HeadBlock, removed: np.ndarray) -> None:
    """Drop the removed heads' entries from every sliced constant (all slices of one input at once)."""
    drops: dict[tuple[int, int], tuple[gs.Node, int, int, list[np.ndarray]]] = {}
    for cut in block.slices:
        key = (id(cut.node), cut.index)
        entry = drops.setdefault(key, (cut.node, cut.index, cut.axis, []))
        entry[3].append(cut.offset + head_positions(removed, cut.width))
    for consumer in block.consumers:
        key = (id(consumer.node), consumer.index)
        entry = drops.setdefault(key, (consumer.node, consumer.index, consumer.axis, []))
        entry[3].append(head_positions(removed, consumer.width))
    for node, index, axis, positions in list(drops.values()):
        shift = _shift_after(node, drops) if (index, axis) == (1, 1) else None  # a projection's columns
        if shift is not None:
            drops[(id(shift[0]), shift[1])] = (*shift, positions)
    for node, index, axis, positions in drops.values():
        values = np.asarray(node.inputs[index].values)
        ir.set_input_array(graph, node, index, np.delete(values, np.unique(np.concatenate(positions)), axis=axis))


def _shift_after(node: gs.Node, drops: dict) -> tuple[gs.Node, int, int] | None:
    """(node, input, axis) of the per-column constant Add a bias-free projection got after the head analysis
    (a channel group's reconstruction folded its shift there), so that its columns go with the projection's."""
    if node.op != "MatMul" or len(node.outputs[0].outputs) != 1:
        return None
    add = node.outputs[0].outputs[0]
    columns = np.asarray(node.inputs[1].values).shape[-1] if isinstance(node.inputs[1], gs.Constant) else None
    if add.op != "Add" or columns is None:
        return None
    for index, tensor in enumerate(add.inputs):
        values = np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None
        if values is not None and values.ndim >= 1 and values.shape[-1] == columns and values.size == columns \
                and (id(add), index) not in drops:
            return add, index, values.ndim - 1
    return None


def _cut_packed(graph: gs.Graph, block: HeadBlock, removed: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> None:
    """Move every Split/Slice of a packed projection's output past the removed heads' columns: a Split's
    sizes shrink, a Slice's start and end move left by the removed columns before them."""
    gone: dict[str, tuple[gs.Tensor, list[np.ndarray]]] = {}
    for cut in block.packed:
        gone.setdefault(cut.tensor.name, (cut.tensor, []))[1].append(cut.offset + head_positions(removed, cut.width))
    for tensor, positions in gone.values():
        columns = np.unique(np.concatenate(positions))
        for reader in ir.consumers(tensor):
            bounds = cut_bounds(reader, shapes)  # every reader but shape reads is one (the analysis checked)
            if bounds is None:
                continue
            moved = [(start - np.count_nonzero(columns < start), end - np.count_nonzero(columns < end))
                     for start, end in bounds]
            if reader.op == "Split":
                sizes = np.array([end - start for start, end in moved], dtype=np.int64)
                reader.attrs.pop("num_outputs", None)
                if "split" in reader.attrs or graph.opset < 13:
                    reader.attrs["split"] = [int(size) for size in sizes]
                else:
                    constant = gs.Constant(ir.unique_name(graph, f"{reader.name}_split"), sizes)
                    if len(reader.inputs) > 1:
                        reader.inputs[1] = constant
                    else:
                        reader.inputs.append(constant)
            else:
                for index, value in ((1, moved[0][0]), (2, moved[0][1])):
                    ir.set_input_array(graph, reader, index, np.array([value], dtype=np.int64))


def entry_holder(node: gs.Node, position: int, shapes: dict[str, tuple[int, ...]]) -> tuple[gs.Node, int, int] | None:
    """(node, input, element) holding Reshape target entry `position`: the target itself when constant, or
    the Concat piece that covers it (constant, or a one-element run-time piece to replace)."""
    return shape_entry(node, position, lambda tensor: shapes.get(tensor.name), replaceable=True)


def broadcast_heads(graph: gs.Graph, entry: ShapeEntry, rank: int, value: int = 1) -> None:
    """Make an Expand's target entry `entry.position` `value` (1 for the heads: broadcast, the output keeps the
    input's heads; a group's kept query heads for the axis repeating a key/value head), for any target, computed
    at run time or not: target · (1 − e_p) + value · e_p, on the Expand's own copy."""
    target = entry.node.inputs[1]
    keep = np.ones(rank, dtype=np.int64)
    keep[entry.position] = 0
    if isinstance(target, gs.Constant):
        values = np.asarray(target.values, dtype=np.int64) * keep + value * (1 - keep)
        ir.set_input_array(graph, entry.node, 1, values)
        return
    masked = gs.Variable(ir.unique_name(graph, f"{target.name}_heads_masked"), dtype=target.dtype)
    ones = gs.Variable(ir.unique_name(graph, f"{target.name}_heads"), dtype=target.dtype)
    graph.nodes.append(gs.Node("Mul", ir.unique_name(graph, f"{entry.node.name}_heads_mask"),
                               inputs=[target, gs.Constant(ir.unique_name(graph, "heads_mask"), keep)], outputs=[masked]))
    graph.nodes.append(gs.Node("Add", ir.unique_name(graph, f"{entry.node.name}_heads_one"),
                               inputs=[masked, gs.Constant(ir.unique_name(graph, "heads_one"), value * (1 - keep))],
                               outputs=[ones]))
    entry.node.inputs[1] = ones


def _set_entry(graph: gs.Graph, entry: ShapeEntry, kept: int, heads: int, shapes: dict[str, tuple[int, ...]]) -> None:
    if entry.node.op == "Expand":
        broadcast_heads(graph, entry, len(shapes[entry.node.outputs[0].name]))
        return
    if entry.scaled:
        _scale_entry(graph, entry, kept, heads, shapes)
        return
    set_target_entry(graph, entry.node, entry.position, kept * entry.per_head, shapes, "counting heads")


def _scale_entry(graph: gs.Graph, entry: ShapeEntry, kept: int, heads: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """A target entry computed at run time as the heads times the batch becomes entry x kept / heads (exact: the
    entry is a multiple of the heads), on the Reshape's own copy of the Concat that builds its target."""
    located = entry_holder(entry.node, entry.position, shapes)
    if located is None:
        raise GraphoptError(f"{entry.node.name}: the reshape target entry counting heads cannot be rewritten")
    holder, index, _ = located
    if holder is not entry.node:
        holder = ir.private_producer(graph, entry.node, 1)
    piece = holder.inputs[index]
    grown, scaled = (gs.Variable(ir.unique_name(graph, f"{piece.name}_{what}"), dtype=piece.dtype)
                     for what in ("kept", "heads"))
    for op, source, factor, out in (("Mul", piece, kept, grown), ("Div", grown, heads, scaled)):
        constant = gs.Constant(ir.unique_name(graph, f"{entry.node.name}_{op.lower()}_heads"),
                               np.array([factor], dtype=np.int64))
        graph.nodes.append(gs.Node(op, ir.unique_name(graph, f"{entry.node.name}_{op.lower()}_heads"),
                                   inputs=[source, constant], outputs=[out]))
    holder.inputs[index] = scaled


def set_target_entry(graph: gs.Graph, node: gs.Node, position: int, value: int, shapes: dict[str, tuple[int, ...]],
                     what: str) -> None:
    """Entry `position` of the Reshape target `node` reads becomes `value` (graphopt.passes.channels.engine)."""
    set_entry(graph, node, position, value, lambda tensor: shapes.get(tensor.name), what)


def _set_attributes(block: HeadBlock, kept: int) -> None:
    for node in block.attributes:
        heads = int(node.attrs["num_heads"])
        if block.groups > 1:  # query heads only: the key/value heads stay
            node.attrs["num_heads"] = kept
            continue
        if "kv_num_heads" in node.attrs:  # GroupQueryAttention: `kept` key/value heads, each with its group
            node.attrs["num_heads"] = kept * (heads // int(node.attrs["kv_num_heads"]))
            node.attrs["kv_num_heads"] = kept
            continue
        node.attrs["num_heads"] = kept
        if node.attrs.get("qkv_hidden_sizes"):
            node.attrs["qkv_hidden_sizes"] = [int(s) // heads * kept for s in node.attrs["qkv_hidden_sizes"]]


def cut_heads(graph: gs.Graph, block: HeadBlock, kept: np.ndarray, stats: dict[str, TensorStats],
              shapes: dict[str, tuple[int, ...]], reconstruct: bool = True) -> int:
    """Keep heads `kept` (sorted indices) of `block`; returns how many consumers got a reconstruction."""
    kept = np.asarray(kept)
    removed = np.setdiff1d(np.arange(block.heads), kept)
    if removed.size == 0:
        return 0
    folded = _reconstruct(graph, block, kept, removed, stats) if reconstruct else 0
    _cut_slices(graph, block, removed)
    _cut_packed(graph, block, removed, shapes)
    for entry in block.shapes:
        _set_entry(graph, entry, kept.size, block.heads, shapes)
    for entry in block.group_entries:  # query heads only: each key/value head is repeated for its group's kept heads
        broadcast_heads(graph, entry, len(shapes[entry.node.outputs[0].name]), kept.size // block.groups)
    _set_attributes(block, kept.size)
    return folded

"""Post-norm residual streams opened for rotation: the shortcut of every residual Add becomes a linear layer.

In a post-norm block (BERT, MiniLM) the stream is the LayerNorm's output h, and the block computes
LN(h + f(h)): h is read by the branch f (its q/k/v or FFN input projections) and, unchanged, by the
residual Add. A rotation of h cannot pass the LayerNorm (mean, γ and β are tied to the channels), and
the Add forces the branch's output into the same basis as h. Writing the shortcut as an explicit
MatMul by the identity, LN(h I + f(h)), changes nothing numerically, and makes every stream tensor
pre-norm shaped: each residual sum is written only by linear layers (the shortcut and the branch's
output projection) and read only by the next LayerNorm, which graphopt.passes.cob.centre then centres
and turns into a weightless RMS norm, and each norm's output is read only by linear layers (the branch
and the next shortcut), which take its gain and shift. Every segment between two norms is then a chain
of its own (graphopt.passes.cob.chains) with its own rotation Q_l, and the shortcut's weight becomes
Q_lᵀ diag(γ) C Q_{l+1} (C the centring): the SliceGPT shortcut matrix, which a post-norm model needs
on every residual connection. It costs d_l × d_{l+1} MACs per token and shortcut, so opening pays only
where the stream is then sliced; CoB opens post-norm streams only when it has a budget to spend, and
the budget counts the shortcuts (the target stays a fraction of the MACs of the model the run was given).

The operand opened is the one the branch also reads (the block's input); the branch's own output, read
by the Add alone, is a writer already. The first block of a model without an embedding norm opens the
same way: the embedding sum is its input.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.registry import rank_of
from graphopt.ir import graph as ir
from graphopt.passes.cob.centre import find_stream, layer_norm_of, residual_add
from graphopt.passes.cob.chains import consumer_axis
from graphopt.passes.cob.gains import SHAPE_READERS

FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}


def _linear_reader(node: gs.Node, tensor: gs.Tensor) -> bool:
    """A linear consumer reading `tensor`'s last axis, as CoB's chains take one."""
    rank = rank_of(tensor)
    return rank is not None and consumer_axis(node, tensor, rank - 1, rank) is not None


def _opened_operand(graph: gs.Graph, add: gs.Node) -> int | None:
    """The index of the residual Add's operand that a linear branch reads too (the block input), if exactly
    one: its other readers are linear layers (and shape readers). A pre-norm block's input is read by
    its norm instead, and is left alone."""
    def branched(tensor: gs.Tensor) -> bool:
        others = [r for r in ir.consumers(tensor) if r is not add and r.op not in SHAPE_READERS]
        return bool(others) and all(_linear_reader(r, tensor) for r in others) and not ir.is_graph_io(graph, tensor)

    shared = [index for index, tensor in enumerate(add.inputs) if branched(tensor)]
    return shared[0] if len(shared) == 1 else None


def _shortcut(graph: gs.Graph, add: gs.Node, index: int) -> gs.Node | None:
    """Replace the Add's operand `index` by MatMul(operand, I); None where its width or dtype is unknown."""
    tensor = add.inputs[index]
    dtype = None if tensor.dtype is None else np.dtype(tensor.dtype)
    if tensor.shape is None or not isinstance(tensor.shape[-1], int) or dtype not in FLOATS:
        return None
    width = int(tensor.shape[-1])
    identity = gs.Constant(ir.unique_name(graph, f"{add.name}_shortcut_weight"), np.eye(width, dtype=dtype))
    out = gs.Variable(ir.unique_name(graph, f"{add.name}_shortcut"), dtype=tensor.dtype, shape=tensor.shape)
    node = gs.Node("MatMul", ir.unique_name(graph, f"{add.name}_shortcut_node"), inputs=[tensor, identity],
                   outputs=[out])
    graph.nodes.append(node)
    add.inputs[index] = out
    return node


def _revert(graph: gs.Graph, node: gs.Node) -> None:
    """Put a shortcut's input back into the Add it feeds."""
    ir.replace_uses(graph, node.outputs[0], node.inputs[0])
    ir.detach(node)
    graph.nodes.remove(node)


def _norm_output_rotatable(graph: gs.Graph, norm: gs.Node) -> bool:
    """Whether only linear layers (and shape readers) read a norm's output: its gain folds into them."""
    out = norm.outputs[0]
    return not ir.is_graph_io(graph, out) and all(r.op in SHAPE_READERS or _linear_reader(r, out)
                                                  for r in ir.consumers(out))


def _useful(graph: gs.Graph, node: gs.Node) -> bool:
    """A shortcut pays for itself only as a writer into a rotatable segment (the norm it feeds has linear
    readers only) or as a reader of one (its input is such a norm's output, or another stream tensor)."""
    norm = ir.consumers(ir.consumers(node.outputs[0])[0].outputs[0])[0]
    source = ir.producer(node.inputs[0])
    reads_segment = source is None or source.op != "LayerNormalization" or _norm_output_rotatable(graph, source)
    return _norm_output_rotatable(graph, norm) or reads_segment


def _candidate(graph: gs.Graph, norm: gs.Node) -> tuple[gs.Node, int] | None:
    """(residual Add, operand to open) when `norm` is a post-norm LayerNorm of a residual sum."""
    source = norm.inputs[0]
    add = ir.producer(source)
    if (add is None or not residual_add(add) or not layer_norm_of(norm, source) or len(ir.consumers(source)) != 1
            or find_stream(graph, source) is not None):  # a pre-norm stream centres as it is
        return None
    index = _opened_operand(graph, add)
    return None if index is None or rank_of(add.inputs[index]) != rank_of(source) else (add, index)


def open_post_norms(graph: gs.Graph) -> list[gs.Node]:
    """Write the shortcut of every post-norm residual Add (one read only by a LayerNorm over the last
    axis, as `graphopt.passes.cob.centre` accepts it) as a MatMul by the identity, where the sum can then
    be centred (every other writer linear) and a rotated segment writes or reads it; returns the MatMuls."""
    opened: list[gs.Node] = []
    for norm in [n for n in graph.nodes if n.op == "LayerNormalization"]:
        found = _candidate(graph, norm)
        node = _shortcut(graph, *found) if found is not None else None
        if node is None:
            continue
        if find_stream(graph, norm.inputs[0]) is None:  # the sum cannot be centred (another writer or reader)
            _revert(graph, node)
        else:
            opened.append(node)
    while useless := [node for node in opened if not _useful(graph, node)]:  # reverting one can strand another
        for node in useless:
            _revert(graph, node)
            opened.remove(node)
    if opened:
        graph.toposort()
    return opened

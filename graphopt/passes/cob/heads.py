"""Per-head change of basis through attention's token mixing (value -> output projections).

In multi-head attention the value projection's channels are split into H heads of dh channels,
mixed across tokens and merged back for the output projection:
    V = X Wv (+ bv)  [N, T, H·dh]  -> Reshape [N, T, H, dh] -> Transpose [N, H, T, dh]
    C = A V_h        (A = softmax(Q Kᵀ / √dh) or any left operand that does not read V)
    -> Transpose [N, T, H, dh] -> Reshape [N, T, H·dh] -> MatMul Wo.
The mixing A multiplies V from the left, so it acts identically on every value channel of a head:
for a block-diagonal Q = blockdiag(Q_1, ..., Q_H) (Q_h orthogonal, dh×dh) on the merged channel axis,
A (V Qᵀ)_h = (A V_h) Q_hᵀ, head by head. Hence, with the convention of graphopt.passes.cob.rotation
(producer W' = W Qᵀ on its output columns, i.e. v' = Q v per row; b' = Q b; consumer Wo' = Q Wo on its
input rows) the merged tensor becomes C' = C Qᵀ and C' Wo' = C Wo exactly (in exact arithmetic).

This module only walks the head-split segment of a chain: from a Reshape that splits the channel
axis (the last one) into [H, dh], through Identity/Dropout/Transpose (tracking which axes hold the
head and the head channels), through one mixing MatMul that reads the tracked tensor as its right
operand with the head channels as columns and the head axis as a batch axis, to a Reshape that
merges [H, dh] back into one last axis. Every reader of every tensor on the way must be one of
these; anything else (a nonlinearity, a Softmax over the head channels, reading V as the left
operand, a graph output) makes the chain illegal with the op named. Pruning keeps the same number
of rotated coordinates in every head, so the reshapes stay valid (the channel-group engine couples
the head channels across heads and rewrites the shape constants; graphopt.analysis.oprules.reshape).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir


@dataclass(frozen=True)
class HeadAxes:
    """Where one tensor of the head segment keeps its heads and its per-head channels."""

    head: int
    channel: int


def _dims(tensor: gs.Tensor) -> list[int | str] | None:
    return None if tensor.shape is None else list(tensor.shape)


def head_split(node: gs.Node, tensor: gs.Tensor, axis: int) -> tuple[int, int] | None:
    """(heads, head_dim) when Reshape `node` splits `tensor`'s last (channel) axis into [H, dh]."""
    before, after = _dims(tensor), _dims(node.outputs[0])
    if node.op != "Reshape" or before is None or after is None or axis != len(before) - 1:
        return None
    if len(after) != len(before) + 1 or not all(isinstance(d, int) for d in (before[-1], *after[-2:])):
        return None
    heads, head_dim = after[-2], after[-1]
    return (heads, head_dim) if heads > 1 and heads * head_dim == before[-1] else None


def _merges(node: gs.Node, tensor: gs.Tensor, axes: HeadAxes, heads: int, head_dim: int) -> bool:
    before, after = _dims(tensor), _dims(node.outputs[0])
    if before is None or after is None or len(after) != len(before) - 1:
        return False
    rank = len(before)
    return (axes.head, axes.channel) == (rank - 2, rank - 1) and after[-1] == heads * head_dim


def _mixes(node: gs.Node, tensor: gs.Tensor, axes: HeadAxes) -> tuple[HeadAxes | None, str | None]:
    """A MatMul L @ V with V tracked on the right: head channels must be its columns, heads a batch axis."""
    rank, out_rank = len(_dims(tensor) or []), len(_dims(node.outputs[0]) or [])
    if node.inputs[0] is tensor:
        return None, "reads the head channels as the left operand"
    if rank < 3 or axes.channel != rank - 1 or axes.head >= rank - 2 or out_rank < rank:
        return None, "head channels are not the columns of the right operand"
    shift = out_rank - rank
    return HeadAxes(axes.head + shift, out_rank - 1), None


def _step(node: gs.Node, tensor: gs.Tensor, axes: HeadAxes, tracked: set[str]) -> tuple[HeadAxes | None, str | None]:
    """The head axes of `node`'s output when it commutes with a per-head rotation, else (None, why)."""
    op = node.op
    if op == "Identity" or (op == "Dropout" and node.inputs[0] is tensor
                            and not any(t.outputs for t in node.outputs[1:])):
        return axes, None
    if op == "Transpose" and node.inputs[0] is tensor:
        rank = len(_dims(tensor) or [])
        perm = [int(p) for p in node.attrs.get("perm", range(rank - 1, -1, -1))]
        return HeadAxes(perm.index(axes.head), perm.index(axes.channel)), None
    if op == "MatMul" and len(node.inputs) == 2:
        if node.inputs[0].name in tracked and node.inputs[1].name in tracked:
            return None, "the mixing reads the rotated values on both sides"
        return _mixes(node, tensor, axes)
    if op in ("Relu", "Gelu", "Sigmoid", "Tanh", "Softmax", "Exp", "Erf", "LeakyRelu", "Elu", "Softplus"):
        return None, "elementwise nonlinearity on the heads is not equivariant to rotations"
    return None, "not equivariant to a per-head rotation"


def through_heads(graph: gs.Graph, split: gs.Node, heads: int, head_dim: int) -> list[gs.Tensor] | str:
    """The merged tensors ([..., H·dh], channels last) reached from head-split Reshape `split`, or
    why the segment cannot be rotated per head (naming the offending node)."""
    outputs = {t.name for t in graph.outputs}
    rank = len(_dims(split.outputs[0]) or [])
    pending = [(split.outputs[0], HeadAxes(rank - 2, rank - 1))]
    tracked: set[str] = {split.outputs[0].name}
    merged: list[gs.Tensor] = []
    while pending:
        tensor, axes = pending.pop()
        if tensor.name in outputs:
            return f"{split.name} -> graph output '{tensor.name}'"
        for node in ir.consumers(tensor):
            if node.op == "Reshape" and node.inputs[0] is tensor and _merges(node, tensor, axes, heads, head_dim):
                merged.append(node.outputs[0])
                continue
            next_axes, why = _step(node, tensor, axes, tracked)
            if next_axes is None:
                return f"{split.name} -> {node.name} ({node.op}): {why}"
            if node.outputs[0].name not in tracked:
                tracked.add(node.outputs[0].name)
                pending.append((node.outputs[0], next_axes))
    if not merged:
        return f"{split.name} (Reshape): heads are never merged back"
    return merged

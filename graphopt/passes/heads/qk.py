"""Fewer q/k dimensions per head: a rank-r bilinear approximation of q·kᵀ folded into the q and k projections.

Exact basis: for any invertible A, q kᵀ = (q A)(k A⁻ᵀ)ᵀ. Truncated: with A, B ∈ R^{d×r} folded into each
head's columns of Wq and Wk (and their biases), the head scores q kᵀ become q A Bᵀ kᵀ = q N kᵀ, N of rank r.

Error measure: the scores' mean squared error over pairs of calibration tokens (q from one, k from another,
taken as independent), E[(q (I − N) kᵀ)²] = ‖Σq^{1/2} (I − N) Σk^{1/2}‖²_F, with Σq = E[qᵀq] and Σk = E[kᵀk]
the per-head uncentred second moments (biases are folded in, so the mean is part of q and k) over the
tokens the attention mask keeps. Its minimum over rank-r N (Eckart–Young on G = Σq^{1/2} Σk^{1/2} = U S Vᵀ) is
    N = Σq^{-1/2} U_r S_r V_rᵀ Σk^{-1/2},   A = Σq^{-1/2} U_r S_r^{1/2},   B = Σk^{-1/2} V_r S_r^{1/2},
leaving exactly Σ_{i>r} s_i² of the scores' energy ‖G‖²_F = Σ s_i² = tr(Σq Σk). Only the scores are
approximated; the softmax, the values and everything after see the approximate scores unchanged.

Rank-deficient moments: the inverse square roots are pseudo-inverses, directions with less than
`RANK_FLOOR` of the largest eigenvalue dropped. Then N = Π_q Π_k at r = d (the projectors on the ranges of
Σq and Σk): exact on every q and k in the span the calibration tokens reach, and in particular exact when
keys lie in a subspace of rank ≤ r by construction (their weights' columns span it): truncating to that r
loses nothing. At r = d with full-rank moments the map is exact for all inputs.

Grouped-query attention: a key head's map is shared by its query heads; the query moment Σq is their sum
(the error summed over the query heads that read the key), so each query head gets the same A.

Orthogonal alternative (same R on q and k from a per-head PCA of the keys): exact in the same planted case,
but it ignores where the queries lie; on the test models the bilinear fit keeps more of the scores at the
same r (tests/passes/heads/test_qk.py compares them), so only the bilinear map is built.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.heads.qk import QKBlock, QKSide, WidthEntry
from graphopt.calibration.stats import TensorStats
from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.passes.heads.prune import broadcast_heads, set_target_entry
from graphopt.analysis.heads import ShapeEntry

RANK_FLOOR = 1e-10


def _roots(moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σ^{1/2}, the pseudo-inverse Σ^{+1/2}) of a symmetric positive semi-definite moment."""
    values, vectors = np.linalg.eigh(0.5 * (moment + moment.T))
    values = np.clip(values, 0.0, None)
    kept = values > RANK_FLOOR * max(float(values.max(initial=0.0)), 1e-300)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse = (vectors[:, kept] / np.sqrt(values[kept])) @ vectors[:, kept].T
    return root, inverse


def bilinear_maps(query: np.ndarray, key: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, s): the d×`rank` maps for q and k minimising the scores' error, and all singular values of G."""
    query_root, query_inverse = _roots(query)
    key_root, key_inverse = _roots(key)
    left, singular, right = np.linalg.svd(query_root @ key_root)
    weight = np.sqrt(singular[:rank])
    return query_inverse @ left[:, :rank] * weight, key_inverse @ right[:rank].T * weight, singular


def unit_moments(side: QKSide, stats: TensorStats, units: int, width: int) -> np.ndarray:
    """Per unit, the d×d uncentred second moment of its heads on `side`, summed over a unit's heads."""
    gram = stats.gram() / max(stats.count, 1)
    group = side.heads // units
    moments = np.zeros((units, width, width))
    for head in range(side.heads):
        positions = slice(head * width, (head + 1) * width)
        moments[head // group] += gram[positions, positions]
    return moments


def block_maps(qk: QKBlock, stats: dict[str, TensorStats], rank: int,
               units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, s²) for the `units` (all by default): [U, d, rank] maps and [U, d] singular energies."""
    query = unit_moments(qk.query, stats[qk.query.tensor], qk.units, qk.width)
    key = unit_moments(qk.key, stats[qk.key.tensor], qk.units, qk.width)
    chosen = np.arange(qk.units) if units is None else np.asarray(units)
    found = [bilinear_maps(query[u], key[u], rank) for u in chosen]
    return (np.stack([f[0] for f in found]), np.stack([f[1] for f in found]),
            np.stack([f[2] ** 2 for f in found]))


def _fold_columns(values: np.ndarray, axis: int, width: int, maps: np.ndarray) -> np.ndarray:
    """Each head's `width` columns along `axis` times its unit's map ([units, d, r]; a unit's heads in a row)."""
    moved = np.moveaxis(values.astype(np.float64), axis, -1)
    heads = moved.shape[-1] // width
    if heads % maps.shape[0]:
        raise GraphoptError(f"{heads} heads do not divide into {maps.shape[0]} q/k units")
    per_head = np.repeat(maps, heads // maps.shape[0], axis=0)
    split = moved.reshape(*moved.shape[:-1], heads, width)
    folded = np.einsum("...hd,hdr->...hr", split, per_head)
    folded = folded.reshape(*moved.shape[:-1], heads * maps.shape[2])
    return np.moveaxis(folded, -1, axis).astype(values.dtype)


def _set_width(graph: gs.Graph, entry: WidthEntry, rank: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """The width entry of a Reshape target becomes `rank`; an Expand's becomes 1 (it keeps the input's)."""
    if entry.node.op == "Expand":
        broadcast_heads(graph, ShapeEntry(entry.node, entry.position, 1), len(shapes[entry.node.outputs[0].name]))
        return
    set_target_entry(graph, entry.node, entry.position, rank, shapes, "of the q/k width")


def fold_maps(graph: gs.Graph, qk: QKBlock, query_maps: np.ndarray, key_maps: np.ndarray,
              shapes: dict[str, tuple[int, ...]]) -> None:
    """Fold the per-unit maps into the q and k projections (every column slice: weight, biases) and give every
    width entry on the way to the scores the new width. The maps cover the units still in the graph, in order."""
    rank = query_maps.shape[2]
    for side, maps in ((qk.query, query_maps), (qk.key, key_maps)):
        for cut in side.slices:
            values = np.asarray(cut.node.inputs[cut.index].values)
            ir.set_input_array(graph, cut.node, cut.index, _fold_columns(values, cut.axis, qk.width, maps))
        for entry in side.entries:
            _set_width(graph, entry, rank, shapes)

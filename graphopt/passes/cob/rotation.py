"""Rotations for change-of-basis pruning, and folding them into weights.

PCA: for the Gram G = Σ h hᵀ (uncentred second moments, float64) of one subspace, Q's rows are G's
eigenvectors by decreasing eigenvalue, each signed so its largest-magnitude entry is positive; the
importance of rotated coordinate j is its energy λ_j = q_jᵀ G q_j. A Gram that is already diagonal
(off-diagonals below 1e-6 of the geometric mean of the diagonals) with non-increasing diagonal gives
Q = I, so rotating a rotated model changes nothing.
L1-PCA (greedy rank-1 components of sample rows, graphopt.passes.cob.l1pca) uses `signed` too; its
importance is also energy.
Folding (exact in exact arithmetic; weights are rotated in float64 and cast back to their dtype):
every writer of the group W' = Q W and b' = Q b along the output-channel axis (b also when it is a
constant Add right after the writer; an embedding table's columns), consumers W' = W Qᵀ along the input-channel axis; both are
"apply Q along that axis": W'[..d..] = Σ_c Q[d, c] W[..c..].
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.cob.chains import Chain

DIAGONAL = 1e-6


def signed(rows: np.ndarray) -> np.ndarray:
    """Each row times the sign of its largest-magnitude entry (so that entry is positive)."""
    peak = np.argmax(np.abs(rows), axis=1)
    signs = np.sign(rows[np.arange(rows.shape[0]), peak])
    return rows * np.where(signs == 0, 1.0, signs)[:, None]


def already_diagonal(gram: np.ndarray) -> bool:
    diagonal = np.diag(gram)
    scale = np.sqrt(np.outer(np.abs(diagonal), np.abs(diagonal))) + 1e-300
    off = np.abs(gram - np.diag(diagonal)) / scale
    return bool(np.all(off <= DIAGONAL) and np.all(np.diff(diagonal) <= DIAGONAL * (np.abs(diagonal[:-1]) + 1e-300)))


def pca_basis(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, energies): Q's rows are the principal directions of `gram`, most energy first."""
    if already_diagonal(gram):
        return np.eye(gram.shape[0]), np.diag(gram).copy()
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(-values, kind="stable")
    rotation = signed(vectors[:, order].T)
    return rotation, np.einsum("ij,jk,ik->i", rotation, gram, rotation)


def apply_along(values: np.ndarray, axis: int, rotation: np.ndarray) -> np.ndarray:
    """W'[..d..] = Σ_c Q[d, c] W[..c..] along `axis`, in float64, cast back to W's dtype."""
    rotated = np.tensordot(rotation, values.astype(np.float64), axes=([1], [axis]))
    return np.moveaxis(rotated, 0, axis).astype(values.dtype)


def fold(graph: gs.Graph, chain: Chain, rotation: np.ndarray) -> None:
    """Rotate every writer's outputs (weight and bias) and every consumer's inputs by Q."""
    for writer in chain.writers:  # b' = Q b too, a bias Add right after the producer included
        writer.transform(graph, chain.channels, lambda values, axis: apply_along(values, axis, rotation))
    for consumer, axis in chain.consumers:
        weight = np.asarray(consumer.inputs[1].values)
        ir.set_input_array(graph, consumer, 1, apply_along(weight, axis, rotation))

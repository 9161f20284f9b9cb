"""L1-PCA of sample rows: the orthonormal basis that change-of-basis pruning uses with `--rotation l1pca`.

Rank 1. For sample rows X (n x d), the L1 principal component maximises ||X w||₁ = Σ_i |x_iᵀ w| over unit
w. Since max_w ||X w||₁ = max over sign vectors b ∈ {±1}ⁿ of ||Xᵀ b||₂ with w = Xᵀ b / ||Xᵀ b||₂
(Markopoulos, Karystinos and Pados 2014), the problem is a search over sign vectors:
- up to EXACT_ROWS rows it is solved exactly by enumerating the 2ⁿ⁻¹ sign vectors (b and -b give the
  same w up to sign);
- beyond that, from RESTARTS starting directions (the top eigenvector of XᵀX, the largest-norm row and
  rows drawn with the seed), the fixed-point iteration b = sign(X w), w = Xᵀ b / ||Xᵀ b|| (Kwak 2008)
  alternates with single bit flips (Markopoulos, Kundu, Chamadia and Pados 2017): flipping b_i changes
  ||y||² (y = Xᵀ b) by 4 (||x_i||² - b_i x_iᵀ y), so the best flip is taken while it gains. Both steps
  never decrease ||Xᵀ b||, so the search ends at a sign vector that neither step improves; the restart
  with the largest ||X w||₁ wins. This is a local optimum, not a certified global one.
Further components by greedy deflation: X ← X (I - w wᵀ), then the rank-1 problem again in the complement,
so component k has the largest L1 dispersion orthogonal to components 1..k-1 and the L1 dispersions
decrease. At most COMPONENTS components are searched this way; the directions after them, and those the
sample leaves empty (fewer rows than dimensions, dead channels), are completed by PCA of the Gram projected
onto the complement. A final QR (signs kept) makes the basis orthonormal to rounding.
Cost per subspace of width d with n rows: at most d components x RESTARTS x (`iterations` fixed-point
steps + `iterations` x FLIPS bit flips), each O(n d), plus one O(d³) eigendecomposition per component:
O(d² n (1 + FLIPS) RESTARTS iterations) in the worst case; the fixed-point steps often run to their cap
(19 of 30 on average for 4096 Gaussian rows of width 96, still flipping about ten signs at the end), so wide
subspaces are slow: on all-MiniLM-L6-v2, whose stream segments are 384 wide, CoB took 281 s with L1-PCA
(COMPONENTS searched) against 7 s with PCA (README, CoB benchmarks). COMPONENTS bounds the search: the
leading directions are the ones a cut keeps, and every subspace of the digits benchmarks (at most 128 wide)
is searched whole.
Deterministic for given rows, Gram and seed.
"""

from __future__ import annotations

import numpy as np

from graphopt.passes.cob.rotation import pca_basis, signed

EXACT_ROWS = 12
RESTARTS = 4
FLIPS = 32  # single bit flips per round
ROUNDS = 4  # rounds of fixed-point steps then bit flips
TOLERANCE = 1e-6  # relative growth of ||Xᵀ b|| below which the fixed-point steps stop
COMPONENTS = 128  # components searched by L1; PCA completes the basis beyond them
EMPTY = 1e-10  # a deflated sample with less than this share of the original L1 dispersion is empty


def l1_dispersion(rows: np.ndarray, direction: np.ndarray) -> float:
    """||X w||₁ = Σ_i |x_iᵀ w|."""
    return float(np.abs(rows @ direction).sum())


def exact_component(rows: np.ndarray) -> np.ndarray:
    """The rank-1 L1 principal component of at most EXACT_ROWS rows, by enumerating sign vectors."""
    count = rows.shape[0]
    if count > EXACT_ROWS:
        raise ValueError(f"exact L1-PCA enumerates 2^(n-1) sign vectors: {count} rows is over {EXACT_ROWS}")
    codes = np.arange(2 ** (count - 1))[:, None] >> np.arange(count - 1)[None, :] & 1
    signs = np.concatenate([np.ones((codes.shape[0], 1)), 1.0 - 2.0 * codes], axis=1)
    sums = signs @ rows  # one Xᵀ b per row
    best = sums[int(np.argmax(np.einsum("ij,ij->i", sums, sums)))]
    return best / np.linalg.norm(best)


def _fixed_points(rows: np.ndarray, signs: np.ndarray, iterations: int) -> np.ndarray:
    """Kwak's step B = sign(X Xᵀ B) on every column of `signs` (one per restart) until no column's
    ||Xᵀ b|| grows by more than TOLERANCE of itself."""
    totals = rows.T @ signs
    values = np.linalg.norm(totals, axis=0)
    for _ in range(iterations):
        updated = np.where(rows @ totals >= 0.0, 1.0, -1.0)
        totals = rows.T @ updated
        grown = np.linalg.norm(totals, axis=0)
        signs = updated
        if np.all(grown <= values * (1.0 + TOLERANCE)):
            break
        values = grown
    return signs


def _flip(rows: np.ndarray, norms: np.ndarray, signs: np.ndarray) -> bool:
    """Up to FLIPS single bit flips of `signs` (in place), each the one that gains most; whether any did."""
    total = rows.T @ signs
    for flips in range(FLIPS):
        gain = norms - signs * (rows @ total)  # a quarter of the change in ||Xᵀ b||² when b_i flips
        best = int(np.argmax(gain))
        if 4.0 * gain[best] <= TOLERANCE * (total @ total):
            return flips > 0
        total -= 2.0 * signs[best] * rows[best]
        signs[best] = -signs[best]
    return True


def _starts(rows: np.ndarray, norms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Columns: the top eigenvector of XᵀX, the largest-norm row, and rows drawn with `rng`."""
    _, vectors = np.linalg.eigh(rows.T @ rows)
    chosen = [int(np.argmax(norms))]
    chosen += [int(i) for i in rng.choice(rows.shape[0], size=min(RESTARTS - 2, rows.shape[0]), replace=False)]
    return np.stack([vectors[:, -1]] + [rows[i] for i in chosen if norms[i] > 0.0], axis=1)


def iterative_component(rows: np.ndarray, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """The rank-1 L1 principal component found by fixed-point steps and bit flips, best of RESTARTS."""
    norms = np.einsum("ij,ij->i", rows, rows)
    signs = np.where(rows @ _starts(rows, norms, np.random.default_rng(seed)) >= 0.0, 1.0, -1.0)
    for _ in range(ROUNDS):
        signs = _fixed_points(rows, signs, iterations)
        flipped = [_flip(rows, norms, column) for column in signs.T]  # columns of the array, flipped in place
        if not any(flipped):
            break
    totals = rows.T @ signs
    directions = totals / np.maximum(np.linalg.norm(totals, axis=0), 1e-300)
    return directions[:, int(np.argmax(np.abs(rows @ directions).sum(axis=0)))]


def component(rows: np.ndarray, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """The rank-1 L1 principal component: exact for few rows, iterative beyond."""
    if rows.shape[0] <= EXACT_ROWS:
        return exact_component(rows)
    return iterative_component(rows, iterations, seed)


def _complement(frame: np.ndarray, coords: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`frame` (d x m, orthonormal columns) and `coords` = X frame restricted to the complement of the unit
    `direction` (in frame coordinates): apply the Householder reflection that maps `direction` to a
    multiple of the first axis, then drop that axis."""
    axis = direction.copy()
    axis[0] += 1.0 if direction[0] >= 0.0 else -1.0
    axis /= np.linalg.norm(axis)
    reflect = lambda values: (values - 2.0 * np.outer(values @ axis, axis))[:, 1:]  # noqa: E731
    return reflect(frame), reflect(coords)


def l1pca_basis(rows: np.ndarray, gram: np.ndarray, iterations: int = 30,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Q, energies): Q's rows are the greedy L1 principal components of `rows` (n x d), largest L1
    dispersion first (the first COMPONENTS of them; PCA of the rest after); energies are q_jᵀ G q_j of the
    Gram `gram` (as for PCA)."""
    if rows.shape[0] == 0:
        return pca_basis(gram)
    frame, coords = np.eye(gram.shape[0]), rows.astype(np.float64)
    scale = float(np.abs(coords).sum())
    found: list[np.ndarray] = []
    while frame.shape[1] > 1 and len(found) < COMPONENTS and float(np.abs(coords).sum()) > EMPTY * scale:
        direction = component(coords, iterations, seed + len(found))
        found.append(frame @ direction)
        frame, coords = _complement(frame, coords, direction)
    values, vectors = np.linalg.eigh(frame.T @ gram @ frame)  # what the sample leaves: PCA of the Gram
    basis = np.concatenate([np.stack(found, axis=1) if found else frame[:, :0],
                            frame @ vectors[:, np.argsort(-values, kind="stable")]], axis=1)
    orthonormal, upper = np.linalg.qr(basis)
    rotation = signed((orthonormal * np.where(np.diag(upper) < 0.0, -1.0, 1.0)).T)
    if np.allclose(rotation, np.eye(rotation.shape[0]), atol=1e-9):
        rotation = np.eye(rotation.shape[0])
    return rotation, np.einsum("ij,jk,ik->i", rotation, gram, rotation)

"""The linear algebra of subspace node pruning (SNP), in float64.

Let Σ be the covariance of a layer's units over calibration rows and μ their mean (the Gram of [A; 1]
carries exactly this: regressing on the constant row removes the mean).
- Importance ("unnormalised ZCA"): unit i scores 1 / (Σ⁻¹)ᵢᵢ, the variance left in unit i after
  projecting out every other unit (and the constant). Units are ordered most unique first, applying
  the score recursively (backward elimination): of two duplicate units both score 0 at first, but once
  one is ranked last the other is unique again, so only one of them lands in the prunable tail.
- Orthogonal subspace: the LDLᵀ (Cholesky) factorisation of Σ in that order; Dᵢᵢ is the variance unit
  i adds beyond the units before it. sum(D) is the total unique variance; pruning the tail of the order
  keeps sum(D[:k]) of it.
- Reconstruction: for pruned P and kept K, the least-squares estimate A_P ≈ C A_K + c₀ has
  C = Σ_PK Σ_KK⁻¹ and c₀ = μ_P − C μ_K; it is exact (zero residual) when the pruned units are affine
  functions of the kept ones, including constant units.
- Output criterion: a consumer with weights W sees, after reconstruction, the error
  trace(W_P S W_Pᵀ) with S = Σ_PP − Σ_PK Σ_KK⁻¹ Σ_KP = ((Σ⁻¹)_PP)⁻¹. `output_order` grows P greedily, each
  step adding the unit that raises this error least (block-inverse update, all candidates at once).
A ridge of `RIDGE` times the mean diagonal keeps rank-deficient Σ (duplicate or dead units) solvable.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-8


def regularised(cov: np.ndarray) -> np.ndarray:
    scale = float(np.mean(np.diag(cov))) if cov.size else 0.0
    return cov + np.eye(cov.shape[0]) * RIDGE * max(scale, 1e-30)


def zca_order(cov: np.ndarray) -> np.ndarray:
    """Unit indices from most to least unique, by backward elimination on 1 / (Σ⁻¹)ᵢᵢ.

    The least unique unit is ranked last and removed; removing unit j updates the precision of the
    rest by the Schur complement Q ← Q − Q[:, j] Q[j, :] / Q[j, j] (the precision of the remaining
    units' covariance), and the next least unique unit is found among them. Ties go to the lower index.
    """
    precision = np.linalg.inv(regularised(cov))
    remaining = list(range(cov.shape[0]))
    eliminated: list[int] = []
    while len(remaining) > 1:
        unique = 1.0 / np.maximum(np.diag(precision), 1e-300)
        worst = int(np.argmin(unique))
        column = precision[:, worst].copy()
        precision = precision - np.outer(column, column) / precision[worst, worst]
        precision = np.delete(np.delete(precision, worst, axis=0), worst, axis=1)
        eliminated.append(remaining.pop(worst))
    return np.array(remaining + eliminated[::-1], dtype=np.int64)


def ldl_diagonal(cov: np.ndarray, order: np.ndarray) -> np.ndarray:
    """D of the LDLᵀ factorisation of Σ permuted into `order` (variance each unit adds, in order)."""
    permuted = regularised(cov)[np.ix_(order, order)]
    factor = np.linalg.cholesky(permuted)
    return np.diag(factor) ** 2


def reconstruction(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray,
                   pruned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, c₀) with A_P ≈ C A_K + c₀ in the least-squares sense; C is |P| x |K|."""
    if kept.size == 0:
        return np.zeros((pruned.size, 0)), mean[pruned].copy()
    cov_kk = regularised(cov[np.ix_(kept, kept)])
    coupling = np.linalg.solve(cov_kk, cov[np.ix_(kept, pruned)]).T
    return coupling, mean[pruned] - coupling @ mean[kept]


def output_order(cov: np.ndarray, readout: np.ndarray) -> np.ndarray:
    """Unit indices from most to least important for the consumer error trace(W_P S W_Pᵀ).

    `readout` is WᵀW over the consumer's outputs (units x units). Pruned units are chosen greedily
    (the cheapest first), so the returned order is that choice reversed.
    """
    n = cov.shape[0]
    precision = np.linalg.inv(regularised(cov))
    pruned: list[int] = []
    inverse = np.zeros((0, 0))  # ((Σ⁻¹)_PP)⁻¹
    remaining = list(range(n))
    while len(remaining) > 1:
        candidates = np.array(remaining)
        q_pj = precision[np.ix_(pruned, candidates)]
        u = inverse @ q_pj
        schur = np.diag(precision)[candidates] - np.sum(q_pj * u, axis=0)
        b_pp = readout[np.ix_(pruned, pruned)]
        t_quad = np.sum(u * (b_pp @ u), axis=0)
        t_cross = np.sum(u * readout[np.ix_(pruned, candidates)], axis=0)
        increase = (t_quad - 2.0 * t_cross + np.diag(readout)[candidates]) / np.maximum(schur, 1e-300)
        pick = int(np.argmin(increase))
        j, u_j, s_j = int(candidates[pick]), u[:, pick], float(schur[pick])
        size = len(pruned)
        grown = np.empty((size + 1, size + 1))
        grown[:size, :size] = inverse + np.outer(u_j, u_j) / s_j
        grown[:size, size] = grown[size, :size] = -u_j / s_j
        grown[size, size] = 1.0 / s_j
        inverse = grown
        pruned.append(j)
        remaining.remove(j)
    return np.array(remaining + pruned[::-1], dtype=np.int64)

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
- Error correction: with x the original model's input to a consumer and y the partly pruned model's,
  x ≈ M y + m₀ has M = Σ_xy Σ_yy⁻¹, m₀ = μ_x − M μ_y (`cross_reconstruction`; its ridge pulls towards
  a prior M₀ instead of 0); W M is the least-squares fit of the original pre-activation W x from y.
- Output criterion: a consumer with weights W sees, after reconstruction, the error
  trace(W_P S W_Pᵀ) with S = Σ_PP − Σ_PK Σ_KK⁻¹ Σ_KP = ((Σ⁻¹)_PP)⁻¹. `output_order` grows P greedily, each
  step adding the unit that raises this error least (Schur-complement updates, all candidates at once).
- Runs: a group whose units go in whole runs (GroupNorm's groups) is ordered run by run the same way
  (`run_order`: backward elimination on the runs' conditional covariances), then weighed by the same D.
A ridge of `RIDGE` times the mean diagonal keeps rank-deficient Σ (duplicate or dead units) solvable. When
a group has far more units than calibration rows, Cholesky's rounding (about n² ε ‖Σ‖) can exceed that
ridge; `ldl_diagonal` then retries with a ridge 100 times larger, up to `_MAX_RIDGE`.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-8
INTERCEPT_SLACK = 0.01  # a bias-free consumer's fit drops its constant term where that adds at most 1% error
_BLOCK = 64  # removals per block of `zca_order`
_MAX_RIDGE = 1e-4  # ldl_diagonal raises the ridge up to this where the factorisation fails at RIDGE


def regularised(cov: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    scale = float(np.mean(np.diag(cov))) if cov.size else 0.0
    return cov + np.eye(cov.shape[0]) * ridge * max(scale, 1e-30)


def zca_order(cov: np.ndarray) -> np.ndarray:
    """Unit indices from most to least unique, by backward elimination on 1 / (Σ⁻¹)ᵢᵢ.

    The least unique unit is ranked last and removed; removing unit j updates the precision of the
    rest by the Schur complement Q ← Q − Q[:, j] Q[j, :] / Q[j, j] (the precision of the remaining
    units' covariance), and the next least unique unit is found among them. Ties go to the lower index.
    The updates are applied in blocks (as a pivoted Cholesky factorisation does): within a block of
    `_BLOCK` removals only the diagonal and the removed units' columns are brought up to date, and the
    rest of the precision is updated once per block by one matrix product.
    """
    precision = np.linalg.inv(regularised(cov))
    units = np.arange(cov.shape[0])  # the units of `precision`'s rows, in ascending order
    eliminated: list[int] = []
    while units.size > 1:
        size = units.size
        steps = min(_BLOCK, size - 1)
        diagonal = np.diag(precision).copy()
        columns = np.zeros((size, steps))  # the removed units' up-to-date columns
        pivots = np.ones(steps)
        alive = np.ones(size, dtype=bool)
        for step in range(steps):
            unique = np.where(alive, 1.0 / np.maximum(diagonal, 1e-300), np.inf)
            worst = int(np.argmin(unique))  # the first of equals: the lowest unit
            column = precision[:, worst] - columns[:, :step] @ (columns[worst, :step] / pivots[:step])
            columns[:, step], pivots[step] = column, column[worst]
            diagonal -= column * column / column[worst]
            alive[worst] = False
            eliminated.append(int(units[worst]))
        kept = columns[alive]
        precision = precision[np.ix_(alive, alive)] - kept @ (kept / pivots).T
        units = units[alive]
    return np.array([*units.tolist(), *eliminated[::-1]], dtype=np.int64)


def run_order(cov: np.ndarray, run: int, readout: np.ndarray | None = None) -> np.ndarray:
    """Unit indices, run by run (runs of `run` consecutive units that go whole: GroupNorm's groups), from the
    most to the least important run, by backward elimination: the run whose removal leaves the least error
    given the runs still kept is ranked last, the error being the trace of its conditional covariance
    S = ((Σ⁻¹)_PP)⁻¹, or with a `readout` R (the consumers' WᵀW) trace(S R_PP), the output criterion's. The
    precision of the runs left is then the Schur complement Q_RR − Q_RP Q_PP⁻¹ Q_PR. Units of a run stay in
    index order; ties go to the lower run."""
    count = cov.shape[0] // run
    precision = np.linalg.inv(regularised(cov))
    alive = list(range(count))
    eliminated: list[int] = []
    while len(alive) > 1:
        size = len(alive)
        blocks = precision.reshape(size, run, size, run)[np.arange(size), :, np.arange(size), :]
        conditional = np.linalg.inv(blocks)
        if readout is None:
            errors = np.trace(conditional, axis1=1, axis2=2)
        else:
            units = (np.array(alive)[:, None] * run + np.arange(run))
            reads = readout[units[:, :, None], units[:, None, :]]
            errors = np.einsum("gij,gji->g", conditional, reads)
        worst = int(np.argmin(errors))
        rows = np.arange(worst * run, (worst + 1) * run)
        rest = np.setdiff1d(np.arange(size * run), rows)
        precision = precision[np.ix_(rest, rest)] - precision[np.ix_(rest, rows)] @ (
            conditional[worst] @ precision[np.ix_(rows, rest)])
        eliminated.append(alive.pop(worst))
    runs = np.array([*alive, *eliminated[::-1]], dtype=np.int64)
    return (runs[:, None] * run + np.arange(run)).reshape(-1)


def ldl_diagonal(cov: np.ndarray, order: np.ndarray) -> np.ndarray:
    """D of the LDLᵀ factorisation of Σ permuted into `order` (variance each unit adds, in order)."""
    permuted = cov[np.ix_(order, order)]
    ridge = RIDGE
    while True:
        try:
            return np.diag(np.linalg.cholesky(regularised(permuted, ridge))) ** 2
        except np.linalg.LinAlgError:  # rounding beats the ridge: many more units than rows (rank n << units)
            if ridge >= _MAX_RIDGE:
                raise
            ridge *= 100.0


def reconstruction(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray,
                   pruned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, c₀) with A_P ≈ C A_K + c₀ in the least-squares sense; C is |P| x |K|."""
    if kept.size == 0:
        return np.zeros((pruned.size, 0)), mean[pruned].copy()
    cov_kk = regularised(cov[np.ix_(kept, kept)])
    coupling = np.linalg.solve(cov_kk, cov[np.ix_(kept, pruned)]).T
    return coupling, mean[pruned] - coupling @ mean[kept]


def cross_reconstruction(cross: np.ndarray, cov: np.ndarray, reference_mean: np.ndarray, mean: np.ndarray,
                         prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(M, m₀) with x ≈ M y + m₀ in the least-squares sense over paired rows (x: the original model's
    input to a consumer, y: the pruned model's), ridge-regularised towards `prior` M₀ (zero if None):
    M = (Σ_xy + λ M₀)(Σ_yy + λI)⁻¹, m₀ = μ_x − M μ_y, with λ = `RIDGE` times the mean variance of y.
    M is |x| x |y|. Directions of y the rows do not excite (Σ_yy v = 0, hence Σ_xy v = 0) get
    M v = M₀ v. With y = x_K (nothing upstream changed) this is `reconstruction` with the kept rows the
    identity."""
    if mean.size == 0:
        return np.zeros((reference_mean.size, 0)), reference_mean.copy()
    ridge = RIDGE * max(float(np.mean(np.diag(cov))), 1e-30)
    target = cross if prior is None else cross + ridge * prior
    coupling = np.linalg.solve(cov + ridge * np.eye(cov.shape[0]), target.T).T
    return coupling, reference_mean - coupling @ mean


def output_order(cov: np.ndarray, readout: np.ndarray) -> np.ndarray:
    """Unit indices from most to least important for the consumer error trace(W_P S W_Pᵀ).

    `readout` is WᵀW over the consumer's outputs (units x units). Pruned units are chosen greedily
    (the cheapest first; ties go to the lower index), so the returned order is that choice reversed.
    With Q = Σ⁻¹ and P the units chosen so far, candidate j's least-squares coefficients are
    u_j = (Q_PP)⁻¹ Q_Pj, and adding j to P raises the error by ‖z_j‖² / s_j, where z_j = w_j − W_P u_j is
    what the consumer loses of unit j and s_j = Q_jj − Q_Pjᵀ u_j. Two matrices carry all of it: S, the
    Schur complement of Q after eliminating P (diagonal s), and G with G_ij = z_iᵀ z_j (G = B at first).
    Choosing unit k eliminates it from S (S ← S − S_k S_kᵀ / s_k) and, with r = S_k / s_k and
    g = G_k, updates G ← G − r gᵀ − g rᵀ + G_kk r rᵀ (z_j ← z_j − r_j z_k). As in `zca_order`, within a
    block of `_BLOCK` choices only the diagonals and the chosen rows are brought up to date; the rest
    of S and G is updated once per block by matrix products.
    """
    schur = np.linalg.inv(regularised(cov))
    residual = np.array(readout, dtype=np.float64)
    units = np.arange(cov.shape[0])  # the units of the rows of `schur` and `residual`, in ascending order
    pruned: list[int] = []
    while units.size > 1:
        size, steps = units.size, min(_BLOCK, units.size - 1)
        s_diag, g_diag = np.diag(schur).copy(), np.diag(residual).copy()
        s_rows, pivots = np.zeros((size, steps)), np.ones(steps)  # the chosen units' up-to-date S rows
        r_rows, g_rows, g_kk = np.zeros((size, steps)), np.zeros((size, steps)), np.zeros(steps)
        alive = np.ones(size, dtype=bool)
        for step in range(steps):
            with np.errstate(over="ignore"):  # a unit the others cannot predict (s near 0): an infinite cost
                k = int(np.argmin(np.where(alive, g_diag / np.maximum(s_diag, 1e-300), np.inf)))
            s_row = schur[k] - s_rows[:, :step] @ (s_rows[k, :step] / pivots[:step])
            r, g_old = r_rows[:, :step], g_rows[:, :step]
            g_row = residual[k] - (r @ g_old[k] + g_old @ r[k] - r @ (g_kk[:step] * r[k]))
            ratio = s_row / s_row[k]
            s_rows[:, step], pivots[step] = s_row, s_row[k]
            r_rows[:, step], g_rows[:, step], g_kk[step] = ratio, g_row, g_row[k]
            s_diag -= s_row * ratio
            g_diag -= 2.0 * ratio * g_row - g_row[k] * ratio * ratio
            alive[k] = False
            pruned.append(int(units[k]))
        s_kept, r_kept, g_kept = s_rows[alive], r_rows[alive], g_rows[alive]
        schur = schur[np.ix_(alive, alive)] - s_kept @ (s_kept / pivots).T
        residual = (residual[np.ix_(alive, alive)] - r_kept @ g_kept.T - g_kept @ r_kept.T
                    + (r_kept * g_kk) @ r_kept.T)
        units = units[alive]
    return np.array([*units.tolist(), *pruned[::-1]], dtype=np.int64)


def input_rows(weight: np.ndarray, axis: int) -> np.ndarray:
    """`weight` in float64 as a contiguous (rest, inputs) matrix, inputs along `axis`: one GEMM then updates
    every row (a product on the moved N-d view loops over stacked small matrices)."""
    moved = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, -1)
    return np.ascontiguousarray(moved).reshape(-1, moved.shape[-1])


def from_input_rows(rows: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """`input_rows` back to `weight`'s layout and dtype, with `rows.shape[1]` inputs along `axis`."""
    others = [size for index, size in enumerate(weight.shape) if index != axis % weight.ndim]
    return np.moveaxis(rows.reshape(*others, rows.shape[1]), -1, axis).astype(weight.dtype)


def without_intercept(cov: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E[x xᵀ], 0) from (Σ, μ): the least-squares fits on these have no constant term, for a consumer whose
    bias would cost a node of its own (graphopt.passes.channels.consumer_shift.bias_costs_a_node)."""
    return cov + np.outer(mean, mean), np.zeros_like(mean)


def intercept_pays(with_constant: float, without: float, scale: float) -> bool:
    """Whether a fit keeps its constant term (and a bias-free consumer an Add for it): where dropping it leaves
    more than INTERCEPT_SLACK more error, which keeps every fit that is exact only with it (constant units,
    affine relations) exact. Errors within 10 ridges of the consumer's output energy `scale` count as none:
    where both fits are exact up to the ridge (duplicates, dead units) the constant term goes."""
    return without - with_constant > INTERCEPT_SLACK * with_constant + 10.0 * RIDGE * scale


def bare_fit(cross: np.ndarray, inputs: np.ndarray, inputs_mean: np.ndarray, prior: np.ndarray | None = None
             ) -> tuple[np.ndarray, float]:
    """(M, E[u²]): the least-squares fit x ≈ M y with no constant term, on second moments (`cross` E[x yᵀ],
    `inputs` E[y yᵀ]; ridge-regularised towards `prior` as `cross_reconstruction`), and what the constant
    leaves after its own fit on y, E[u²] = 1 − μ_yᵀ E[y yᵀ]⁻¹ μ_y, from the same solve."""
    if inputs_mean.size == 0:
        return np.zeros((cross.shape[0], 0)), 1.0
    ridge = RIDGE * max(float(np.mean(np.diag(inputs))), 1e-30)
    target = cross if prior is None else cross + ridge * prior
    solved = np.linalg.solve(inputs + ridge * np.eye(inputs.shape[0]), np.column_stack([target.T, inputs_mean]))
    return solved[:, :-1].T, float(1.0 - inputs_mean @ solved[:, -1])


def constant_pays(rows: np.ndarray, target_mean: np.ndarray, target_second: np.ndarray, coupling: np.ndarray,
                  cross: np.ndarray, inputs_mean: np.ndarray, spare: float) -> bool:
    """`intercept_pays` for a consumer with weights `rows` (outputs x features of x) over x ≈ M y, given the fit
    without a constant (`coupling` M, `cross` E[x yᵀ], `spare` E[u²] from `bare_fit`) and x's mean and second
    moments' diagonal (`target_second`). The constant term saves exactly ‖W (μ_x − M μ_y)‖² / E[u²] of output
    error (least squares); the error left without it is estimated from the diagonal,
    Σ_j ‖w_j‖² (E[x_j²] − Σ_k M_jk E[x_j y_k]), which costs O(outputs · features) where the exact trace would
    cost a features² product per output."""
    shortfall = rows @ (target_mean - coupling @ inputs_mean)
    saved = float(shortfall @ shortfall) / max(spare, 1e-12)
    weights = np.einsum("ij,ij->j", rows, rows)
    without = float(weights @ (target_second - np.einsum("jk,jk->j", coupling, cross)))
    return intercept_pays(max(without - saved, 0.0), without, float(weights @ target_second))


def consumer_reconstruction(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray, pruned: np.ndarray,
                            bias_free_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`reconstruction` (C, c₀) for one consumer. With `bias_free_rows`, the weights (outputs x |P|) of a
    consumer whose constant term would cost a node of its own, the fit without one (c₀ = 0, from the same
    solve that decides) where `constant_pays` says the constant is not worth it."""
    if bias_free_rows is not None:
        second, _ = without_intercept(cov, mean)
        cross = second[np.ix_(pruned, kept)]
        coupling, spare = bare_fit(cross, second[np.ix_(kept, kept)], mean[kept])
        if not constant_pays(bias_free_rows, mean[pruned], np.diag(second)[pruned], coupling, cross, mean[kept],
                             spare):
            return coupling, np.zeros(pruned.size)
    return reconstruction(cov, mean, kept, pruned)

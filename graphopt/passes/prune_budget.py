"""Global channel budget: how many channels each group keeps to reach a MAC target.

MACs of every Conv/ConvTranspose/Gemm/MatMul are bilinear in the kept fractions of its input and
output channel axes, so with k_g channels kept in group g the model's MACs are, exactly,
    MACs(k) = fixed + sum_nodes base_n * prod_{axes of n} (sum_g m_{a,g} k_g) / (sum_g m_{a,g} size_g)
where m_{a,g} counts how often group g's atoms appear along axis a. Importance scores are normalised
by their group mean so groups compare; one global threshold t keeps, in every prunable group, the
channels scoring >= t (at least one, rounded up to a multiple of `round_to`). The smallest t whose
MACs do not exceed the target is found by bisection over the sorted scores (MACs fall as t rises).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.analysis.groups import Analysis


@dataclass
class _Axis:
    weights: dict[int, float]   # root -> multiplicity * factor
    fixed: float                 # features from atoms whose group is not pruned
    total: float


def _axes(analysis: Analysis, prunable: set[int]) -> list[tuple[float, list[_Axis]]]:
    atoms = analysis.atoms
    terms = []
    for term in analysis.costs:
        axes = []
        for state in term.states:
            weights: dict[int, float] = {}
            fixed = 0.0
            for leaf in atoms.leaves(state.atoms):
                root = atoms.find(leaf)
                if root in prunable:
                    weights[root] = weights.get(root, 0.0) + state.factor
                else:
                    fixed += atoms.sizes[leaf] * state.factor
            total = fixed + sum(w * atoms.sizes[r] for r, w in weights.items())
            axes.append(_Axis(weights, fixed, total))
        terms.append((term.node.name, axes))
    return terms


class MacModel:
    """Exact per-sample MACs as a function of the kept channel count per group."""

    def __init__(self, analysis: Analysis, per_node: dict[str, int], prunable: set[int]) -> None:
        self.total = float(sum(per_node.values()))
        terms = _axes(analysis, prunable)
        counted = {name for name, _ in terms}
        self.fixed = float(sum(m for name, m in per_node.items() if name not in counted))
        self.terms = [(float(per_node.get(name, 0)), axes) for name, axes in terms]

    def macs(self, counts: dict[int, int]) -> float:
        result = self.fixed
        for base, axes in self.terms:
            for axis in axes:
                if axis.total:
                    base *= (axis.fixed + sum(w * counts[r] for r, w in axis.weights.items())) / axis.total
            result += base
        return result


def _counts(normalised: dict[int, np.ndarray], threshold: float, round_to: int) -> dict[int, int]:
    counts = {}
    for root, scores in normalised.items():
        keep = max(1, int(np.count_nonzero(scores >= threshold)))
        if round_to > 1:
            keep = min(scores.size, -(-keep // round_to) * round_to)
        counts[root] = keep
    return counts


def choose_counts(scores: dict[int, np.ndarray], model: MacModel, target: float,
                  round_to: int = 1) -> dict[int, int]:
    """Kept channels per group so that MACs come as close to `target` (a fraction) without exceeding it,
    when that is reachable; otherwise the fewest channels the constraints allow."""
    normalised = {r: s / max(float(np.mean(s)), 1e-30) for r, s in scores.items()}
    candidates = np.unique(np.concatenate([s for s in normalised.values()] + [np.zeros(1)]))
    budget = target * model.total
    low, high = 0, candidates.size - 1  # invariant: the answer lies in candidates[low..high]
    if model.macs(_counts(normalised, candidates[high], round_to)) > budget:
        return _counts(normalised, np.inf, round_to)
    while low < high:
        middle = (low + high) // 2
        if model.macs(_counts(normalised, candidates[middle], round_to)) <= budget:
            high = middle
        else:
            low = middle + 1
    return _counts(normalised, candidates[low], round_to)


def top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, in ascending index order (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")[:count]
    return np.sort(order)

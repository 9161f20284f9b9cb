"""L1-PCA for change-of-basis rotations: exact rank-1 search, the iterative search against it, the greedy
basis (orthonormal, deterministic, ordered), and robustness to outliers against PCA."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.cob.l1pca import (EXACT_ROWS, component, exact_component, iterative_component, l1_dispersion,
                                       l1pca_basis)
from graphopt.passes.cob.rotation import pca_basis


def _tiny(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((int(rng.integers(3, EXACT_ROWS + 1)), int(rng.integers(2, 5))))
    rows *= rng.uniform(0.2, 3.0, size=rows.shape[1])
    if seed % 3 == 0:
        rows[:2] *= 10.0  # a couple of outlying rows
    return rows


def test_exact_sign_search_is_the_l1_maximum_over_directions() -> None:
    rows = np.random.default_rng(4).standard_normal((9, 2)) * np.array([2.0, 0.7])
    rows[0] *= 8.0
    angles = np.linspace(0.0, np.pi, 200001)
    grid = np.abs(rows @ np.stack([np.cos(angles), np.sin(angles)])).sum(axis=0)
    best = l1_dispersion(rows, exact_component(rows))
    assert best >= grid.max() - 1e-9 and best == pytest.approx(grid.max(), rel=1e-8)


@pytest.mark.parametrize("seed", range(40))
def test_iterative_search_finds_the_exact_optimum_on_tiny_data(seed: int) -> None:
    rows = _tiny(seed)
    exact = exact_component(rows)
    found = iterative_component(rows, seed=seed)
    assert l1_dispersion(rows, found) == pytest.approx(l1_dispersion(rows, exact), rel=1e-9)
    assert abs(float(found @ exact)) == pytest.approx(1.0, abs=1e-6)


def test_exact_search_refuses_too_many_rows() -> None:
    with pytest.raises(ValueError, match="rows"):
        exact_component(np.ones((EXACT_ROWS + 1, 2)))


def test_basis_is_orthonormal_deterministic_and_ordered_by_l1_dispersion() -> None:
    rng = np.random.default_rng(7)
    rows = rng.laplace(size=(3000, 12)) @ rng.standard_normal((12, 12))
    gram = rows.T @ rows
    rotation, energy = l1pca_basis(rows, gram, seed=3)
    assert np.abs(rotation @ rotation.T - np.eye(12)).max() < 1e-12
    again, _ = l1pca_basis(rows, gram, seed=3)
    np.testing.assert_array_equal(rotation, again)
    np.testing.assert_allclose(energy, np.einsum("ij,jk,ik->i", rotation, gram, rotation))
    dispersions = np.abs(rows @ rotation.T).sum(axis=0)
    assert np.all(np.diff(dispersions) <= 1e-9 * dispersions[0])  # greedy: each later one has less
    # a search from other restarts in the complement of the earlier components finds nothing notably
    # better (the iterative search ends at a local optimum, so not necessarily nothing better at all)
    for index in range(11):
        rest = rotation[index:]
        local = component(rows @ rest.T, seed=100 + index)
        assert l1_dispersion(rows @ rest.T, local) <= dispersions[index] * (1.0 + 1e-4)


def test_exact_greedy_dispersions_decrease_and_sample_gaps_are_completed_by_the_gram() -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((5, 8))  # 5 rows span 5 of 8 dimensions
    gram = rows.T @ rows + np.diag(np.linspace(0.3, 0.1, 8))  # the Gram sees more than the sample
    rotation, energy = l1pca_basis(rows, gram)
    assert np.abs(rotation @ rotation.T - np.eye(8)).max() < 1e-12
    dispersions = np.abs(rows @ rotation.T).sum(axis=0)
    assert np.all(np.diff(dispersions[:5]) <= 1e-12) and np.all(dispersions[5:] < 1e-9)
    assert np.all(np.diff(energy[5:]) <= 1e-12)  # the completion is PCA of what the sample leaves


def test_rotating_rotated_rows_gives_the_identity() -> None:
    rng = np.random.default_rng(5)
    rows = rng.laplace(size=(2000, 8)) @ rng.standard_normal((8, 8))
    rotation, _ = l1pca_basis(rows, rows.T @ rows)
    rotated = rows @ rotation.T
    again, _ = l1pca_basis(rotated, rotated.T @ rotated)
    np.testing.assert_array_equal(again, np.eye(8))


def test_top_component_follows_the_inliers_when_a_few_rows_are_huge_outliers() -> None:
    rng = np.random.default_rng(0)
    inliers = rng.standard_normal((500, 8)) * np.array([3.0, 1.5, 1.0, 1.0, 0.8, 0.6, 0.5, 0.4])
    outliers = np.zeros((5, 8))
    outliers[:, 3] = rng.choice([-1.0, 1.0], 5) * 60.0  # 1% of the rows, far out along axis 3
    rows = np.concatenate([inliers, outliers])
    gram = rows.T @ rows
    pca, _ = pca_basis(gram)
    l1, _ = l1pca_basis(rows, gram)
    inlier_axis = np.eye(8)[0]  # the inliers' principal direction
    assert abs(pca[0] @ inlier_axis) < 0.1  # PCA's top component is the outliers' axis
    assert abs(l1[0] @ inlier_axis) > 0.9
    assert l1_dispersion(rows, l1[0]) >= l1_dispersion(rows, pca[0])


def test_past_the_searched_components_the_basis_is_completed_by_pca(monkeypatch) -> None:
    import graphopt.passes.cob.l1pca as l1pca

    rng = np.random.default_rng(4)
    rows = rng.laplace(size=(400, 6)) @ rng.standard_normal((6, 6))
    gram = rows.T @ rows
    whole, _ = l1pca_basis(rows, gram)
    monkeypatch.setattr(l1pca, "COMPONENTS", 2)
    capped, energy = l1pca_basis(rows, gram)
    assert np.abs(capped @ capped.T - np.eye(6)).max() < 1e-12
    np.testing.assert_array_equal(capped[:2], whole[:2])  # the searched components are the same
    rest = capped[2:]  # then PCA of the complement: energies decrease and the Gram is diagonal there
    assert np.all(np.diff(energy[2:]) <= 1e-9 * energy[2])
    projected = rest @ gram @ rest.T
    assert np.abs(projected - np.diag(np.diag(projected))).max() < 1e-9 * energy[2]


def test_no_rows_falls_back_to_pca() -> None:
    gram = np.diag([1.0, 3.0, 2.0])
    rotation, energy = l1pca_basis(np.zeros((0, 3)), gram)
    expected, expected_energy = pca_basis(gram)
    np.testing.assert_array_equal(rotation, expected)
    np.testing.assert_allclose(energy, expected_energy)

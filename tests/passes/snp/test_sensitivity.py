"""Sensitivity-aware SNP budgets (graphopt/passes/snp/sensitivity.py): probes and the damage allocation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt import api
from graphopt.errors import GraphoptError
from graphopt.passes.snp.plan import Ordering, counts
from graphopt.passes.snp.sensitivity import damage_counts, damage_for_target, probe_count, scales, sensitivities

WIDTH, HIDDEN = 8, 24


def two_branches(loud: float = 10.0, quiet: float = 0.01, seed: int = 0) -> onnx.ModelProto:
    """x -> [MatMul -> Relu -> MatMul -> Mul loud] and [MatMul -> Relu -> MatMul -> Mul quiet] -> Concat: two
    hidden groups alike in their own variance, unlike in what the output sees of them."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for name, gain in (("a", loud), ("b", quiet)):
        inits += [numpy_helper.from_array(rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32), f"{name}1"),
                  numpy_helper.from_array(rng.standard_normal((HIDDEN, 4)).astype(np.float32) / 5, f"{name}2"),
                  numpy_helper.from_array(np.array(gain, np.float32), f"{name}g")]
        nodes += [helper.make_node("MatMul", ["x", f"{name}1"], [f"{name}h"], name=f"{name}_up"),
                  helper.make_node("Relu", [f"{name}h"], [f"{name}r"]),
                  helper.make_node("MatMul", [f"{name}r", f"{name}2"], [f"{name}o"], name=f"{name}_down"),
                  helper.make_node("Mul", [f"{name}o", f"{name}g"], [f"{name}y"])]
    nodes.append(helper.make_node("Concat", ["ay", "by"], ["y"], axis=1))
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", 1, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", 1, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def data(count: int = 256, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, WIDTH)).astype(np.float32)}


def ordering(fractions: list[float]) -> Ordering:
    values = np.array(fractions, dtype=np.float64)
    return Ordering(np.arange(values.size), values / values.sum())


class Macs:
    """A separable fake cost: one MAC per kept unit."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.total = float(sum(sizes.values()))

    def cost(self, counts: dict[int, int]) -> float:
        return float(sum(counts.values()))


def test_uniform_sensitivities_give_the_variance_cut():
    ranked = {0: ordering([5, 3, 1, 1]), 1: ordering([4, 4, 1, 1])}
    for tau in (0.0, 0.1, 0.3, 0.7):
        assert damage_counts(ranked, {0: 1.0, 1: 1.0}, tau, 1) == counts(ranked, 1.0 - tau, 1)


def test_the_sensitive_group_keeps_more_under_the_same_target():
    ranked = {0: ordering([1] * 8), 1: ordering([1] * 8)}
    scale = {0: 100.0, 1: 1.0}
    model = Macs({0: 8, 1: 8})
    tau = damage_for_target(ranked, scale, model, 0.5, 1)
    kept = damage_counts(ranked, scale, tau, 1)
    assert model.cost(kept) <= 0.5 * model.total
    assert kept[0] > kept[1]


def test_probes_cut_at_the_plan_or_deeper_and_measure_per_unit_of_variance():
    ranked = {0: ordering([1] * 10), 1: ordering([98, 1, 1])}
    found = sensitivities(ranked, {0: 5, 1: 3}, lambda root, count: 0.2 if root == 0 else 0.0)
    assert found[0]["probe_count"] == 5 and found[0]["lost_variance"] == pytest.approx(0.5)
    assert found[0]["sensitivity"] == pytest.approx(0.4)
    assert probe_count(ranked[1], 3) == 2  # the plan kept everything: the probe cuts until 1% is lost
    assert scales(found, ranked)[1] > 0.0  # a free cut still ranks, below every group that costs


def test_sensitivity_budget_cuts_where_the_output_does_not_look():
    model, calib = two_branches(), data()
    uniform = graphopt.optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1)
    probed = graphopt.optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1, budget_by="sensitivity")
    for result in (uniform, probed):
        assert result.report["target_reached"]
    kept = {name: {i.name: i.dims for i in result.model.graph.initializer}
            for name, result in (("uniform", uniform), ("probed", probed))}
    assert kept["probed"]["a1"][1] > kept["uniform"]["a1"][1]  # the loud branch keeps more units
    assert kept["probed"]["b1"][1] < kept["uniform"]["b1"][1]
    assert probed.report["fidelity"]["rel_l2"] < uniform.report["fidelity"]["rel_l2"]
    stats = next(p for p in probed.report["passes"] if p["pass"] == "snp")
    assert stats["stats"]["groups_probed"] == 2
    assert all("probe" in entry and "damage_cut" in entry for entry in stats["history"])


def test_sensitivity_budget_needs_calibration_data(tmp_path):
    model = two_branches()
    stats = api.calibrate(model, data(), output=tmp_path / "stats.npz")
    with pytest.raises(GraphoptError, match="--calib"):
        graphopt.optimize(model, method="snp", stats=str(stats.source), target_macs=0.6, budget_by="sensitivity")

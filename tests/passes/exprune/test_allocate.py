"""Per-layer false-negative rates (graphopt/passes/exprune/allocate.py): the hull each layer's curve is read
from, the order of the allocation path, and the pass choosing a certified allocation from it."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.passes.exprune.allocate import Point, allocation_path, upper_hull
from graphopt.passes.exprune.search import GRID
from tests.passes.exprune.test_exprune import _digits_mlp


def test_the_hull_keeps_the_points_worth_moving_to() -> None:
    points = [Point(0.0, 0.0, 10.0), Point(0.01, 1.0, 30.0), Point(0.02, 2.0, 35.0),  # concave so far
              Point(0.05, 2.5, 34.0),   # more error, fewer MACs: dominated
              Point(0.1, 3.0, 60.0),    # lifts the chord: 0.02 falls below it
              Point(0.2, 6.0, 61.0)]
    hull = upper_hull(points)
    assert [p.rate for p in hull] == [0.0, 0.01, 0.1, 0.2]
    gains = [(b.skipped - a.skipped) / (b.error - a.error) for a, b in zip(hull, hull[1:])]
    assert gains == sorted(gains, reverse=True)  # each move buys less than the one before


def test_the_path_moves_the_layer_with_the_best_ratio_first() -> None:
    cheap = [Point(0.0, 0.0, 0.0), Point(0.01, 0.1, 50.0), Point(0.1, 1.0, 60.0)]    # 500 then 11 per unit
    costly = [Point(0.0, 0.0, 0.0), Point(0.01, 1.0, 40.0), Point(0.1, 2.0, 70.0)]   # 40 then 30 per unit
    path = allocation_path([cheap, costly])
    assert [tuple(rate for rate, _ in step) for step in path] == [(0.0, 0.0), (0.01, 0.0), (0.01, 0.01), (0.01, 0.1),
                                                                  (0.1, 0.1)]


def test_each_layer_takes_the_rule_whose_points_lie_on_its_hull() -> None:
    """Under --exprune-rule auto a layer's curve holds both rules' points: the hull mixes them, and each step
    names the rule its rate is taken with."""
    first = [Point(0.0, 0.0, 10.0, "threshold"), Point(0.01, 1.0, 30.0, "threshold"),
             Point(0.1, 3.0, 50.0, "threshold"), Point(0.0, 0.0, 8.0, "sequential"),
             Point(0.01, 0.5, 31.0, "sequential"), Point(0.1, 4.0, 45.0, "sequential")]
    hull = upper_hull(first)
    assert [p.key for p in hull] == [(0.0, "threshold"), (0.01, "sequential"), (0.1, "threshold")]
    path = allocation_path([first])
    assert path == [((0.0, "threshold"),), ((0.01, "sequential"),), ((0.1, "threshold"),)]


def test_the_pass_certifies_a_per_layer_allocation_on_the_held_out_samples(tmp_path) -> None:
    model, feeds = _digits_mlp(tmp_path, samples=1600)
    layered = graphopt.optimize(model, method="exprune", calib=feeds, exprune_layers="all")
    uniform = graphopt.optimize(model, method="exprune", calib=feeds, exprune_allocation="uniform",
                                exprune_layers="all")
    stats, one_rate = (r.report["passes"][-1]["stats"] for r in (layered, uniform))
    assert stats["allocation"] == "layers" and one_rate["allocation"] == "uniform"
    assert one_rate["steps"] == len(GRID) and stats["steps"] > len(GRID)  # finer steps than the grid
    assert stats["held_out_top1_lower_bound"] >= 0.99 and stats["rejected_top1_lower_bound"] < 0.99
    rates = [v for k, v in stats.items() if k.endswith(".fnr")]
    assert len(rates) == 2 and stats["fnr_level"] >= max(rates) - 1e-12  # the level reported is the largest rate
    # the same tolerance, certified the same way, and more of the held-out MACs skipped than with one rate
    assert stats["held_out_macs_skipped_fraction"] >= one_rate["held_out_macs_skipped_fraction"]


def test_auto_takes_each_layers_rule_with_its_rate(tmp_path) -> None:
    """--exprune-rule auto: at a fixed rate each layer takes the rule (and probe) that skips the most of its MACs,
    so it skips what the better single rule skips, layer by layer; under the tolerance search each layer's rule
    comes with its rate, and the model keeps the certified tolerance."""
    model, feeds = _digits_mlp(tmp_path, samples=1600)
    fixed = {rule: graphopt.optimize(model, method="exprune", calib=feeds, exprune_layers="all", exprune_fnr=0.1,
                                     exprune_rule=rule).report["passes"][-1]["stats"]
             for rule in ("threshold", "sequential", "auto")}
    layers = sorted(k[:-len(".macs_skipped")] for k in fixed["auto"] if k.endswith(".macs_skipped"))
    assert len(layers) == 2
    for layer in layers:
        better = max(("threshold", "sequential"), key=lambda rule: fixed[rule][f"{layer}.macs_skipped"])
        assert fixed["auto"][f"{layer}.macs_skipped"] == pytest.approx(fixed[better][f"{layer}.macs_skipped"])
        assert fixed["auto"][f"{layer}.rule"] == fixed[better][f"{layer}.rule"]
    searched = graphopt.optimize(model, method="exprune", calib=feeds, exprune_layers="all", exprune_rule="auto",
                                 exprune_dense_rows=0)  # the ops in the graph itself, not in a row dispatch
    stats = searched.report["passes"][-1]["stats"]
    assert stats["allocation"] == "layers" and stats["held_out_top1_lower_bound"] >= 0.99
    assert {stats[f"{layer}.rule"] for layer in layers} <= {"threshold", "sequential"}
    nodes = [n for n in searched.model.graph.node if n.op_type.startswith("ExPrune")]
    assert len(nodes) == 2
    for node in nodes:  # the op's rule attribute is the layer's
        rule = next(a.s.decode() for a in node.attribute if a.name == "rule")
        checkpoints = next(list(a.ints) for a in node.attribute if a.name == "checkpoints")
        assert rule == ("threshold" if len(checkpoints) == 1 else "sequential")


def test_auto_on_a_layer_too_narrow_for_a_second_checkpoint(tmp_path) -> None:
    """A layer of two inputs has one checkpoint at any probe: its sequential rule is the threshold rule, and the
    per-layer curves under auto take that layer's threshold points for both."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((2, 16)), "b1": rng.standard_normal(16) * 0.1,
               "w2": rng.standard_normal((16, 32)), "b2": rng.standard_normal(32) * 0.1,
               "w3": rng.standard_normal((32, 4))}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="narrow"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="wide"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"), helper.make_node("MatMul", ["r2", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "narrow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((1600, 2)).astype(np.float32)}
    result = graphopt.optimize(model, method="exprune", calib=feeds, exprune_layers="all", exprune_rule="auto",
                               tolerance="rel_l2=0.5", exprune_dense_rows=0)
    stats = result.report["passes"][-1]["stats"]
    assert stats["allocation"] == "layers"
    assert stats["narrow.checkpoints"] == 1 and stats["narrow.rule"] == "threshold"
    assert stats["wide.rule"] in ("threshold", "sequential")

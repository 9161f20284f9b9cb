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
    found = sensitivities(ranked, {0: 5, 1: 3}, lambda root, count: {"output_error": 0.2 if root == 0 else 0.0})
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


def test_unmoved_metric_ties_break_by_output_error_below_every_moved_group():
    ranked = {root: ordering([1] * 4) for root in range(4)}
    found = {0: {"lost_variance": 0.5, "output_error": 0.1, "metric_change": 0.2, "sensitivity": 0.4},
             1: {"lost_variance": 0.5, "output_error": 0.3, "metric_change": 0.05, "sensitivity": 0.1},
             2: {"lost_variance": 0.5, "output_error": 0.04, "metric_change": 0.0, "sensitivity": 0.0},
             3: {"lost_variance": 0.25, "output_error": 0.01, "metric_change": 0.0, "sensitivity": 0.0}}
    scale = scales(found, ranked)
    assert scale[0] == pytest.approx(0.4) and scale[1] == pytest.approx(0.1)  # the metric ranks what it saw
    assert scale[2] == pytest.approx(0.1)  # the most output-sensitive unmoved group weighs the least moved one
    assert scale[3] == pytest.approx(0.1 * 0.04 / 0.08)
    unmoved = {root: {**entry, "metric_change": 0.0, "sensitivity": 0.0} for root, entry in found.items()}
    by_output = scales(unmoved, ranked)  # nothing moved the metric: the output error decides alone
    assert by_output[1] == pytest.approx(0.6) and by_output[3] == pytest.approx(0.04)


def two_outputs(loud: float = 1000.0) -> onnx.ModelProto:
    """two_branches with each branch its own output and the loud one scaled up (pixels beside scores)."""
    model = two_branches(loud=loud, quiet=1.0)
    graph = model.graph
    del graph.node[-1]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("ay", 1, ["N", 4]), helper.make_tensor_value_info("by", 1, ["N", 4])])
    return model


def test_probe_weighs_each_output_alike_whatever_its_scale():
    from graphopt.calibration.data import load_data
    from graphopt.calibration.probe import OutputProbe

    model = two_outputs()
    probe = OutputProbe(model, load_data(data(64), model), samples=64)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    init = next(i for i in broken.graph.initializer if i.name == "b2")
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), "b2"))
    # the quiet output zeroed: its relative error is 1, the loud one's 0; pooled energies would report ~1e-6
    assert probe.measure(broken)["output_error"] == pytest.approx(0.5)
    assert probe.measure(model)["output_error"] == 0.0


def quiet_branch_error(reference, candidate, inputs):
    """A user's metric that looks only at the quiet branch of two_branches' output."""
    return {"quiet_rel": float(np.linalg.norm(candidate["y"][:, 4:] - reference["y"][:, 4:])
                               / np.linalg.norm(reference["y"][:, 4:])), "samples": float(len(inputs["x"]))}


def test_a_users_metric_decides_what_the_probes_protect():
    model, calib = two_branches(), data()
    options = {"method": "snp", "calib": calib, "target_macs": 0.6, "round_to": 1, "budget_by": "sensitivity"}
    default = graphopt.optimize(model, **options)
    by_metric = graphopt.optimize(model, metric=quiet_branch_error, probe_key="quiet_rel", **options)
    width = {name: {i.name: i.dims[1] for i in result.model.graph.initializer if i.name in ("a1", "b1")}
             for name, result in (("default", default), ("metric", by_metric))}
    assert width["metric"]["b1"] > width["default"]["b1"]  # the branch the metric reads is kept now
    assert by_metric.report["target_reached"]
    history = next(p for p in by_metric.report["passes"] if p["pass"] == "snp")["history"]
    assert all("metric_change" in entry["probe"] for entry in history if "probe" in entry)
    held_out = data(seed=7)
    quiet = {name: api.verify(model, result.model, held_out, metric=quiet_branch_error).metric["quiet_rel"]
             for name, result in (("default", default), ("metric", by_metric))}
    assert quiet["metric"] < quiet["default"]


def test_probe_key_is_checked():
    model, calib = two_branches(), data()
    options = {"method": "snp", "calib": calib, "target_macs": 0.6, "budget_by": "sensitivity"}
    with pytest.raises(GraphoptError, match="--probe-key KEY"):  # two keys, none named
        graphopt.optimize(model, metric=quiet_branch_error, **options)
    with pytest.raises(GraphoptError, match="--probe-key nope"):
        graphopt.optimize(model, metric=quiet_branch_error, probe_key="nope", **options)
    with pytest.raises(GraphoptError, match="--probe-key names"):
        graphopt.optimize(model, probe_key="quiet_rel", **options)


def test_cli_probes_weigh_a_metric_module(tmp_path, monkeypatch, capsys):
    from graphopt import cli

    model_path, calib_path = tmp_path / "two.onnx", tmp_path / "calib.npz"
    onnx.save(two_branches(), model_path)
    np.savez(calib_path, **data())
    (tmp_path / "quiet_metric.py").write_text(
        "import numpy as np\n\n\ndef quiet(reference, candidate, inputs):\n"
        "    r, c = reference['y'][:, 4:], candidate['y'][:, 4:]\n"
        "    return {'quiet_rel': float(np.linalg.norm(c - r) / np.linalg.norm(r)), 'n': float(len(r))}\n")
    monkeypatch.chdir(tmp_path)
    argv = ["optimize", str(model_path), "--method", "snp", "--target-macs", "0.6", "--round-to", "1",
            "--calib", str(calib_path), "--budget-by", "sensitivity", "--metric", "quiet_metric:quiet",
            "--report", str(tmp_path / "r.json")]
    assert cli.main([*argv, "-o", str(tmp_path / "a.onnx"), "--probe-key", "quiet_rel"]) == 0
    assert cli.main([*argv[:-4], "-o", str(tmp_path / "default.onnx")]) == 0
    widths = {name: {i.name: i.dims[1] for i in onnx.load(tmp_path / name).graph.initializer if i.name == "b1"}
              for name in ("a.onnx", "default.onnx")}
    assert widths["a.onnx"]["b1"] > widths["default.onnx"]["b1"]  # the metric reads the quiet branch: kept more
    capsys.readouterr()
    assert cli.main([*argv, "-o", str(tmp_path / "b.onnx")]) == 2  # two keys and none named
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "--probe-key KEY" in err[0], err
    assert not (tmp_path / "b.onnx").exists()

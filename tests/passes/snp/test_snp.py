"""SNP: exact removal of redundant units, exact affine reconstruction, error bounds on zoo blocks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits

import graphopt
from graphopt.calibration.shapes import count_cost
from graphopt.errors import GraphoptError
from graphopt.passes.snp.maths import RIDGE, ldl_diagonal, output_order, reconstruction, regularised, zca_order
from tests.conftest import run_ort


def _mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, relu: bool = True,
         dtype: type = np.float32, alpha: float = 1.0) -> onnx.ModelProto:
    """x[N, 64] -> Gemm(transB) -> [Relu] -> Gemm(transB) -> y[N, 10]."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1)]
    hidden = "h"
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="act"))
        hidden = "a"
    nodes.append(helper.make_node("Gemm", [hidden, "w2", "b2"], ["y"], name="fc2", transB=1, alpha=alpha))
    inits = [numpy_helper.from_array(v.astype(dtype), n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["N", 64])],
                              [helper.make_tensor_value_info("y", elem, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"vocab": "0-9"})
    return model


def _digits(count: int = 300, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"x": (load_digits().data[:count] / 16.0).astype(dtype)}


def _redundant_mlp() -> tuple[onnx.ModelProto, int]:
    """32 hidden units: 4 duplicate units 0..3 and 4 are dead after ReLU; returns (model, redundant)."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((32, 64)) * 0.3, rng.standard_normal(32) * 0.1 + 0.5
    w1[24:28], b1[24:28] = 0.0, -1.0          # dead: ReLU(-1) = 0 for every input
    w1[28:32], b1[28:32] = w1[0:4], b1[0:4]   # exact duplicates
    w2, b2 = rng.standard_normal((10, 32)), rng.standard_normal(10)
    return _mlp(w1, b1, w2, b2), 8


def _target(model: onnx.ModelProto, hidden_kept: int) -> float:
    before = count_cost(model, {"x": (1, 64)}).macs
    return (64 * hidden_kept + hidden_kept * 10) / before


def test_snp_removes_duplicate_and_dead_units_exactly_where_magnitude_cannot() -> None:
    model, redundant = _redundant_mlp()
    data = _digits()
    target = _target(model, 32 - redundant)
    snp = graphopt.optimize(model, method="snp", target_macs=target, calib=data, round_to=1)
    magnitude = graphopt.optimize(model, method="magnitude", target_macs=target, calib=data, round_to=1)
    assert snp.report["macs_ratio"] == pytest.approx(target)
    reference = run_ort(model, data)["y"]
    snp_error = np.max(np.abs(run_ort(snp.model, data)["y"] - reference))
    magnitude_error = np.max(np.abs(run_ort(magnitude.model, data)["y"] - reference))
    assert snp_error < 1e-4
    assert magnitude_error > 1e-2
    assert {p.key: p.value for p in snp.model.metadata_props} == {"vocab": "0-9"}


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_reconstruction_is_exact_for_affine_and_constant_units(alpha: float) -> None:
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((16, 64)) * 0.3, rng.standard_normal(16)
    w1[14], b1[14] = 2.0 * w1[0] - w1[1], 2.0 * b1[0] - b1[1] + 3.0   # h14 = 2 h0 - h1 + 3
    w1[15], b1[15] = 0.0, 5.0                                          # h15 = 5
    model = _mlp(w1, b1, rng.standard_normal((10, 16)), rng.standard_normal(10), relu=False, alpha=alpha)
    data = _digits()
    result = graphopt.optimize(model, method="snp", target_macs=_target(model, 14), calib=data, round_to=1)
    reference, pruned = run_ort(model, data)["y"], run_ort(result.model, data)["y"]
    assert np.max(np.abs(pruned - reference)) < 1e-4
    without = graphopt.optimize(model, method="snp", target_macs=_target(model, 14), calib=data, reconstruct=False,
                                round_to=1)
    assert np.max(np.abs(run_ort(without.model, data)["y"] - reference)) > 1.0


def test_keep_variance_one_prunes_only_redundant_units_and_is_idempotent() -> None:
    model, redundant = _redundant_mlp()
    data = _digits()
    first = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=data, round_to=1)
    hidden = {i.name: numpy_helper.to_array(i).shape for i in first.model.graph.initializer}
    assert 32 - redundant <= hidden["w2"][1] < 32
    second = graphopt.optimize(first.model, method="snp", keep_variance=1.0, calib=data, round_to=1)
    assert second.report["passes"][-1]["modified"] is False
    assert second.report["macs_after"] == first.report["macs_after"]


def test_fp16_model_keeps_fp16_weights() -> None:
    model, _ = _redundant_mlp()
    half = _mlp(*(numpy_helper.to_array(i) for i in model.graph.initializer), dtype=np.float16)
    result = graphopt.optimize(half, method="snp", target_macs=0.6, calib=_digits(dtype=np.float16))
    dtypes = {numpy_helper.to_array(i).dtype for i in result.model.graph.initializer}
    assert dtypes == {np.dtype(np.float16)}
    assert result.report["fidelity"]["cosine"] > 0.9


def test_snp_needs_calibration_data_and_one_budget() -> None:
    model, _ = _redundant_mlp()
    with pytest.raises(GraphoptError, match="--calib"):
        graphopt.optimize(model, method="snp", target_macs=0.5)
    with pytest.raises(GraphoptError, match="exactly one"):
        graphopt.optimize(model, method="snp", target_macs=0.5, keep_variance=0.9, calib=_digits())


def test_output_layer_group_is_left_alone_with_reason() -> None:
    model, _ = _redundant_mlp()
    result = graphopt.optimize(model, method="snp", target_macs=0.5, calib=_digits())
    assert any("graph output 'y'" in reason for reason in result.report["passes"][-1]["skipped"])
    assert run_ort(result.model, _digits(5))["y"].shape == (5, 10)


def test_math_orders_duplicates_last_and_output_order_is_a_permutation() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((500, 5))
    units = np.concatenate([base, base[:, :1]], axis=1)  # unit 5 duplicates unit 0
    cov = np.cov(units, rowvar=False, bias=True)
    order = zca_order(cov)
    assert order[-1] in (0, 5)
    added = ldl_diagonal(cov, order)
    assert added[-1] < 1e-6 * added[0]
    coupling, constant = reconstruction(cov, units.mean(axis=0), np.arange(5), np.array([5]))
    assert np.allclose(coupling, [[1, 0, 0, 0, 0]], atol=1e-6) and abs(constant[0]) < 1e-6
    readout = rng.standard_normal((3, 6))
    assert sorted(output_order(cov, readout.T @ readout).tolist()) == list(range(6))


def _eliminate_by_definition(cov: np.ndarray) -> list[int]:
    """Backward elimination on 1 / (Σ⁻¹)ᵢᵢ, inverting the remaining units' covariance at every step."""
    remaining, eliminated = list(range(cov.shape[0])), []
    while len(remaining) > 1:
        precision = np.linalg.inv(regularised(cov)[np.ix_(remaining, remaining)])
        eliminated.append(remaining.pop(int(np.argmin(1.0 / np.diag(precision)))))
    return remaining + eliminated[::-1]


def _greedy_by_definition(cov: np.ndarray, readout: np.ndarray) -> list[int]:
    """Prune, one at a time, the unit whose addition to P gives the least trace(B_PP ((Σ⁻¹)_PP)⁻¹)."""
    precision, pruned = np.linalg.inv(regularised(cov)), []
    remaining = list(range(cov.shape[0]))
    while len(remaining) > 1:
        def error(j: int) -> float:
            chosen = pruned + [j]
            return float(np.trace(readout[np.ix_(chosen, chosen)] @ np.linalg.inv(precision[np.ix_(chosen, chosen)])))
        best = min(remaining, key=error)
        pruned.append(best)
        remaining.remove(best)
    return remaining + pruned[::-1]


def test_orderings_match_their_definitions_across_update_blocks() -> None:
    rng = np.random.default_rng(5)
    units = rng.standard_normal((400, 150)) * rng.uniform(0.2, 2.0, 150)  # more units than one block of 64
    cov = np.cov(units, rowvar=False, bias=True)
    assert zca_order(cov).tolist() == _eliminate_by_definition(cov)
    small = np.cov(units[:, :30], rowvar=False, bias=True)
    weights = rng.standard_normal((8, 30))
    assert output_order(small, weights.T @ weights).tolist() == _greedy_by_definition(small, weights.T @ weights)


def test_ldl_diagonal_survives_rounding_below_the_ridge() -> None:
    # a covariance whose rounding error reaches below -RIDGE: Cholesky fails at RIDGE, the retry succeeds
    rng = np.random.default_rng(6)
    basis, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    spectrum = np.concatenate([rng.uniform(0.5, 2.0, 10), np.zeros(29), [-3 * RIDGE]])
    cov = (basis * spectrum) @ basis.T
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(regularised(cov))
    added = ldl_diagonal(cov, np.arange(40))
    assert np.all(np.isfinite(added)) and np.all(added > 0)
    assert np.allclose(added, np.diag(np.linalg.cholesky(regularised(cov, 100 * RIDGE))) ** 2)  # one retry


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "se_hardswish"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_zoo_blocks_reconstruction_beats_plain_pruning(name: str, exporter: str, zoo_path) -> None:
    torch = pytest.importorskip("torch")
    from graphopt.torch.zoo import ZOO

    _, example = ZOO[name]()
    path = zoo_path(name, exporter, 17, False)
    generator = torch.Generator().manual_seed(0)
    calib = {"input": torch.rand((64, *example.shape[1:]), generator=generator).numpy()}
    with_reconstruction = graphopt.optimize(path, method="snp", target_macs=0.7, calib=calib)
    without = graphopt.optimize(path, method="snp", target_macs=0.7, calib=calib, reconstruct=False)
    assert abs(with_reconstruction.report["macs_ratio"] - 0.7) < 0.03
    onnx.checker.check_model(with_reconstruction.model)
    assert with_reconstruction.report["fidelity"]["rel_l2"] < without.report["fidelity"]["rel_l2"]


def _deep_redundant_mlp() -> onnx.ModelProto:
    """64 -> 24 -> 24 -> 10 with ReLUs; in each hidden layer units 20..23 duplicate units 0..3."""
    rng = np.random.default_rng(3)
    layers, nodes, inits, width = [], [], [], 64
    for index, out in enumerate((24, 24)):
        weight, bias = rng.standard_normal((out, width)) * 0.3, rng.standard_normal(out) * 0.1 + 0.3
        weight[20:24], bias[20:24] = weight[0:4], bias[0:4]
        layers.append((weight, bias))
        width = out
    layers.append((rng.standard_normal((10, width)), rng.standard_normal(10)))
    source = "x"
    for index, (weight, bias) in enumerate(layers):
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"w{index}"),
                  numpy_helper.from_array(bias.astype(np.float32), f"b{index}")]
        nodes.append(helper.make_node("Gemm", [source, f"w{index}", f"b{index}"], [f"h{index}"], name=f"fc{index}", transB=1))
        source = f"h{index}"
        if index < 2:
            nodes.append(helper.make_node("Relu", [source], [f"a{index}"], name=f"act{index}"))
            source = f"a{index}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", 1, ["N", 64])],
                              [helper.make_tensor_value_info(source, 1, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("sequential", [False, True])
def test_deep_network_duplicates_removed_exactly(sequential: bool) -> None:
    model = _deep_redundant_mlp()
    data = _digits()
    before = count_cost(model, {"x": (1, 64)}).macs
    target = (64 * 20 + 20 * 20 + 20 * 10) / before
    result = graphopt.optimize(model, method="snp", target_macs=target, calib=data, sequential=sequential,
                               criterion="variance", round_to=1)
    assert result.report["macs_ratio"] == pytest.approx(target)
    error = np.max(np.abs(run_ort(result.model, data)["h2"] - run_ort(model, data)["h2"]))
    assert error < 1e-4
    history = result.report["passes"][-1]["history"]
    assert sorted(next(m for m in e["members"] if m.endswith(":producer")) for e in history) == \
        ["fc0:producer", "fc1:producer"]
    for entry in history:  # one unit of each duplicate pair went, adding no unique variance
        assert entry["size"] == 24 and entry["kept"] == 20 and len(entry["removed"]) == 4
        assert all((i in entry["removed"]) != (i + 20 in entry["removed"]) for i in range(4))
        assert max(entry["scores"]) < 1e-6 and entry["retained"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sequential", [False, True])
def test_history_names_the_removed_units_with_their_unique_variance(sequential: bool) -> None:
    rng = np.random.default_rng(5)
    w1, b1 = rng.standard_normal((16, 64)) * 0.3, rng.standard_normal(16) * 0.1 + 0.2
    model = _mlp(w1, b1, rng.standard_normal((10, 16)), rng.standard_normal(10))
    data = _digits()
    target = _target(model, 11)
    result = graphopt.optimize(model, method="snp", target_macs=target, calib=data, sequential=sequential,
                               criterion="variance", round_to=1)
    (entry,) = json.loads(json.dumps(result.report))["passes"][-1]["history"]
    assert entry["by"] == "snp" and entry["criterion"] == "unique_variance" and entry["ordering"] == "variance"
    assert entry["size"] == 16 and entry["kept"] == 11 and entry["target_macs"] == pytest.approx(target)
    assert {"fc1:producer", "fc2:consumer"} <= set(entry["members"])
    # the removed indices are the rows missing from the pruned producer (SNP only slices it)
    kept = np.setdiff1d(np.arange(16), entry["removed"])
    stored = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    fc1 = next(n for n in result.model.graph.node if n.name == "fc1")
    np.testing.assert_array_equal(stored[fc1.input[1]], w1.astype(np.float32)[kept])
    np.testing.assert_array_equal(stored[fc1.input[2]], b1.astype(np.float32)[kept])
    # the scores: each removed unit's share of the unique variance of the hidden activations
    hidden = np.maximum(data["x"].astype(np.float64) @ w1.astype(np.float32).T + b1.astype(np.float32), 0.0)
    cov = np.cov(hidden, rowvar=False, bias=True)
    order = zca_order(cov)
    added = ldl_diagonal(cov, order)
    share = np.empty(16)
    share[order] = added / added.sum()
    assert entry["removed"] == sorted(order[11:].tolist())
    np.testing.assert_allclose(entry["scores"], share[entry["removed"]], rtol=1e-3)
    assert entry["retained"] == pytest.approx(1.0 - sum(entry["scores"]), abs=1e-5)
    assert entry["retained"] >= entry["retained_variance_cut"] - 1e-6


@pytest.mark.parametrize("consumer_bias", ["absent", "empty"])
def test_reconstruction_creates_the_bias_of_a_consumer_that_has_none(consumer_bias: str) -> None:
    """The removed units' mean is carried by the consumer's bias: a Gemm without C (or with an empty C)
    gets one, and the fit beats pruning the same units without reconstruction."""
    rng = np.random.default_rng(2)
    w1, b1 = rng.standard_normal((32, 64)) * 0.3, rng.standard_normal(32) * 0.1 + 0.5
    model = _mlp(w1, b1, rng.standard_normal((10, 32)), np.zeros(10))
    fc2 = next(n for n in model.graph.node if n.name == "fc2")
    del fc2.input[2]
    if consumer_bias == "empty":
        fc2.input.append("")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b2"))
    data = _digits()
    pruned = graphopt.optimize(model, method="snp", calib=data, target_macs=0.6)
    plain = graphopt.optimize(model, method="snp", calib=data, target_macs=0.6, reconstruct=False)
    gemm = next(n for n in pruned.model.graph.node if n.op_type == "Gemm" and n.input[0] != "x")
    bias = next(t for t in pruned.model.graph.initializer if t.name == gemm.input[2])
    assert numpy_helper.to_array(bias).shape == (10,) and np.any(numpy_helper.to_array(bias) != 0)
    assert pruned.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]


def _split_halves_mlp() -> onnx.ModelProto:
    """fc1 (64 -> 24) split into two halves of 12 units, each through its ReLU into its own Gemm, summed: two
    channel groups with the same producer. Units 10, 11 of each half duplicate its units 0, 1."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.standard_normal((24, 64)) * 0.3, rng.standard_normal(24) * 0.1 + 0.5
    for half in (0, 12):
        w1[half + 10:half + 12], b1[half + 10:half + 12] = w1[half:half + 2], b1[half:half + 2]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Split", ["h", "sizes"], ["ha", "hb"], name="split", axis=1),
             helper.make_node("Relu", ["ha"], ["ra"], name="act_a"),
             helper.make_node("Relu", ["hb"], ["rb"], name="act_b"),
             helper.make_node("Gemm", ["ra", "wa", "ba"], ["ya"], name="fc_a", transB=1),
             helper.make_node("Gemm", ["rb", "wb", "bb"], ["yb"], name="fc_b", transB=1),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="sum")]
    values = {"w1": w1, "b1": b1, "wa": rng.standard_normal((10, 12)), "ba": rng.standard_normal(10),
              "wb": rng.standard_normal((10, 12)), "bb": rng.standard_normal(10)}
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in values.items()]
    inits.append(numpy_helper.from_array(np.array([12, 12], dtype=np.int64), "sizes"))
    graph = helper.make_graph(nodes, "halves", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("options", [{"sequential": True}, {"sequential": False},
                                     {"budget_by": "sensitivity"}])
def test_groups_that_share_their_producer_are_each_cut_in_their_own_piece(options) -> None:
    """Two groups split from one producer are told apart by their piece of it: sequential SNP re-finds each half
    after the other was cut (it re-found the first half twice and crashed)."""
    model, data = _split_halves_mlp(), _digits()
    target = (64 * 20 + 2 * 10 * 10) / count_cost(model, {"x": (1, 64)}).macs
    result = graphopt.optimize(model, method="snp", target_macs=target, calib=data, criterion="variance",
                               round_to=1, **options)
    assert result.report["macs_ratio"] == pytest.approx(target)
    assert np.max(np.abs(run_ort(result.model, data)["y"] - run_ort(model, data)["y"])) < 1e-4
    history = result.report["passes"][-1]["history"]
    assert len(history) == 2
    for entry in history:  # each half lost one unit of each of its duplicate pairs
        assert entry["size"] == 12 and entry["kept"] == 10 and len(entry["removed"]) == 2
        assert all((i in entry["removed"]) != (i + 10 in entry["removed"]) for i in range(2))

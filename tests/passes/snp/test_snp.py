"""SNP: exact removal of redundant units, exact affine reconstruction, error bounds on zoo blocks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits

import graphopt
from graphopt.calibration.shapes import count_cost
from graphopt.errors import GraphoptError
from graphopt.passes.snp.maths import ldl_diagonal, output_order, reconstruction, zca_order
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
    snp = graphopt.optimize(model, method="snp", target_macs=target, calib=data)
    magnitude = graphopt.optimize(model, method="magnitude", target_macs=target, calib=data)
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
    result = graphopt.optimize(model, method="snp", target_macs=_target(model, 14), calib=data)
    reference, pruned = run_ort(model, data)["y"], run_ort(result.model, data)["y"]
    assert np.max(np.abs(pruned - reference)) < 1e-4
    without = graphopt.optimize(model, method="snp", target_macs=_target(model, 14), calib=data, reconstruct=False)
    assert np.max(np.abs(run_ort(without.model, data)["y"] - reference)) > 1.0


def test_keep_variance_one_prunes_only_redundant_units_and_is_idempotent() -> None:
    model, redundant = _redundant_mlp()
    data = _digits()
    first = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=data)
    hidden = {i.name: numpy_helper.to_array(i).shape for i in first.model.graph.initializer}
    assert 32 - redundant <= hidden["w2"][1] < 32
    second = graphopt.optimize(first.model, method="snp", keep_variance=1.0, calib=data)
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


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "se_hardswish"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_zoo_blocks_reconstruction_beats_plain_pruning(name: str, exporter: str, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from graphopt.torch.export import export_onnx
    from graphopt.torch.zoo import ZOO

    module, example = ZOO[name]()
    path = export_onnx(module, example, tmp_path / f"{name}.onnx", exporter=exporter, opset=17, fold_bn=False)
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
    result = graphopt.optimize(model, method="snp", target_macs=target, calib=data, sequential=sequential)
    assert result.report["macs_ratio"] == pytest.approx(target)
    error = np.max(np.abs(run_ort(result.model, data)["h2"] - run_ort(model, data)["h2"]))
    assert error < 1e-4

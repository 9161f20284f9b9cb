"""CoB: exact rotations on TSRA / RMS-norm chains, illegal chains declined, pruning after rotation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

import graphopt
from graphopt.api import calibrate
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.ops.library import ensure_functions
from graphopt.ops.rms_norm import make_rms_norm_node
from graphopt.ops.tsra import make_tsra_node
from tests.conftest import assert_equivalent, run_ort


def _digits(count: int = 256) -> dict[str, np.ndarray]:
    return {"x": (load_digits().data[:count] / 16.0).astype(np.float32)}


def _tsra_mlp(w1: np.ndarray, b1: np.ndarray, split: int, seed: int = 0, extra: bool = False) -> onnx.ModelProto:
    """x[N,64] -> Gemm -> graphopt.RMSNorm -> graphopt.TSRA(split) -> Gemm -> y[N,10] (-> local.Double)."""
    rng = np.random.default_rng(seed)
    hidden = w1.shape[0]
    w2, b2 = rng.standard_normal((10, hidden)) / np.sqrt(hidden), rng.standard_normal(10) * 0.1
    last = "z" if extra else "y"
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             make_rms_norm_node("h", "n", hidden, name="norm"), make_tsra_node("n", "a", split, name="act"),
             helper.make_node("Gemm", ["a", "w2", "b2"], [last], name="fc2", transB=1)]
    functions = []
    if extra:
        nodes.append(helper.make_node("Double", ["z"], ["y"], name="double", domain="local"))
        functions.append(helper.make_function("local", "Double", ["X"], ["Y"], [helper.make_node("Add", ["X", "X"], ["Y"])],
                                              [helper.make_opsetid("", 17)]))
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("local", 1)] if extra else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    helper.set_model_props(model, {"owner": "tests"})
    ensure_functions(model)
    onnx.checker.check_model(model)
    return model


def _random_mlp(hidden: int = 24, split: int = 16, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return _tsra_mlp(rng.standard_normal((hidden, 64)) * 0.3, rng.standard_normal(hidden) * 0.1, split, seed)


def _last_pass(result: graphopt.api.OptimizeResult) -> dict:
    return result.report["passes"][-1]


def _torch_models():
    torch = pytest.importorskip("torch")
    from torch import nn

    from graphopt.torch.tsra import TSRA, RMSNorm

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 24), RMSNorm(), TSRA(16), nn.Linear(24, 16), RMSNorm(), TSRA(10),
                        nn.Linear(16, 10)).eval()
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), RMSNorm(), TSRA(5), nn.AvgPool2d(2),
                        nn.Conv2d(8, 12, 3, padding=1), RMSNorm(), TSRA(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(12, 10)).eval()
    images = torch.tensor(load_digits().data[:128] / 16.0, dtype=torch.float32)
    return {"mlp": (mlp, images), "cnn": (cnn, images.reshape(-1, 1, 8, 8))}


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("rotation", ["pca", "l1pca"])
def test_rotation_alone_is_exact_on_exported_tsra_mlp_and_cnn(exporter: str, rotation: str, tmp_path) -> None:
    from graphopt.torch.export import export_onnx

    for name, (module, data) in _torch_models().items():
        path = export_onnx(module, data[:2], tmp_path / f"{name}.onnx", exporter=exporter, opset=17)
        model = onnx.load(path)
        result = graphopt.optimize(model, method="cob", calib={"input": data.numpy()}, rotation=rotation)
        stats = _last_pass(result)["stats"]
        assert (stats["rms_norms_recognised"], stats["tsra_recognised"]) == (2, 2)
        assert stats["chains_rotated"] == 2, _last_pass(result)["skipped"]
        # the MLP's norm over its last axis is written out as onnxruntime fuses it; the CNN's over channels is not
        assert {f.name for f in result.model.functions} == {"TSRA", "RMSNorm"} if name == "cnn" else {"TSRA"}
        assert_equivalent(model, result.model, {"input": data.numpy()})
        again = graphopt.optimize(result.model, method="cob", calib={"input": data.numpy()}, rotation=rotation)
        written_out = sum(n.op_type == "Pow" for n in result.model.graph.node)
        assert written_out == (0 if name == "cnn" else 2)
        assert _last_pass(again)["stats"]["rms_norms_recognised"] == written_out  # and read back as norms


def test_rotation_moves_energy_to_leading_coordinates() -> None:
    model, data = _random_mlp(), _digits()
    rotated = graphopt.optimize(model, method="cob", calib=data).model
    weights = {i.name: numpy_helper.to_array(i) for i in rotated.graph.initializer}
    hidden = next(v for k, v in weights.items() if v.shape == (24, 64)).astype(np.float64)
    bias = next(v for k, v in weights.items() if v.shape == (24,)).astype(np.float64)
    energy = ((data["x"] @ hidden.T + bias) ** 2).sum(axis=0)
    assert np.all(np.diff(energy[:16]) <= 1e-3 * energy[0]) and np.all(np.diff(energy[16:]) <= 1e-3 * energy[0])


def _illegal(op: str) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((6, 3, 3, 3)), "b1": rng.standard_normal(6), "w2": rng.standard_normal((4, 6, 1, 1))}
    middle = {"Relu": [helper.make_node("Relu", ["h"], ["m"], name="offender")],
              "MaxPool": [helper.make_node("MaxPool", ["h"], ["m"], name="offender", kernel_shape=[2, 2])],
              "Add": [helper.make_node("Add", ["h", "bias"], ["m"], name="offender")],
              "BatchNormalization": [helper.make_node("BatchNormalization", ["h", "s", "o", "mu", "var"], ["m"],
                                                      name="offender")]}[op]
    inits.update({"bias": rng.standard_normal((6, 1, 1)), "s": rng.uniform(0.5, 2, 6), "o": rng.standard_normal(6),
                  "mu": rng.standard_normal(6), "var": rng.uniform(0.5, 2, 6)})
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]), *middle,
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items() if k in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Relu", "MaxPool", "Add", "BatchNormalization"])
def test_illegal_chains_are_declined_with_the_offending_op(op: str) -> None:
    model = _illegal(op)
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    if op == "BatchNormalization":  # the fold_batchnorm pre-pass folds it into conv1: the chain is legal
        rotated = graphopt.optimize(model, method="cob", calib=feeds)  # no budget: rotation only, exact
        assert _last_pass(rotated)["stats"]["chains"] == 1 and _last_pass(rotated)["stats"]["chains_rotated"] == 1
        assert "BatchNormalization" not in [node.op_type for node in rotated.model.graph.node]
        assert_equivalent(model, rotated.model, feeds)
        return
    result = graphopt.optimize(model, method="cob", calib=feeds, keep_variance=0.5)
    passed = _last_pass(result)
    assert any(f"({op})" in reason and "conv1" in reason for reason in passed["skipped"]), passed["skipped"]
    assert passed["stats"]["chains"] == 0 and passed["modified"] is False
    assert_equivalent(model, result.model, feeds)


def test_batchnorm_the_prepasses_cannot_fold_blocks_the_chain() -> None:
    model = _illegal("BatchNormalization")
    model.graph.node.insert(1, helper.make_node("AveragePool", ["h"], ["p"], name="pool", kernel_shape=[1, 1]))
    model.graph.node[2].input[0] = "p"  # Conv -> AveragePool -> BN -> Conv: BN does not follow a Conv
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    result = graphopt.optimize(model, method="cob", calib=feeds)
    skipped = _last_pass(result)["skipped"]
    assert any("(BatchNormalization)" in r and "conv1" in r for r in skipped), skipped
    assert_equivalent(model, result.model, feeds)


def test_zero_energy_rotated_dimensions_are_pruned_without_error_and_split_follows() -> None:
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((24, 64)) * 0.3
    w1[:16] = rng.standard_normal((16, 5)) @ rng.standard_normal((5, 64)) * 0.1  # U spans 5 dimensions
    model, data = _tsra_mlp(w1, np.zeros(24), 16), _digits()
    result = graphopt.optimize(model, method="cob", calib=data, keep_variance=1.0, round_to=1)
    tsra = next(n for n in result.model.graph.node if n.op_type == "TSRA")
    assert next(a.i for a in tsra.attribute if a.name == "split") == 5
    assert _last_pass(result)["stats"]["channels_removed"] >= 11
    assert_equivalent(model, result.model, data)
    again = graphopt.optimize(result.model, method="cob", calib=data, keep_variance=1.0, round_to=1)
    assert _last_pass(again)["stats"]["channels_removed"] == 0


def test_history_lists_the_dropped_rotated_coordinates_with_their_energy() -> None:
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((24, 64)) * 0.3
    w1[:16] = rng.standard_normal((16, 5)) @ rng.standard_normal((5, 64)) * 0.1  # U spans 5 dimensions
    result = graphopt.optimize(_tsra_mlp(w1, np.zeros(24), 16), method="cob", calib=_digits(), target_macs=0.5,
                               round_to=1)
    record = _last_pass(result)
    history = record["history"]
    assert sum(len(e["removed"]) for e in history) == record["stats"]["channels_removed"] > 0
    tsra = next(n for n in result.model.graph.node if n.op_type == "TSRA")
    split = next(a.i for a in tsra.attribute if a.name == "split")
    by_size = {e["size"]: e for e in history}
    assert set(by_size) == {16, 8} and by_size[16]["kept"] == split == 5
    for entry in history:  # the trailing rotated coordinates, each with its share of the subspace's energy
        assert entry["by"] == "cob" and entry["criterion"] == "rotated_energy" and entry["basis"] == "rotated"
        assert entry["removed"] == list(range(entry["kept"], entry["size"]))
        assert entry["target_macs"] == 0.5 and 0.0 < entry["retained_variance_cut"] <= 1.0
        assert entry["retained"] == pytest.approx(1.0 - sum(entry["scores"]), abs=1e-5)
    assert max(by_size[16]["scores"]) < 1e-6 < min(by_size[8]["scores"])  # U's energy lies in 5 coordinates


def test_pruning_after_rotation_beats_magnitude_at_the_same_macs() -> None:
    model, data = _random_mlp(hidden=32, split=20, seed=5), _digits()
    for target in (0.5, 0.7):
        cob = graphopt.optimize(model, method="cob", calib=data, target_macs=target)
        magnitude = graphopt.optimize(model, method="magnitude", calib=data, target_macs=target)
        assert cob.report["macs_ratio"] <= target + 1e-9
        assert cob.report["macs_ratio"] == pytest.approx(magnitude.report["macs_ratio"], abs=0.05)
        assert cob.report["fidelity"]["rel_l2"] < 0.5 * magnitude.report["fidelity"]["rel_l2"]
        assert run_ort(cob.model, data)["y"].shape == (256, 10)


def test_a_statistics_file_alone_serves_the_reconstruction_after_the_rotation(tmp_path) -> None:
    """The readers of a rotated chain are refitted on the file's statistics rotated exactly (no data given),
    as on the rotated model's statistics measured from the data."""
    model, data = _random_mlp(hidden=32, split=20, seed=5), _digits()
    stats = str(tmp_path / "stats.npz")
    calibrate(model, data, output=stats)
    options = dict(method="cob", target_macs=0.6, round_to=1, reconstruct_target="self")
    from_file = graphopt.optimize(model, stats=stats, **options)
    measured = graphopt.optimize(model, calib=data, **options)
    assert _last_pass(from_file)["stats"]["consumers_reconstructed"] == \
        _last_pass(measured)["stats"]["consumers_reconstructed"] > 0
    outputs = [run_ort(m, data)["y"] for m in (model, from_file.model, measured.model)]
    assert np.linalg.norm(outputs[1] - outputs[2]) < 1e-4 * np.linalg.norm(outputs[0])
    assert np.linalg.norm(outputs[1] - outputs[0]) < np.linalg.norm(
        run_ort(graphopt.optimize(model, stats=stats, cob_reconstruct=False,
                                  **{k: v for k, v in options.items() if k != "reconstruct_target"}).model, data)["y"]
        - outputs[0])  # the refit on the rotated file statistics does recover what the cut dropped


@pytest.mark.parametrize("budget", [{"zscore": 0.0}, {"keep_variance": 0.95}])
def test_zscore_and_variance_budgets_prune_both_subspaces(budget: dict) -> None:
    model, data = _random_mlp(seed=6), _digits()
    # exact counts: under auto rounding a 16-channel subspace is one CPU block, which no cut makes faster
    result = graphopt.optimize(model, method="cob", calib=data, round_to=1, **budget)
    tsra = next(n for n in result.model.graph.node if n.op_type == "TSRA")
    split = next(a.i for a in tsra.attribute if a.name == "split")
    hidden = run_ort(result.model, data)["y"]
    assert split < 16 and result.report["macs_ratio"] < 1.0 and np.isfinite(hidden).all()
    assert result.report["fidelity"]["rel_l2"] < 0.5


def test_idempotent_and_preserves_functions_and_metadata() -> None:
    rng = np.random.default_rng(7)
    model = _tsra_mlp(rng.standard_normal((24, 64)) * 0.3, rng.standard_normal(24) * 0.1, 16, extra=True)
    data = _digits()
    first = graphopt.optimize(model, method="cob", calib=data)
    assert _last_pass(first)["stats"]["chains_rotated"] == 1
    assert {(f.domain, f.name) for f in first.model.functions} == {("graphopt", "TSRA"), ("graphopt", "RMSNorm"),
                                                                   ("local", "Double")}
    assert {p.key: p.value for p in first.model.metadata_props} == {"owner": "tests"}
    assert_equivalent(model, first.model, data)
    second = graphopt.optimize(first.model, method="cob", calib=data)
    assert _last_pass(second)["modified"] is False
    before = {i.name: numpy_helper.to_array(i) for i in first.model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in second.model.graph.initializer}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_options_are_checked() -> None:
    model, data = _random_mlp(), _digits()
    with pytest.raises(GraphoptError, match="at most one"):
        graphopt.optimize(model, method="cob", calib=data, target_macs=0.5, zscore=0.0)
    with pytest.raises(GraphoptError, match="pca or l1pca"):
        graphopt.optimize(model, method="cob", calib=data, rotation="svd")
    with pytest.raises(GraphoptError, match="--calib"):
        graphopt.optimize(model, method="cob")


def test_cli_runs_l1pca_with_a_zscore_cutoff(tmp_path) -> None:
    model, data = _random_mlp(), _digits()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **data)
    code = main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--method", "cob",
                 "--calib", str(tmp_path / "d.npz"), "--rotation", "l1pca", "--zscore", "-0.5", "--quiet"])
    assert code == 0
    out = onnx.load(tmp_path / "o.onnx")
    assert run_ort(out, data)["y"].shape == (256, 10)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_pruning_exported_tsra_cnn_reaches_the_target(exporter: str, tmp_path) -> None:
    from graphopt.torch.export import export_onnx

    module, data = _torch_models()["cnn"]
    path = export_onnx(module, data[:2], tmp_path / "cnn.onnx", exporter=exporter, opset=17)
    result = graphopt.optimize(path, method="cob", calib={"input": data.numpy()}, target_macs=0.6)
    onnx.checker.check_model(result.model)
    assert 0.5 < result.report["macs_ratio"] <= 0.6
    assert result.report["fidelity"]["rel_l2"] < 0.3


@pytest.mark.parametrize("method", ["magnitude", "snp"])
def test_other_channel_methods_prune_exported_tsra_networks(method: str, tmp_path) -> None:
    from graphopt.torch.export import export_onnx

    module, data = _torch_models()["cnn"]
    path = export_onnx(module, data[:2], tmp_path / "cnn.onnx", exporter="legacy", opset=17)
    result = graphopt.optimize(path, method=method, calib={"input": data.numpy()}, target_macs=0.6)
    onnx.checker.check_model(result.model)
    assert _last_pass(result)["stats"]["prunable_groups"] >= 3
    assert 0.55 < result.report["macs_ratio"] <= 0.6


def test_snp_reconstruction_after_rotation_lowers_the_error(tmp_path) -> None:
    from graphopt.torch.export import export_onnx

    module, data = _torch_models()["cnn"]
    path = export_onnx(module, data[:2], tmp_path / "cnn.onnx", exporter="legacy", opset=17)
    calib = {"input": data.numpy()}
    plain = graphopt.optimize(path, method="cob", calib=calib, target_macs=0.5, cob_reconstruct=False)
    own = graphopt.optimize(path, method="cob", calib=calib, target_macs=0.5, reconstruct_target="self")
    refit = graphopt.optimize(path, method="cob", calib=calib, target_macs=0.5)  # the default: refit to the original
    assert refit.report["macs_ratio"] == own.report["macs_ratio"] == pytest.approx(plain.report["macs_ratio"])
    errors = [result.report["fidelity"]["rel_l2"] for result in (plain, own, refit)]
    assert errors[1] < errors[0] and errors[2] < errors[0]
    stats = [_last_pass(result)["stats"] for result in (plain, own, refit)]
    assert "consumers_reconstructed" not in stats[0] and stats[1]["consumers_reconstructed"] > 0
    assert "consumers_error_corrected" not in stats[1] and stats[2]["consumers_error_corrected"] > 0


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_token_major_linear_pairs_rotate_exactly_and_prune_planted_dims(exporter: str, tmp_path) -> None:
    """x[N, T, 16] -> Linear (MatMul + bias Add) -> Dropout -> Linear: channels on the last axis."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from graphopt.torch.export import export_onnx

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 24), nn.Dropout(0.1), nn.Linear(24, 8)).eval()
    rng = np.random.default_rng(8)
    tokens = (rng.standard_normal((32, 6, 16)) * np.linspace(2.0, 0.1, 16)).astype(np.float32)
    feeds = {"input": tokens}
    for rank in (None, 7):  # full rank: rotation only; rank 7: 17 rotated dims carry no energy
        if rank is not None:
            with torch.no_grad():
                basis = torch.randn(24, rank)
                module[0].weight.copy_(basis @ torch.randn(rank, 16) * 0.3)
                module[0].bias.copy_(basis @ torch.randn(rank) * 0.1)
        path = export_onnx(module, torch.tensor(tokens[:2]), tmp_path / f"{rank}.onnx", exporter=exporter, opset=17)
        model = onnx.load(path)
        budget = {} if rank is None else {"keep_variance": 1.0, "round_to": 1}  # exact counts: planted dims
        result = graphopt.optimize(model, method="cob", calib=feeds, **budget)
        stats = _last_pass(result)["stats"]
        assert stats["chains_rotated"] == 1, _last_pass(result)["skipped"]
        assert stats["channels_removed"] == (0 if rank is None else 24 - rank)
        assert_equivalent(model, result.model, feeds)

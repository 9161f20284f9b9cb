"""omp: sparsity reached (global and per layer), --keep-first-last, the dead-unit cleanup after pruning
is exact (same outputs as the merely zeroed model), option refusals, a shared weight declined, the
magnitude masks are idempotent, --sparse-storage, and a model from each torch exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphopt
from graphopt import cli
from graphopt.errors import GraphoptError
from graphopt.passes.sparse import omp
from graphopt.passes.sparse.omp import magnitude_masks
from tests.conftest import assert_equivalent, init, random_inputs, run_ort, tiny, weights

try:
    import torch
    from torch import nn

    from graphopt.torch.export import export_onnx
except ImportError:
    torch = None  # type: ignore[assignment]

LAYERS = [("w1", (32, 16)), ("w2", (32, 32)), ("w3", (32, 32)), ("w4", (4, 32))]


def mlp() -> onnx.ModelProto:
    """Four Gemm layers with weights of different scales, so global and per-layer pruning differ."""
    inits, body, source = [], [], "x"
    for index, (name, shape) in enumerate(LAYERS):
        inits += [init(name, weights(*shape, seed=index) * (index + 1)), init(f"b{index}", weights(shape[0], seed=9 + index))]
        out = "y" if index == len(LAYERS) - 1 else f"a{index}"
        body.append(f"h{index} = Gemm <transB = 1> ({source}, {name}, b{index})")
        if out != "y":
            body.append(f"{out} = Relu (h{index})")
        else:
            body[-1] = body[-1].replace(f"h{index} =", "y =")
        source = out
    return tiny("\n".join(body), inputs="float[N, 16] x", outputs="float[N, 4] y", inits=", ".join(inits))


def optimize(model: onnx.ModelProto, **options):
    return graphopt.optimize(model, method="omp", **options)


def zeroed_reference(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, **options) -> onnx.ModelProto:
    """The model with the OMP zeros written in and nothing removed (the dead-unit step switched off)."""
    with monkeypatch.context() as patch:
        patch.setattr(omp, "eliminate", lambda graph, ctx, result: None)
        return optimize(model, **options).model


def assert_magnitude_zeros(original: onnx.ModelProto, zeroed: onnx.ModelProto, sparsity: float, scope: str,
                           spared: set[str]) -> None:
    """What one-shot magnitude pruning promises, checked from the weights alone: within each scope (all pruned
    layers, or each layer) round(sparsity * n) weights are zero, every zeroed |w| is at most every kept |w|,
    the kept weights are untouched, and spared layers are left dense."""
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in zeroed.graph.initializer}
    pruned = [name for name, _ in LAYERS if name not in spared]
    for name in spared:
        np.testing.assert_array_equal(after[name], before[name])
    for names in ([[name] for name in pruned] if scope == "layer" else [pruned]):
        magnitude = np.concatenate([np.abs(before[name]).reshape(-1) for name in names])
        zero = np.concatenate([(after[name] == 0).reshape(-1) for name in names])
        kept = np.concatenate([after[name].reshape(-1) for name in names])[~zero]
        assert np.count_nonzero(magnitude == 0) == 0  # the seeded weights hold no zeros of their own
        assert zero.sum() == round(sparsity * magnitude.size), names
        assert magnitude[zero].max() <= magnitude[~zero].min(), names
        np.testing.assert_array_equal(kept, np.concatenate([before[name].reshape(-1) for name in names])[~zero])


def stats(result) -> dict:
    return result.report["passes"][-1]["stats"]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparsity_reached_and_cleanup_exact(scope: str, sparsity: float, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    result = optimize(model, sparsity=sparsity, omp_scope=scope)
    found = stats(result)
    assert found["sparsity_pruned_layers"] == pytest.approx(sparsity, abs=1e-3)
    per_layer = [value for key, value in found.items() if key.startswith("sparsity:")]
    assert len(per_layer) == len(LAYERS)
    if scope == "layer":
        assert all(value == pytest.approx(sparsity, abs=1 / 128) for value in per_layer)
    else:  # one threshold: the layer with the largest weights keeps the most
        assert max(per_layer) - min(per_layer) > 0.2
    zeroed = zeroed_reference(model, monkeypatch, sparsity=sparsity, omp_scope=scope)
    assert_magnitude_zeros(model, zeroed, sparsity, scope, set())
    assert_equivalent(zeroed, result.model, random_inputs(model, batch=6))
    if sparsity == 0.9:
        assert found["units_removed"] > 0 and result.report["params_after"] < result.report["params_before"]


def test_keep_first_last(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    result = optimize(model, sparsity=0.8, keep_first_last=True)
    arrays = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = result.report["weight_sparsity"]["layers"]
    assert list(layers.values())[0] == 0.0 and list(layers.values())[-1] == 0.0
    assert np.count_nonzero(arrays["w4"]) == original["w4"].size  # the last layer is dense (columns may go)
    assert stats(result)["sparsity_pruned_layers"] == pytest.approx(0.8, abs=1e-3)
    zeroed = zeroed_reference(model, monkeypatch, sparsity=0.8, keep_first_last=True)
    assert_magnitude_zeros(model, zeroed, 0.8, "global", {"w1", "w4"})
    assert_equivalent(zeroed, result.model, random_inputs(model, batch=4))
    assert sum("first or last layer" in reason for reason in result.report["passes"][-1]["skipped"]) == 2


def test_masks_idempotent() -> None:
    arrays = {name: weights(*shape, seed=index) for index, (name, shape) in enumerate(LAYERS)}
    for scope in ("global", "layer"):
        masks = magnitude_masks(arrays, 0.7, scope)
        pruned = {name: np.where(masks[name], value, 0) for name, value in arrays.items()}
        again = magnitude_masks(pruned, 0.7, scope)
        assert all(np.array_equal(np.where(again[n], pruned[n], 0), pruned[n]) for n in pruned)


@pytest.mark.parametrize("options", [{}, {"sparsity": 1.0}, {"sparsity": 0.5, "omp_scope": "tensor"}])
def test_bad_options_refused(options: dict) -> None:
    with pytest.raises(GraphoptError):
        optimize(mlp(), **options)


def test_shared_weight_declined() -> None:
    w = weights(8, 8)
    body = "h = MatMul (x, w)\na = Relu (h)\ny = MatMul (a, w)"
    model = tiny(body, inputs="float[N, 8] x", outputs="float[N, 8] y", inits=init("w", w))
    result = optimize(model, sparsity=0.5)
    assert any("shared" in reason for reason in result.report["passes"][-1]["skipped"])
    assert result.report["weight_sparsity"]["overall"] == 0.0
    assert_equivalent(model, result.model, random_inputs(model, batch=2))


@pytest.mark.parametrize(("sparsity", "used"), [(0.9, True), (0.2, False)])
def test_sparse_storage(sparsity: float, used: bool, tmp_path: Path) -> None:
    source, dense, sparse = tmp_path / "mlp.onnx", tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    onnx.save(mlp(), str(source))
    common = [str(source), "--method", "omp", "--sparsity", str(sparsity), "--quiet"]
    assert cli.main(["optimize", *common, "-o", str(dense)]) == 0
    report_path = tmp_path / "report.json"
    assert cli.main(["optimize", *common, "-o", str(sparse), "--sparse-storage", "--report", str(report_path)]) == 0
    stored = onnx.load(str(sparse))
    assert bool(stored.graph.sparse_initializer) == used
    if used:
        assert sparse.stat().st_size < dense.stat().st_size
    else:
        assert "1/3" in __import__("json").loads(report_path.read_text())["sparse_storage"]["reason"]
    feeds = random_inputs(mlp(), batch=3)
    expected = run_ort(onnx.load(str(dense)), feeds)
    session = ort.InferenceSession(str(sparse), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected["y"])


def filterbank() -> onnx.ModelProto:
    """A wide layer of weights near 1 read by a bias-free layer of weights near 0.01 (an STFT and its mel
    filterbank): global magnitude pruning at 0.5 takes every weight of the second."""
    inits = ", ".join([init("w1", weights(32, 16)), init("b1", weights(32, seed=1)),
                       init("w2", 0.01 * weights(32, 4, seed=2))])
    return tiny("h = Gemm <transB = 1> (x, w1, b1)\na = Relu (h)\ny = MatMul (a, w2)", inputs="float[N, 16] x",
                outputs="float[N, 4] y", inits=inits)


def test_emptied_layer_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             caplog: pytest.LogCaptureFixture) -> None:
    model = filterbank()
    emptied = stats(optimize(model, sparsity=0.5))
    assert emptied["layers_emptied"] == 1 and emptied["sparsity_all_layers"] == pytest.approx(0.5, abs=0.01)
    assert stats(optimize(model, sparsity=0.5, omp_scope="layer"))["layers_emptied"] == 0
    source, calib = tmp_path / "bank.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(source))
    np.savez(calib, x=weights(16, 16, seed=5))
    common = ["optimize", str(source), "--method", "omp", "--sparsity", "0.5", "--calib", str(calib), "--quiet"]
    assert cli.main([*common, "-o", str(tmp_path / "global.onnx")]) == 0
    said = capsys.readouterr().err
    assert "every weight of 1 layer(s) zeroed" in caplog.text and "--omp-scope layer" in caplog.text
    caplog.clear()
    assert "no longer computes what the original did" in said and "rel_l2 1" in said  # the output is now all zeros
    assert cli.main([*common, "-o", str(tmp_path / "layer.onnx"), "--omp-scope", "layer"]) == 0
    assert "zeroed" not in caplog.text and "no longer computes" not in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_already_sparser_says_so(scope: str) -> None:
    """A model at 0.9 sparsity asked for 0.5 zeroes nothing, and the pass says why (a mel filterbank is mostly
    zeros as exported)."""
    sparse = optimize(mlp(), sparsity=0.9, omp_scope="layer").model
    again = stats_and_skipped(optimize(sparse, sparsity=0.5, omp_scope=scope))
    assert again[0]["weights_zeroed"] == 0
    assert any("already" in reason and "at least the --sparsity 0.5 asked" in reason for reason in again[1])
    assert not any("already" in reason for reason in stats_and_skipped(optimize(mlp(), sparsity=0.5))[1])


def stats_and_skipped(result) -> tuple[dict, list[str]]:
    record = next(p for p in result.report["passes"] if p["pass"] == "omp")
    return record["stats"], record["skipped"]


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_exported(exporter: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                           nn.Flatten(), nn.Linear(8 * 36, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    path = export_onnx(module, torch.randn(1, 3, 6, 6), tmp_path / "net.onnx", exporter=exporter, opset=17, fold_bn=True)
    model = onnx.load(str(path))
    result = optimize(model, sparsity=0.9, omp_scope="layer")
    found = stats(result)
    assert found["layers_pruned"] == 4 and found["sparsity_pruned_layers"] == pytest.approx(0.9, abs=2e-3)
    assert result.report["fidelity"]["samples"] > 0
    assert result.report["weight_sparsity"]["overall"] > 0.8

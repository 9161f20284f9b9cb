"""`--device cuda`: calibration, fidelity checks and timings on onnxruntime-gpu's CUDA provider.

These tests need onnxruntime-gpu and an NVIDIA GPU; elsewhere they are skipped with the reason. What runs
without a GPU is the fallback: asking for CUDA where onnxruntime has no CUDA provider runs on the CPU and
says so."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt import api
from graphopt.calibration.session import make_session, providers, runtime
from graphopt.calibration.stats import KINDS, StatRequest
from tests.calibration.helpers import collect

ROOT = Path(__file__).resolve().parent.parent
SAMPLE, CALIB = ROOT / "samples" / "digits_cnn.onnx", ROOT / "samples" / "digits_calib.npz"
HAS_CUDA = "CUDAExecutionProvider" in runtime().get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime offers no CUDAExecutionProvider here "
                                "(needs onnxruntime-gpu and an NVIDIA GPU)")


def wide_model(channels: int = 128, seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 (channels -> channels) + Relu + Conv 1x1 + GlobalAveragePool + Gemm: wide enough that TF32
    products (about 1e-3 relative) would show against float32."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels),
             "b1": rng.standard_normal(channels) * 0.1,
             "w2": rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels),
             "w3": rng.standard_normal((10, channels)) / np.sqrt(channels)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", 1, ["N", channels, 16, 16])],
                              [helper.make_tensor_value_info("y", 1, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def feed(model: onnx.ModelProto, batch: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return {"x": np.random.default_rng(seed).standard_normal((batch, channels, 16, 16)).astype(np.float32)}


def test_cuda_without_its_provider_runs_on_cpu_and_says_so(monkeypatch, caplog):
    ort = runtime()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING):
        assert providers("cuda") == ["CPUExecutionProvider"]
    assert "CUDA requested" in caplog.text


@needs_cuda
def test_exact_cuda_session_computes_in_float32():
    """Sessions without graph optimisation (references, fidelity checks) turn TF32 off: a 128-channel conv
    stack agrees with the CPU to float32 rounding, not to TF32's 1e-3."""
    model = wide_model()
    inputs = feed(model)
    session = make_session(model, device="cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    on_gpu = session.run(None, inputs)[0].astype(np.float64)
    on_cpu = make_session(model).run(None, inputs)[0].astype(np.float64)
    assert np.linalg.norm(on_gpu - on_cpu) / np.linalg.norm(on_cpu) < 2e-5


@needs_cuda
def test_calibration_statistics_on_cuda_match_cpu():
    model = wide_model()
    data = feed(model, batch=32)
    requests = [StatRequest("r1", KINDS, 1), StatRequest("f", KINDS, 1)]
    on_cpu = collect(model, data, requests, batch_size=8)
    on_gpu = collect(model, data, requests, batch_size=8, device="cuda")
    for name, stats in on_cpu.items():
        assert on_gpu[name].count == stats.count
        gram, found = stats.gram(), on_gpu[name].gram()
        assert np.abs(found - gram).max() <= 1e-2 * np.abs(gram).max(), name  # TF32 is allowed in calibration
        np.testing.assert_allclose(on_gpu[name].mean, stats.mean, rtol=1e-2, atol=1e-3 * np.abs(stats.mean).max())


@needs_cuda
def test_optimize_on_cuda_checks_fidelity_and_times_there():
    """snp on the sample with --device cuda: the fidelity measured on CUDA close to the same run's on the
    CPU, verify on CUDA agreeing with optimize's check, and --bench timed on CUDA."""
    gpu = api.optimize(str(SAMPLE), method="snp", calib=str(CALIB), target_macs=0.7, device="cuda", bench=True)
    cpu = api.optimize(str(SAMPLE), method="snp", calib=str(CALIB), target_macs=0.7)
    report = gpu.report
    assert report["target_reached"]
    assert report["latency"]["batch_1"]["providers"][0] == "CUDAExecutionProvider"
    assert abs(report["fidelity"]["cosine"] - cpu.report["fidelity"]["cosine"]) < 0.05
    check = api.verify(str(SAMPLE), gpu.model, str(CALIB), device="cuda").to_json()
    assert check["cosine"] == pytest.approx(report["fidelity"]["cosine"], abs=1e-5)


@needs_cuda
def test_auto_rounding_on_cuda_keeps_blocks_of_eight():
    model = wide_model()
    result = api.optimize(model, method="snp", calib=feed(model, batch=64), target_macs=0.5, device="cuda")
    assert result.report["target_reached"]
    kept = {init.name: init.dims[0] for init in result.model.graph.initializer if init.name in ("w1", "w2")}
    assert kept and all(count % 8 == 0 and count < 128 for count in kept.values()), kept


@needs_cuda
def test_bench_cli_on_cuda(tmp_path):
    found = subprocess.run([sys.executable, "-m", "graphopt.cli", "bench", str(SAMPLE), str(SAMPLE), "--device", "cuda",
                            "--repeat", "5", "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    result = json.loads(found.stdout)
    assert result["providers"][0] == "CUDAExecutionProvider"
    assert result["rounds"] == 5 and result["batch"] == 1  # the side-by-side timing ran as asked (no timing asserted)

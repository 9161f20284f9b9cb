"""graphopt.ExPruneLinearRelu: function body against the numpy reference, never-firing thresholds against
dense MatMul+ReLU, and the native kernel (where it can be built) against the function body."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ops.exprune import exprune_reference, make_exprune_node
from graphopt.ops.functions import ensure_functions
from tests.conftest import run_ort

D, N, M = 48, 24, 12


def _layer(seed: int = 0, tau: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((N, D)).astype(np.float32), "B": rng.standard_normal(N).astype(np.float32),
            "Tau": (rng.standard_normal(N) if tau is None else tau).astype(np.float32),
            "Perm": rng.permutation(D).astype(np.int64)}


def _model(params: dict[str, np.ndarray], shape: list[int | str], m: int = M, opset: int = 17,
           checkpoints: list[int] | None = None) -> onnx.ModelProto:
    rule = "threshold" if checkpoints is None else "sequential"
    node = make_exprune_node(["x", "W", "B", "Tau", "Perm"], "y", m, rule=rule, checkpoints=checkpoints)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], N])],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ensure_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(kind: str, shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32)
    if kind == "all_negative":  # every pre-activation negative: large negative inputs on a positive layer
        return -np.abs(values) * 100.0
    if kind == "extreme":
        return (values * 1e3).astype(np.float32)
    return values


def _layer_for(kind: str) -> dict[str, np.ndarray]:
    params = _layer()
    if kind in ("all_negative", "all_positive"):
        params["W"] = np.abs(params["W"])
        params["B"] = np.abs(params["B"])
    return params


@pytest.mark.parametrize("opset", [15, 18])
@pytest.mark.parametrize("shape", [(1, D), (7, D), (2, 3, D)])
@pytest.mark.parametrize("kind", ["random", "all_negative", "all_positive", "extreme"])
def test_function_body_matches_reference(opset: int, shape: tuple[int, ...], kind: str) -> None:
    params = _layer_for(kind)
    x = np.abs(_inputs(kind, shape)) if kind == "all_positive" else _inputs(kind, shape)
    got = run_ort(_model(params, ["N", *shape[1:]], opset=opset), {"x": x})["y"]
    want, skipped = exprune_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], M)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert 0 < skipped.mean() < 1 or kind != "random"


def test_thresholds_that_never_fire_give_dense_relu() -> None:
    params = _layer(tau=np.full(N, -np.inf))
    x = _inputs("random", (5, D))
    got = run_ort(_model(params, ["N", D]), {"x": x})["y"]
    original = np.empty_like(params["W"])
    original[:, params["Perm"]] = params["W"]  # undo the column permutation: the layer as it was
    np.testing.assert_allclose(got, np.maximum(x @ original.T + params["B"], 0), rtol=1e-5, atol=1e-5)


def test_unknown_rule_and_bad_checkpoints_are_refused() -> None:
    with pytest.raises(ValueError, match="rule"):
        make_exprune_node(["x", "W", "B", "Tau", "Perm"], "y", M, rule="wald")
    with pytest.raises(ValueError, match="single checkpoint"):
        make_exprune_node(["x", "W", "B", "Tau", "Perm"], "y", M, checkpoints=[M, 2 * M])
    with pytest.raises(ValueError, match="increase strictly"):
        make_exprune_node(["x", "W", "B", "Tau", "Perm"], "y", M, rule="sequential", checkpoints=[M, M])


SEQUENTIAL = [M, 2 * M, 3 * M]


@pytest.mark.parametrize("shape", [(1, D), (7, D), (2, 3, D)])
@pytest.mark.parametrize("opset", [15, 18])
def test_sequential_body_matches_reference(shape: tuple[int, ...], opset: int) -> None:
    params = _layer(tau=-np.abs(np.random.default_rng(3).standard_normal(N)) * 2)
    x = _inputs("random", shape)
    got = run_ort(_model(params, ["N", *shape[1:]], opset=opset, checkpoints=SEQUENTIAL), {"x": x})["y"]
    want, skipped = exprune_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], M, SEQUENTIAL)
    first_only = exprune_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], M)[1]
    assert skipped.sum() > first_only.sum()  # later checkpoints fire where the first did not
    assert np.all(skipped >= first_only)  # f_1 = 1: the first checkpoint is the threshold rule
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sequential_boundary_factors_shrink_to_the_standard_error() -> None:
    from graphopt.ops.exprune import boundary_factors

    factors = boundary_factors(100, [25, 50, 75])
    np.testing.assert_allclose(factors, [1.0, np.sqrt(50 * 25 / (50 * 75)), np.sqrt(25 * 25 / (75 * 75))], rtol=1e-6)


# --- native kernel ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphopt.ops.build import build_library, default_library

    if default_library().is_file():
        return default_library()
    built = build_library(tmp_path_factory.mktemp("ops") / "libgraphopt_ops.so", download=False)
    if built.library is None:
        pytest.skip(f"native kernel not built: {built.reason}")
    return built.library


def _kernel_session(model: onnx.ModelProto, library: Path, optimize: bool) -> ort.InferenceSession:
    from graphopt.ops import session_options

    options = session_options(library)
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [(1, D), (9, D), (2, 3, D)])
@pytest.mark.parametrize("kind", ["random", "all_negative", "all_positive", "extreme"])
def test_kernel_matches_function_body(kernel_library: Path, shape: tuple[int, ...], kind: str) -> None:
    params = _layer_for(kind)
    x = np.abs(_inputs(kind, shape)) if kind == "all_positive" else _inputs(kind, shape)
    model = _model(params, ["N", *shape[1:]])
    body = run_ort(model, {"x": x})["y"]
    kernel = _kernel_session(model, kernel_library, optimize=False).run(None, {"x": x})[0]
    assert kernel.shape == body.shape
    np.testing.assert_array_equal(kernel == 0, body == 0)  # the same skip decisions
    scale = max(1.0, float(np.abs(body).max()))
    np.testing.assert_allclose(kernel, body, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("optimize", [False, True])
def test_onnxruntime_runs_the_kernel_over_the_function_body(kernel_library: Path, optimize: bool) -> None:
    library = ctypes.CDLL(str(kernel_library))  # the same handle onnxruntime dlopen()ed: one counter
    library.graphopt_exprune_calls.restype = ctypes.c_int64
    session = _kernel_session(_model(_layer(), ["N", D]), kernel_library, optimize)
    before = library.graphopt_exprune_calls()
    for _ in range(3):
        session.run(None, {"x": _inputs("random", (2, D))})
    assert library.graphopt_exprune_calls() - before == 3


def test_make_session_loads_the_kernel_for_graphopt_models(kernel_library: Path, monkeypatch) -> None:
    from graphopt.calibration.session import make_session

    monkeypatch.setenv("GRAPHOPT_OPS_LIBRARY", str(kernel_library))
    library = ctypes.CDLL(str(kernel_library))
    library.graphopt_exprune_calls.restype = ctypes.c_int64
    before = library.graphopt_exprune_calls()
    make_session(_model(_layer(), ["N", D])).run(None, {"x": _inputs("random", (1, D))})
    assert library.graphopt_exprune_calls() - before == 1


def test_build_without_headers_says_why(tmp_path: Path) -> None:
    from graphopt.ops.build import build_library

    built = build_library(tmp_path / "lib.so", ort_include=tmp_path)
    assert built.library is None and "onnxruntime_cxx_api.h" in built.reason

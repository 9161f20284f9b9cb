"""graphopt.ExPruneConvRelu: function body against the numpy reference (outputs and skip decisions) over
convolution geometries, batch sizes, rules and adversarial inputs; never-firing thresholds against Conv+ReLU."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ops.exprune import doubling_checkpoints
from graphopt.ops.exprune_conv import exprune_conv_reference, im2col, make_exprune_conv_node, receptive_fields
from graphopt.ops.library import ensure_functions
from tests.conftest import run_ort
from tests.ops.conftest import kernel_session

C, M, K, H, W = 12, 8, 3, 9, 10
PROBE = 3
SEQUENTIAL = doubling_checkpoints(C, PROBE)  # [3, 6]

# (strides, pads [top, left, bottom, right], dilations, opset)
GEOMETRIES = {
    "same": ([1, 1], [1, 1, 1, 1], [1, 1], 17),
    "strided_asymmetric": ([2, 1], [0, 1, 2, 0], [1, 2], 18),
    "valid_dilated": ([1, 2], [0, 0, 0, 0], [2, 1], 15),
}


def _layer(kind: str = "random", tau: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {"W": rng.standard_normal((M, C, K, K)).astype(np.float32),
              "B": rng.standard_normal(M).astype(np.float32),
              "Tau": (rng.standard_normal(M) * 2 if tau is None else tau).astype(np.float32),
              "Perm": rng.permutation(C).astype(np.int64)}
    if kind in ("all_negative", "all_positive"):
        params["W"], params["B"] = np.abs(params["W"]), np.abs(params["B"])
    return params


def _inputs(kind: str, batch: int, seed: int = 1) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((batch, C, H, W)).astype(np.float32)
    if kind == "all_negative":  # every pre-activation negative on a positive layer
        return -np.abs(values) * 100.0
    if kind == "all_positive":
        return np.abs(values)
    if kind == "extreme":
        return (values * 1e3).astype(np.float32)
    return values


def _model(params: dict[str, np.ndarray], geometry: str, checkpoints: list[int] | None = None) -> onnx.ModelProto:
    strides, pads, dilations, opset = GEOMETRIES[geometry]
    rule = "threshold" if checkpoints is None else "sequential"
    node = make_exprune_conv_node(["x", "W", "B", "Tau", "Perm"], "y", PROBE, strides, pads, dilations, rule=rule,
                                  checkpoints=checkpoints)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M, "h", "w"])],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ensure_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _reference(x: np.ndarray, params: dict[str, np.ndarray], geometry: str,
               checkpoints: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    strides, pads, dilations, _ = GEOMETRIES[geometry]
    return exprune_conv_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], PROBE, checkpoints,
                                  strides, pads, dilations)


def _dense(x: np.ndarray, params: dict[str, np.ndarray], geometry: str) -> np.ndarray:
    """Conv(X, W_orig) + B in float64, W_orig being W with its input channels un-permuted."""
    strides, pads, dilations, _ = GEOMETRIES[geometry]
    original = np.empty_like(params["W"])
    original[:, params["Perm"]] = params["W"]
    cols = im2col(x, (K, K), strides, pads, dilations)
    return np.einsum("nyxcab,mcab->nmyx", cols, original.astype(np.float64)) + params["B"][None, :, None, None]


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_receptive_fields_at_chosen_positions_are_those_rows_of_im2col(geometry: str) -> None:
    """Calibration gathers the fields of sampled positions only; they must be exactly im2col's rows."""
    strides, pads, dilations, _ = GEOMETRIES[geometry]
    x = np.random.default_rng(3).standard_normal((3, C, H, W)).astype(np.float32)
    every = receptive_fields(x, (K, 2), strides, pads, dilations)
    cols = im2col(x, (K, 2), strides, pads, dilations)
    assert every.shape == (cols.shape[0] * cols.shape[1] * cols.shape[2], C, K, 2)
    rows = np.sort(np.random.default_rng(4).choice(every.shape[0], 17, replace=False))
    np.testing.assert_array_equal(receptive_fields(x, (K, 2), strides, pads, dilations, rows), every[rows])


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["random", "all_negative", "all_positive", "extreme"])
@pytest.mark.parametrize("rule", ["threshold", "sequential"])
def test_function_body_matches_reference(geometry: str, batch: int, kind: str, rule: str) -> None:
    params = _layer(kind)
    checkpoints = SEQUENTIAL if rule == "sequential" else None
    x = _inputs(kind, batch)
    got = run_ort(_model(params, geometry, checkpoints), {"x": x})["y"]
    want, skipped = _reference(x, params, geometry, checkpoints)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got == 0, want == 0)  # the same decisions wherever they change the output
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    pre = _dense(x, params, geometry)
    if kind in ("random", "extreme"):  # decisions that matter: positive positions predicted negative
        assert 0 < skipped.mean() < 1 and np.any(skipped & (pre > 0))
    if kind == "all_negative":
        assert np.all(got == 0)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_later_checkpoints_fire_where_the_first_did_not(geometry: str) -> None:
    params = _layer(tau=-np.abs(np.random.default_rng(3).standard_normal(M)) * 8)
    x = _inputs("random", 2)
    got = run_ort(_model(params, geometry, SEQUENTIAL), {"x": x})["y"]
    want, skipped = _reference(x, params, geometry, SEQUENTIAL)
    first_only = _reference(x, params, geometry)[1]
    assert skipped.sum() > first_only.sum() and np.all(skipped >= first_only)  # f_{k_1} = 1
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("rule", ["threshold", "sequential"])
def test_thresholds_that_never_fire_give_conv_relu(geometry: str, rule: str) -> None:
    params = _layer(tau=np.full(M, -np.inf))
    checkpoints = SEQUENTIAL if rule == "sequential" else None
    x = _inputs("random", 2)
    got = run_ort(_model(params, geometry, checkpoints), {"x": x})["y"]
    reference, skipped = _reference(x, params, geometry, checkpoints)
    assert not skipped.any()
    strides, pads, dilations, opset = GEOMETRIES[geometry]
    original = np.empty_like(params["W"])
    original[:, params["Perm"]] = params["W"]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["z"], strides=strides, pads=pads, dilations=dilations),
             helper.make_node("Relu", ["z"], ["y"])]
    dense = helper.make_model(helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M, "h", "w"])],
        [numpy_helper.from_array(original, "w"), numpy_helper.from_array(params["B"], "b")]),
        opset_imports=[helper.make_opsetid("", opset)])
    want = run_ort(dense, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference, np.maximum(_dense(x, params, geometry), 0), rtol=1e-6, atol=1e-6)


def test_bad_attributes_are_refused() -> None:
    inputs = ["x", "W", "B", "Tau", "Perm"]
    with pytest.raises(ValueError, match="2-D"):
        make_exprune_conv_node(inputs, "y", PROBE, [1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match="single checkpoint"):
        make_exprune_conv_node(inputs, "y", PROBE, [1, 1], [0] * 4, [1, 1], checkpoints=[PROBE, 2 * PROBE])
    with pytest.raises(ValueError, match="rule"):
        make_exprune_conv_node(inputs, "y", PROBE, [1, 1], [0] * 4, [1, 1], rule="wald")


def test_function_needs_opset_15() -> None:
    from graphopt.ops.exprune_conv import build_exprune_conv_function

    with pytest.raises(ValueError, match="opset >= 15"):
        build_exprune_conv_function(13)


# --- native kernel ---------------------------------------------------------------------------------
# Layers wider than one weight panel (8 output channels, the last one partial), rows longer than one tile of
# positions, 1x1 and 3x3 kernels, the direct path (stride 1, also dilated) and the gathered one (strides), and
# each tile shape the kernel picks (AVX-512: square tiles of 3 rows on the 48-wide outputs, strips of 32
# slots on the others).

KERNEL_GEOMETRIES = {  # (kernel, strides, pads, dilations, H, W)
    "same": (3, [1, 1], [1, 1, 1, 1], [1, 1], 11, 37),
    "same_dilated": (3, [1, 1], [2, 1, 2, 1], [2, 1], 9, 20),
    "pointwise": (1, [1, 1], [0, 0, 0, 0], [1, 1], 7, 7),
    "strided": (3, [2, 2], [1, 1, 1, 1], [1, 1], 12, 35),
    "strided_asymmetric": (3, [2, 1], [0, 1, 2, 0], [1, 2], 9, 10),
    "wide": (3, [1, 1], [1, 1, 1, 1], [1, 1], 12, 48),
    "strided_wide": (3, [2, 2], [1, 1, 1, 1], [1, 1], 24, 96),
}
KC, KM = 20, 19


def _kernel_case(geometry: str, batch: int, exact: bool, seed: int = 4,
                 checkpoints: list[int] | None = None) -> tuple[onnx.ModelProto, np.ndarray, dict[str, np.ndarray]]:
    """A layer and its input; `exact`: small integers, so every partial sum is exact in float32 in any order."""
    k, strides, pads, dilations, h, w = KERNEL_GEOMETRIES[geometry]
    rng = np.random.default_rng(seed)
    if exact:
        weight, x = rng.integers(-4, 5, (KM, KC, k, k)), rng.integers(-4, 5, (batch, KC, h, w))
        bias, tau = rng.integers(-20, 21, KM), rng.standard_normal(KM) * 4 * np.sqrt(KC * k * k)
    else:
        weight, x = rng.standard_normal((KM, KC, k, k)), rng.standard_normal((batch, KC, h, w))
        bias, tau = rng.standard_normal(KM), rng.standard_normal(KM) * 2
    params = {"W": weight.astype(np.float32), "B": bias.astype(np.float32), "Tau": tau.astype(np.float32),
              "Perm": rng.permutation(KC).astype(np.int64)}
    rule = "threshold" if checkpoints is None else "sequential"
    node = make_exprune_conv_node(["x", *params], "y", 5, strides, pads, dilations, rule=rule, checkpoints=checkpoints)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", KC, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, n) for n, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ensure_functions(model)
    return model, x.astype(np.float32), params


@pytest.mark.parametrize("geometry", sorted(KERNEL_GEOMETRIES))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("checkpoints", [None, [5, 10, 15]])
def test_kernel_decides_as_the_function_body_on_exact_sums(kernel_library: Path, geometry: str, batch: int,
                                                           checkpoints: list[int] | None) -> None:
    model, x, params = _kernel_case(geometry, batch, exact=True, checkpoints=checkpoints)
    body = run_ort(model, {"x": x})["y"]
    got = kernel_session(model, kernel_library, optimize=False).run(None, {"x": x})[0]
    k, strides, pads, dilations, _, _ = KERNEL_GEOMETRIES[geometry]
    want, skipped = exprune_conv_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], 5, checkpoints,
                                           strides, pads, dilations)
    assert 0.1 < skipped.mean() < 0.9  # decisions both ways
    np.testing.assert_array_equal(got, want)  # integer sums: exact, whatever the order
    np.testing.assert_array_equal(body, want)


@pytest.mark.parametrize("geometry", sorted(KERNEL_GEOMETRIES))
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_the_function_body_on_float_data(kernel_library: Path, geometry: str, threads: int) -> None:
    model, x, _ = _kernel_case(geometry, 3, exact=False)
    body = run_ort(model, {"x": x})["y"]
    got = kernel_session(model, kernel_library, optimize=True, threads=threads).run(None, {"x": x})[0]
    assert got.shape == body.shape
    assert np.mean((got == 0) != (body == 0)) < 1e-3  # a score within rounding of its boundary may differ
    same = (got == 0) == (body == 0)
    np.testing.assert_allclose(got[same], body[same], rtol=1e-5, atol=1e-5 * float(np.abs(body).max()))


def test_kernel_never_firing_is_conv_relu(kernel_library: Path) -> None:
    model, x, params = _kernel_case("same", 2, exact=False)
    tau = next(t for t in model.graph.initializer if t.name == "Tau")
    tau.CopyFrom(numpy_helper.from_array(np.full(KM, -np.inf, dtype=np.float32), "Tau"))
    got = kernel_session(model, kernel_library, optimize=True).run(None, {"x": x})[0]
    original = np.empty_like(params["W"])
    original[:, params["Perm"]] = params["W"]
    cols = im2col(x, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1])
    want = np.maximum(np.einsum("nyxcab,mcab->nmyx", cols, original.astype(np.float64)) + params["B"][None, :, None,
                                                                                                     None], 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimize", [False, True])
def test_onnxruntime_runs_the_conv_kernel_over_the_function_body(kernel_library: Path, optimize: bool) -> None:
    library = ctypes.CDLL(str(kernel_library))  # the handle onnxruntime dlopen()ed: one counter
    library.graphopt_exprune_conv_calls.restype = ctypes.c_int64
    model, x, _ = _kernel_case("same", 1, exact=False)
    session = kernel_session(model, kernel_library, optimize)
    before = library.graphopt_exprune_conv_calls()
    for _ in range(3):
        session.run(None, {"x": x})
    assert library.graphopt_exprune_conv_calls() - before == 3


def test_kernel_refuses_checkpoints_past_the_channels(kernel_library: Path) -> None:
    model, x, _ = _kernel_case("same", 1, exact=False, checkpoints=[5, 10, KC])  # the last is not below C
    with pytest.raises(Exception, match="ExPruneConvRelu: checkpoints must stay below C"):
        kernel_session(model, kernel_library, optimize=False).run(None, {"x": x})

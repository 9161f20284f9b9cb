"""graphopt.ExPruneLinearRelu: function body against the numpy reference, never-firing thresholds against
dense MatMul+ReLU, and the native kernel (where it can be built) against the function body."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ops.exprune import exprune_reference, make_exprune_node
from graphopt.ops.library import ensure_functions
from tests.conftest import run_ort
from tests.ops.conftest import kernel_session

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
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], len(params["W"])])],
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

@pytest.mark.parametrize("shape", [(1, D), (9, D), (2, 3, D)])
@pytest.mark.parametrize("kind", ["random", "all_negative", "all_positive", "extreme"])
def test_kernel_matches_function_body(kernel_library: Path, shape: tuple[int, ...], kind: str) -> None:
    params = _layer_for(kind)
    x = np.abs(_inputs(kind, shape)) if kind == "all_positive" else _inputs(kind, shape)
    model = _model(params, ["N", *shape[1:]])
    body = run_ort(model, {"x": x})["y"]
    kernel = kernel_session(model, kernel_library, optimize=False).run(None, {"x": x})[0]
    assert kernel.shape == body.shape
    np.testing.assert_array_equal(kernel == 0, body == 0)  # the same skip decisions
    scale = max(1.0, float(np.abs(body).max()))
    np.testing.assert_allclose(kernel, body, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("optimize", [False, True])
def test_onnxruntime_runs_the_kernel_over_the_function_body(kernel_library: Path, optimize: bool) -> None:
    library = ctypes.CDLL(str(kernel_library))  # the same handle onnxruntime dlopen()ed: one counter
    library.graphopt_exprune_calls.restype = ctypes.c_int64
    session = kernel_session(_model(_layer(), ["N", D]), kernel_library, optimize)
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


# Integer-valued weights and inputs (times a power of two): every partial sum is exact in float32 whatever
# the summation order, so the kernel and the function body see the same scores and must decide alike
# on every one of thousands of decisions (float data would leave the odd near-tie to rounding).

def _exact_layer(d: int, n: int, kind: str, seed: int = 5) -> tuple[dict[str, np.ndarray], float]:
    rng = np.random.default_rng(seed)
    w = rng.integers(-8, 9, (n, d)).astype(np.float32)
    b = rng.integers(-40, 41, n).astype(np.float32)
    if kind == "all_positive":
        w, b = np.abs(w), np.abs(b)
    unit = 1024.0 if kind == "extreme" else 1.0  # a power of two keeps the sums exact
    spread = 4.0 * np.sqrt(d) * unit  # about the standard deviation of a score
    tau = (rng.standard_normal(n) * spread).astype(np.float32)
    return {"W": w * np.float32(unit), "B": b * np.float32(unit), "Tau": tau,
            "Perm": rng.permutation(d).astype(np.int64)}, unit


def _exact_inputs(kind: str, shape: tuple[int, ...], unit: float, seed: int = 6) -> np.ndarray:
    values = np.random.default_rng(seed).integers(-8, 9, shape).astype(np.float32)
    if kind == "all_negative":
        values = -np.abs(values) - 1
    if kind == "all_positive":
        values = np.abs(values)
    return values * np.float32(unit)


def _exact_model(params: dict[str, np.ndarray], d: int, checkpoints: list[int]) -> onnx.ModelProto:
    return _model(params, ["N", d], m=checkpoints[0], checkpoints=None if len(checkpoints) == 1 else checkpoints)


# d not a multiple of the vector width, n not a multiple of the neuron tile, rows beyond the row block
@pytest.mark.parametrize("d,n,rows", [(45, 23, 1), (45, 23, 37), (301, 531, 1), (301, 67, 70)])
@pytest.mark.parametrize("kind", ["random", "all_negative", "all_positive", "extreme"])
def test_kernel_sequential_decides_as_the_function_body(kernel_library: Path, d: int, n: int, rows: int,
                                                        kind: str) -> None:
    from graphopt.ops.exprune import checkpoint_scores, doubling_checkpoints

    ks = doubling_checkpoints(d, d // 5) + [d - 3]
    params, unit = _exact_layer(d, n, kind)
    if kind == "all_negative":  # every neuron negative and fired at the first checkpoint
        params["W"], params["B"] = np.abs(params["W"]), -np.abs(params["B"])
    x = _exact_inputs(kind, (rows, d), unit)
    model = _exact_model(params, d, ks)
    body = run_ort(model, {"x": x})["y"]
    want, skipped = exprune_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], ks[0], ks)
    np.testing.assert_array_equal(body == 0, want == 0)
    outputs = [kernel_session(model, kernel_library, optimize=True, threads=threads).run(None, {"x": x})[0]
               for threads in (1, 2)]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # neuron chunks on the pool change nothing
    np.testing.assert_array_equal(outputs[0] == 0, body == 0)  # the same skip decisions
    np.testing.assert_allclose(outputs[0], body, rtol=1e-6, atol=0)  # exact sums: equal up to the scaling
    if kind == "random":  # the later checkpoints do fire: the test exercises the continued dot products
        scores = checkpoint_scores(x[:, params["Perm"]], params["W"], params["B"], ks)
        first = scores[..., 0] < params["Tau"]
        assert skipped.sum() > first.sum() > 0 and not skipped.all()
    if kind == "all_negative":
        assert skipped.all()
    if kind == "all_positive":
        assert not skipped.any()


@pytest.mark.parametrize("rows", [1, 6, 33])
def test_kernel_threshold_rule_matches_the_function_body_exactly(kernel_library: Path, rows: int) -> None:
    params, unit = _exact_layer(77, 45, "random", seed=rows)
    x = _exact_inputs("random", (rows, 77), unit, seed=rows + 1)
    model = _exact_model(params, 77, [19])
    body = run_ort(model, {"x": x})["y"]
    kernel = kernel_session(model, kernel_library, optimize=False, threads=2).run(None, {"x": x})[0]
    assert 0 < np.mean(kernel == 0) < 1
    np.testing.assert_array_equal(kernel == 0, body == 0)
    np.testing.assert_allclose(kernel, body, rtol=1e-6, atol=0)


def test_kernel_packs_its_gemm_panels_on_the_first_multi_row_call(kernel_library: Path) -> None:
    """Batch 1 reads the probe panels and packed tails made with the kernel; the GEMM panels of batch > 1 are
    packed by the first call of several rows, also when several threads make that call at once; every call,
    before and after, decides as the function body."""
    from concurrent.futures import ThreadPoolExecutor

    params, unit = _exact_layer(77, 45, "random", seed=11)
    model = _exact_model(params, 77, [19, 38])
    session = kernel_session(model, kernel_library, optimize=True, threads=2)
    feeds = [_exact_inputs("random", (rows, 77), unit, seed=20 + i) for i, rows in enumerate([1, 9, 9, 9, 9, 1, 33])]

    def check(x: np.ndarray) -> None:
        body = run_ort(model, {"x": x})["y"]
        kernel = session.run(None, {"x": x})[0]
        np.testing.assert_array_equal(kernel == 0, body == 0)
        np.testing.assert_allclose(kernel, body, rtol=1e-6, atol=0)

    check(feeds[0])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, feeds[1:5]))
    check(feeds[5])
    check(feeds[6])


@pytest.mark.parametrize("rows", [1, 13])
def test_kernel_with_thresholds_that_never_fire_is_dense(kernel_library: Path, rows: int) -> None:
    d, n = 301, 67
    params = _layer_with(d, n, tau=np.full(n, -np.inf, dtype=np.float32))
    x = np.random.default_rng(2).standard_normal((rows, d)).astype(np.float32)
    model = _model(params, ["N", d], m=37, checkpoints=[37, 74, 148])
    kernel = kernel_session(model, kernel_library, optimize=True, threads=2).run(None, {"x": x})[0]
    original = np.empty_like(params["W"])
    original[:, params["Perm"]] = params["W"]
    np.testing.assert_allclose(kernel, np.maximum(x.astype(np.float64) @ original.T + params["B"], 0),
                               rtol=1e-5, atol=1e-5)


def test_kernel_reads_a_model_without_the_checkpoints_attribute_as_threshold(kernel_library: Path) -> None:
    params = _layer()
    model = _model(params, ["N", D])
    attributes = model.graph.node[0].attribute
    del attributes[[a.name for a in attributes].index("checkpoints")]  # as written before the attribute existed
    x = _inputs("random", (3, D))
    kernel = kernel_session(model, kernel_library, optimize=False).run(None, {"x": x})[0]
    want, skipped = exprune_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], M)
    assert 0 < skipped.mean() < 1
    np.testing.assert_array_equal(kernel == 0, want == 0)
    np.testing.assert_allclose(kernel, want, rtol=1e-5, atol=1e-5)


def _layer_with(d: int, n: int, tau: np.ndarray, seed: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((n, d)).astype(np.float32), "B": rng.standard_normal(n).astype(np.float32),
            "Tau": tau.astype(np.float32), "Perm": rng.permutation(d).astype(np.int64)}


def test_build_without_headers_says_why(tmp_path: Path) -> None:
    from graphopt.ops.build import build_library

    built = build_library(tmp_path / "lib.so", ort_include=tmp_path)
    assert built.library is None and "onnxruntime_cxx_api.h" in built.reason


@pytest.mark.parametrize("rows", [1, 5])
def test_kernel_with_w_fed_at_run_time_decides_as_the_function_body(kernel_library: Path, rows: int) -> None:
    # a W that is not a constant cannot be packed when the kernel is created: the row-wise path runs
    from graphopt.ops.exprune import doubling_checkpoints

    d, n = 301, 131
    ks = doubling_checkpoints(d, 37)
    params, unit = _exact_layer(d, n, "random", seed=11)
    model = _exact_model(params, d, ks)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(weight)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [n, d]))
    feed = {"x": _exact_inputs("random", (rows, d), unit, seed=12), "W": params["W"]}
    body = run_ort(model, feed)["y"]
    kernel = kernel_session(model, kernel_library, optimize=False, threads=1).run(None, feed)[0]
    assert 0 < np.mean(kernel == 0) < 1
    np.testing.assert_array_equal(kernel == 0, body == 0)
    np.testing.assert_allclose(kernel, body, rtol=1e-6, atol=0)


def test_a_node_written_before_checkpoints_existed_keeps_the_threshold_rule() -> None:
    from graphopt.ops.exprune import build_exprune_function

    params = _layer()
    x = _inputs("random", (7, D))
    model = _model(params, ["N", D])
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "checkpoints"]
    del node.attribute[:]
    node.attribute.extend(kept)  # as the first release wrote it: m and rule only
    older = build_exprune_function(17)
    del older.attribute_proto[:]  # what the first release declared: m and rule
    del model.functions[:]
    model.functions.append(older)
    ensure_functions(model)  # the copy lacks only a defaulted attribute: it is upgraded
    assert [len(f.attribute_proto) for f in model.functions] == [1]
    got = run_ort(model, {"x": x})["y"]
    want, skipped = exprune_reference(x, params["W"], params["B"], params["Tau"], params["Perm"], M)
    assert 0 < skipped.mean() < 1
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("written,want", [([M], [M]), ([M, 2 * M, 3 * M], [M, 2 * M, 3 * M]), (None, [M])])
def test_the_body_probes_each_checkpoint_once(written: list[int] | None, want: list[int]) -> None:
    from graphopt.ops.exprune import checkpoint_nodes
    from graphopt.ops.functions import DOMAIN

    constants = [helper.make_node("Constant", [], [name], **value) for name, value in
                 (("zero_1d", {"value_ints": [0]}), ("one_1d", {"value_ints": [1]}), ("zero_s", {"value_int": 0}),
                  ("one_s", {"value_int": 1}))]
    function = helper.make_function(DOMAIN, "Checkpoints", ["W"], ["ks"], [*constants, *checkpoint_nodes()],
                                    [helper.make_opsetid("", 17)], attributes=["m"],
                                    attribute_protos=[helper.make_attribute("checkpoints", [0])])
    attrs = {"m": M} if written is None else {"m": M, "checkpoints": written}  # None: a first-release node
    graph = helper.make_graph([helper.make_node("Checkpoints", ["W"], ["ks"], domain=DOMAIN, **attrs)], "g",
                              [helper.make_tensor_value_info("W", TensorProto.FLOAT, [N, D])],
                              [helper.make_tensor_value_info("ks", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              functions=[function])
    got = run_ort(model, {"W": np.zeros((N, D), np.float32)})["ks"]
    assert got.tolist() == want

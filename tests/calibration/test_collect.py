"""Calibration runs (graphopt/calibration/collect.py, capture.py) against direct numpy on small models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from graphopt.calibration import accumulate as accumulate_module
from graphopt.calibration.capture import TensorInfo, exposing_model, linear_inputs, plan_rounds
from graphopt.calibration.collect import Calibrator, parse_bytes
from graphopt.calibration.data import load_data
from graphopt.calibration.session import make_session
from graphopt.calibration.stats import KINDS, Spilled, StatRequest, TensorStats
from graphopt.errors import GraphoptError, OptionError
from graphopt.ir.graph import import_graph
from graphopt.passes.base import PassContext
from tests.calibration.helpers import collect

RNG_SEED = 0


def _model(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in weights.items())
    onnx.checker.check_model(model)
    return model


def conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED)
    return _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        conv (float[N, 3, 6, 6] x) => (float[N, 5] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            r = Relu(c)
            p = GlobalAveragePool(r)
            y = Flatten(p)
        }""", w=rng.standard_normal((5, 3, 3, 3)).astype(np.float32),
        b=rng.standard_normal(5).astype(np.float32))


def token_model() -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED + 1)
    return _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        tokens (float[N, T, 4] x, int64[N, T] mask) => (float[N, 3] y) {
            h = MatMul(x, w1)
            a = Relu(h)
            flat = Reshape(a, flat_shape)
            weight = Cast <to = 1> (mask)
            column = Unsqueeze(weight, last)
            kept = Mul(a, column)
            pooled = ReduceSum <keepdims = 0> (kept, token_axis)
            y = MatMul(pooled, w2)
        }""", w1=rng.standard_normal((4, 6)).astype(np.float32), w2=rng.standard_normal((6, 3)).astype(np.float32),
        flat_shape=np.array([-1, 6], dtype=np.int64), last=np.array([2], dtype=np.int64),
        token_axis=np.array([1], dtype=np.int64))


def mlp_model(scale: float = 1.0) -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED + 2)
    w1, w2, w3 = (rng.standard_normal(shape).astype(np.float32) for shape in [(5, 8), (8, 8), (8, 2)])
    return _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N, 5] x) => (float[N, 2] y) {
            h1 = MatMul(x, w1)
            a1 = Relu(h1)
            h2 = MatMul(a1, w2)
            a2 = Relu(h2)
            y = MatMul(a2, w3)
        }""", w1=w1, w2=(w2 * scale).astype(np.float32), w3=w3)


def conv_data(count: int = 11) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).standard_normal((count, 3, 6, 6)).astype(np.float32)}


def token_data(count: int = 11, tokens: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, tokens + 1, size=count)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((count, tokens, 4)).astype(np.float32) + 0.3, "mask": mask}


def reference_values(model: onnx.ModelProto, data: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """All requested tensors on all samples at once, from an unoptimised session."""
    computed = [n for n in names if n not in data]
    session = make_session(exposing_model(model, computed, {}))
    feeds = {i.name for i in session.get_inputs()}
    values = dict(zip(computed, session.run(computed, {k: v for k, v in data.items() if k in feeds}), strict=True))
    return {name: data[name] if name in data else values[name] for name in names}


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding of the activations (onnxruntime's kernels differ slightly by batch
    size and fusion), measured against the scale of the statistic."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))


def assert_stats_equal_numpy(stats: TensorStats, rows: np.ndarray) -> None:
    rows = rows.astype(np.float64)
    assert stats.count == rows.shape[0]
    _close(stats.mean, rows.mean(axis=0))
    _close(stats.var, rows.var(axis=0))
    _close(stats.abs_mean, np.abs(rows).mean(axis=0))
    np.testing.assert_array_equal(stats.negatives, (rows < 0).sum(axis=0))
    _close(stats.gram(), rows.T @ rows)
    _close(stats.covariance(), np.cov(rows.T, bias=True))


@pytest.mark.parametrize("batch_size", [1, 7])
def test_image_statistics_equal_numpy(batch_size: int) -> None:
    model, data = conv_model(), conv_data()
    names = ["x", "c", "r", "p", "y"]
    stats = collect(model, data, [StatRequest(n) for n in names], batch_size=batch_size)
    reference = reference_values(model, data, names)
    for name in names:
        value = reference[name]
        assert_stats_equal_numpy(stats[name], np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]))
        assert stats[name].channel_axis == 1 and not stats[name].masked
    assert stats["c"].count == 11 * 36 and stats["y"].count == 11


@pytest.mark.parametrize("batch_size", [1, 7])
def test_token_statistics_honour_the_attention_mask(batch_size: int) -> None:
    model, data = token_model(), token_data()
    keep = data["mask"].astype(bool)
    requests = [StatRequest("x", KINDS, -1), StatRequest("h", KINDS, 2), StatRequest("a", KINDS, -1),
                StatRequest("flat", KINDS, 1), StatRequest("pooled", KINDS, -1)]
    stats = collect(model, data, requests, batch_size=batch_size, mask_input="mask")
    reference = reference_values(model, data, ["x", "h", "a", "flat", "pooled"])
    for name in ["x", "h", "a"]:
        assert stats[name].masked
        assert_stats_equal_numpy(stats[name], reference[name][keep])
    assert stats["flat"].masked
    assert_stats_equal_numpy(stats["flat"], reference["flat"][keep.reshape(-1)])
    assert not stats["pooled"].masked  # one row per sample, not per token: every row counts
    assert_stats_equal_numpy(stats["pooled"], reference["pooled"])
    unmasked = collect(model, data, requests[:1], batch_size=batch_size)["x"]
    assert unmasked.count == 11 * 5 > stats["x"].count == keep.sum()


def test_rounds_under_a_small_memory_limit_give_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = conv_model(), conv_data()
    requests = [StatRequest(n) for n in ["x", "c", "r", "y"]]
    whole = collect(model, data, requests, batch_size=11)
    sessions: list[int] = []
    real_make_session = accumulate_module.make_session

    def counting_make_session(*args: object, **kwargs: object) -> object:
        sessions.append(1)
        return real_make_session(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(accumulate_module, "make_session", counting_make_session)
    bounded = collect(model, data, requests, batch_size=11, memory_limit=40_000)
    assert len(sessions) == 3  # c, r and y each in a round of their own; x comes from the data
    for name in ["x", "c", "r", "y"]:
        np.testing.assert_allclose(bounded[name].gram(), whole[name].gram(), rtol=1e-12)
        np.testing.assert_allclose(bounded[name].var, whole[name].var, rtol=1e-10)


def test_results_are_deterministic_whatever_the_number_of_threads() -> None:
    model, data = conv_model(), conv_data()
    requests = [StatRequest("x"), StatRequest("c"), StatRequest("r"), StatRequest("y")]
    first, again, threaded = (collect(model, data, requests, batch_size=4, threads=threads) for threads in (1, 1, 3))
    for name in first:
        for key, value in first[name].to_arrays().items():
            np.testing.assert_array_equal(again[name].to_arrays()[key], value)
            np.testing.assert_array_equal(threaded[name].to_arrays()[key], value)


def test_plan_rounds_packs_in_order_and_shrinks_batches_for_large_tensors() -> None:
    float32 = np.dtype(np.float32)
    infos = [TensorInfo(name, float32, (1, size), 1, False) for name, size in
             [("a", 100), ("b", 100), ("c", 1000), ("d", 10)]]
    # a and b together: 8 * 800 + 25 * 8 * 100 bytes; c alone needs 4000 + 25 * 1000 bytes per sample
    rounds = plan_rounds(infos, batch_size=8, budget=40_000)
    assert [r.tensors for r in rounds] == [["a", "b"], ["c"], ["d"]]
    assert [r.batch_size for r in rounds] == [8, 1, 8]


def test_linear_inputs_picks_activations_that_meet_constant_weights() -> None:
    model = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 4, 4] x, float[N, 4] t) => (float[N, 2, 4, 4] y, float[N, N] s, float[N, 2] u) {
            y = Conv(x, w)
            t2 = Transpose(t)
            s = MatMul(t, t2)
            tt = Transpose(t)
            u = Gemm <transA = 1> (tt, g)
        }""", w=np.ones((2, 3, 1, 1), np.float32), g=np.ones((4, 2), np.float32))
    found = {r.tensor: r.channel_axis for r in linear_inputs(model)}
    assert found == {"x": 1, "tt": 0}  # MatMul(t, t2) has no constant weight


def test_bad_requests_are_refused_with_one_clear_line() -> None:
    model, data = token_model(), token_data()
    cases = [([StatRequest("nowhere")], "no tensor named 'nowhere'"),
             ([StatRequest("w1")], "is a weight"),
             ([StatRequest("h", KINDS, 1), StatRequest("h", KINDS, 2)], "channel axes 1 and 2"),
             ([StatRequest("h", KINDS, 3)], "out of range")]
    for requests, message in cases:
        with pytest.raises(OptionError, match=message):
            collect(model, data, requests)
    integer = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2] x) => (int64[2] s) { s = Shape(x) }""")
    with pytest.raises(OptionError, match="floating-point"):
        collect(integer, {"x": np.ones((3, 2), np.float32)}, [StatRequest("s", KINDS, 0)])
    with pytest.raises(OptionError, match="mask input 'missing' is not"):
        collect(model, data, [StatRequest("h", KINDS, -1)], mask_input="missing")
    with pytest.raises(OptionError, match="alone need"):
        collect(model, data, [StatRequest("h", KINDS, -1)], memory_limit=100)
    assert parse_bytes("2GB") == 2 * 1024**3 and parse_bytes("1.5k") == 1536
    with pytest.raises(OptionError, match="--calib-memory"):
        parse_bytes("lots")


def test_sequential_mode_remeasures_only_what_a_rewrite_changed() -> None:
    """Layer k is measured on the model with layers < k rewritten; unchanged cones come from the cache."""
    data = {"x": np.random.default_rng(5).standard_normal((9, 5)).astype(np.float32)}
    requests = [StatRequest("a1", KINDS, -1), StatRequest("a2", KINDS, -1)]
    original = mlp_model()
    calibrator = Calibrator(load_data(data, original), batch_size=4)
    first = calibrator.statistics(original, requests)
    assert calibrator.computed == 2
    calibrator.statistics(original, requests[:1])
    assert calibrator.computed == 2  # nothing changed: all from the cache

    rewritten = mlp_model(scale=0.5)  # "layer 2" rewritten: a1 is upstream, a2 downstream
    for node in rewritten.graph.node:
        node.name = "renamed_" + node.output[0]  # names do not change values, so they do not invalidate
    second = calibrator.statistics(rewritten, requests)
    assert calibrator.computed == 3
    np.testing.assert_array_equal(second["a1"].gram(), first["a1"].gram())
    fresh = collect(rewritten, data, requests, batch_size=4)
    np.testing.assert_allclose(second["a2"].gram(), fresh["a2"].gram(), rtol=1e-12)
    assert not np.allclose(second["a2"].gram(), first["a2"].gram())
    calibrator.statistics(rewritten, [StatRequest("a1", frozenset({"mean"}), 1)])
    assert calibrator.computed == 3  # fewer kinds, the same axis written positively: still cached


def test_exposed_cone_runs_only_what_the_tensors_need() -> None:
    exposed = exposing_model(mlp_model(), ["a1"], {"a1": onnx.TensorProto.FLOAT})
    assert [n.output[0] for n in exposed.graph.node] == ["h1", "a1"]
    assert [i.name for i in exposed.graph.initializer] == ["w1"]
    assert [o.name for o in exposed.graph.output] == ["a1"]


def test_pass_context_statistics_need_data_and_accept_a_graph() -> None:
    model = mlp_model()
    with pytest.raises(GraphoptError, match="need calibration data: give --calib"):
        PassContext(template=model, progress=False).statistics([StatRequest("a1", KINDS, -1)])
    data = {"x": np.random.default_rng(6).standard_normal((6, 5)).astype(np.float32)}
    ctx = PassContext(template=model, data=load_data(data, model), progress=False,
                      options={"batch_size": 4, "calib_memory": "64MB"})
    via_graph = ctx.statistics([StatRequest("a2", KINDS, -1)], import_graph(model))
    direct = collect(model, data, [StatRequest("a2", KINDS, -1)], batch_size=4)
    np.testing.assert_allclose(via_graph["a2"].gram(), direct["a2"].gram(), rtol=1e-12)
    ctx.statistics([StatRequest("a2", KINDS, -1)])
    assert ctx._calibrator.computed == 1  # the graph's export and the template share cones


def test_cone_includes_tensors_read_only_inside_subgraphs() -> None:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        branchy (float[N, 2] x) => (float[N, 2] y) <bool flag = {1}> {
            a = Relu(x)
            y = If(flag) <then_branch = then_graph () => (float[N, 2] t) { t = Neg(a) },
                          else_branch = else_graph () => (float[N, 2] e) { e = Identity(a) }>
        }""")
    exposed = exposing_model(model, ["y"], {"y": onnx.TensorProto.FLOAT})
    assert [n.op_type for n in exposed.graph.node] == ["Relu", "If"]
    data = {"x": np.random.default_rng(7).standard_normal((6, 2)).astype(np.float32)}
    stats = collect(model, data, [StatRequest("y", frozenset({"mean"}))], batch_size=4)
    np.testing.assert_allclose(stats["y"].mean, -np.maximum(data["x"], 0).mean(axis=0), rtol=1e-6)


def test_progress_bar_reports_samples_per_second_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    model, data = conv_model(), conv_data()
    collect(model, data, [StatRequest("c")], batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    collect(model, data, [StatRequest("c")], batch_size=4, progress=True)
    assert "sample/s" in capsys.readouterr().err


def test_statistics_over_the_memory_bound_are_measured_in_parts_and_spilled() -> None:
    """Grams that do not fit half of --calib-memory together are measured in parts, each part's moved to disk;
    the results equal one pass's, and read back on each use."""
    model, data = token_model(), token_data()
    requests = [StatRequest("h", KINDS, -1), StatRequest("pooled", KINDS, -1)]
    whole = collect(model, data, requests)
    sizes = sum(stats.shifted_square.nbytes + 4 * stats.shifted_sum.nbytes for stats in whole.values())
    calibrator = Calibrator(load_data(data, model), memory_limit=sizes + 64)  # half the bound holds one tensor
    parts = calibrator.statistics(model, requests)
    for name, stats in whole.items():
        assert isinstance(parts[name].shifted_square, Spilled) and parts[name].shifted_square.path.is_file()
        np.testing.assert_allclose(parts[name].covariance(), stats.covariance(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(parts[name].mean, stats.mean, rtol=1e-12, atol=1e-12)
        assert parts[name].count == stats.count
    with pytest.raises(ValueError, match="final"):
        parts["h"].update(np.ones((2, 6)))  # final: spilled statistics take no more rows


def test_release_forgets_the_statistics_and_deletes_the_spilled_ones() -> None:
    """Once every pass has run, optimize releases the statistics: spilled Grams leave the disk, the memory goes,
    and a later request measures again (with the same values)."""
    model, data = token_model(), token_data()
    requests = [StatRequest("h", KINDS, -1), StatRequest("pooled", KINDS, -1)]
    whole = collect(model, data, requests)
    sizes = sum(stats.shifted_square.nbytes + 4 * stats.shifted_sum.nbytes for stats in whole.values())
    calibrator = Calibrator(load_data(data, model), memory_limit=sizes + 64)
    first = calibrator.statistics(model, requests)
    files = [first[name].shifted_square.path for name in first]
    assert all(path.is_file() for path in files) and calibrator.computed == 2
    calibrator.release()
    assert not any(path.exists() for path in files) and not calibrator.cache
    again = calibrator.statistics(model, requests)
    assert calibrator.computed == 4
    np.testing.assert_allclose(again["h"].covariance(), whole["h"].covariance(), rtol=1e-12, atol=1e-12)

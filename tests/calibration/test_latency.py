"""Latency lookup tables: the one-layer models, interpolation on the grid, and the on-disk cache's key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from graphopt.calibration.latency import LatencyCache, LayerTable, Runtime, build_table
from graphopt.calibration.layer_models import Activation, LayerSpec

RUNTIME = Runtime("CPUExecutionProvider", "Test CPU 1", "2", "1.32.0")
CONV = LayerSpec("Conv", (8, 16, 10, 10), 1, (("kernel_shape", (3, 3)), ("pads", (1, 1, 1, 1)),
                                              ("strides", (2, 2))), bias=True, activation=Activation("Relu"))


class CountingTimer:
    """A fake timer: time = cin * cout / 100 (+ offset), counting the points it was asked for."""

    def __init__(self, offset: float = 0.0) -> None:
        self.calls: list[tuple[int, int]] = []
        self.offset = offset

    def __call__(self, spec: LayerSpec, cin: int, cout: int) -> float:
        self.calls.append((cin, cout))
        return cin * cout / 100 + self.offset


@pytest.mark.parametrize("spec, cin, cout, shape", [
    (CONV, 8, 24, (8, 24, 5, 5)),
    (LayerSpec("Conv", (2, 32, 6, 6), 1, (("kernel_shape", (3, 3)), ("pads", (1, 1, 1, 1))), depthwise=True,
               activation=Activation("Clip", (), (0.0, 6.0))), 12, 12, (2, 12, 6, 6)),
    (LayerSpec("Gemm", (4, 64), 1, (("transB", 1),), bias=True), 40, 10, (4, 10)),
    (LayerSpec("MatMul", (2, 7, 64), 2, (), activation=Activation("HardSwish")), 48, 24, (2, 7, 24)),
])
def test_layer_models_run_at_any_channel_count(spec: LayerSpec, cin: int, cout: int, shape: tuple[int, ...]) -> None:
    model, feed = spec.build(cin, cout)
    onnx.checker.check_model(model)
    (output,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert output.shape == shape
    if spec.activation is not None and spec.activation.op == "Clip":
        assert output.min() >= 0.0 and output.max() <= 6.0


def test_signature_ignores_channels_and_names_everything_else() -> None:
    assert CONV.signature() == dataclasses.replace(CONV, input_shape=(8, 99, 10, 10)).signature()
    for changed in (dataclasses.replace(CONV, input_shape=(4, 16, 10, 10)), dataclasses.replace(CONV, bias=False),
                    dataclasses.replace(CONV, activation=None), dataclasses.replace(CONV, dtype="float16"),
                    dataclasses.replace(CONV, attrs=(("kernel_shape", (1, 1)),))):
        assert changed.signature() != CONV.signature()
    json.dumps(CONV.signature())  # the cache stores it as JSON


def test_table_interpolates_and_never_predicts_fewer_channels_slower() -> None:
    measured = {(i, o): i * o / 100.0 for i in (8, 16, 32) for o in (8, 16)}
    measured[(16, 8)] = 5.0  # a staircase bump: (32, 8) measured faster than (16, 8)
    table = LayerTable([8, 16, 32], [8, 16], measured, depthwise=False)
    assert table(8, 8) == pytest.approx(0.64)
    assert table(8, 12) == pytest.approx((0.64 + 1.28) / 2)  # linear between grid points
    assert table(16, 8) == pytest.approx(5.0)
    assert table(32, 8) == pytest.approx(5.0)   # lifted to the envelope: never below (16, 8)
    assert table(32, 16) == pytest.approx(5.12)
    assert table(4, 4) == pytest.approx(0.64) and table(64, 64) == pytest.approx(5.12)  # clamped outside
    depthwise = LayerTable([8, 16], [], {(8, 8): 1.0, (16, 16): 3.0}, depthwise=True)
    assert depthwise(12, 12) == pytest.approx(2.0)


def test_cache_reuses_an_entry_only_under_the_same_key(tmp_path: Path) -> None:
    timer = CountingTimer()
    first = LatencyCache(RUNTIME, tmp_path, timer)
    table = build_table(first, CONV, [8, 16], [8, 24])
    assert len(timer.calls) == 4 and first.entries_built == 1 and first.entries_hit == 0
    assert table(16, 24) == pytest.approx(16 * 24 / 100)

    again = LatencyCache(RUNTIME, tmp_path, CountingTimer(offset=100.0))
    assert build_table(again, CONV, [8, 16], [8, 24])(16, 24) == pytest.approx(16 * 24 / 100)  # from disk
    assert again.entries_hit == 1 and again.points_measured == 0

    for field, value in (("onnxruntime", "1.33.0"), ("cpu", "Other CPU"), ("threads", "4"),
                         ("provider", "CUDAExecutionProvider")):
        changed = dataclasses.replace(RUNTIME, **{field: value})
        rebuilt = CountingTimer(offset=1.0)
        cache = LatencyCache(changed, tmp_path, rebuilt)
        assert cache.path(cache.key(CONV)) != first.path(first.key(CONV)), field
        assert build_table(cache, CONV, [8, 16], [8, 24])(16, 24) == pytest.approx(16 * 24 / 100 + 1.0), field
        assert len(rebuilt.calls) == 4 and cache.entries_hit == 0, field


def test_cache_adds_new_grid_points_and_ignores_a_file_with_another_key(tmp_path: Path) -> None:
    timer = CountingTimer()
    cache = LatencyCache(RUNTIME, tmp_path, timer)
    build_table(cache, CONV, [8, 16], [8])
    build_table(cache, CONV, [8, 16, 32], [8])
    assert timer.calls == [(8, 8), (16, 8), (32, 8)]  # only the new point was measured
    path = cache.path(cache.key(CONV))
    stored = json.loads(path.read_text())
    stored["key"]["runtime"]["onnxruntime"] = "0.0.1"  # a file whose key differs is never read
    path.write_text(json.dumps(stored))
    build_table(cache, CONV, [8], [8])
    assert timer.calls[-1] == (8, 8) and len(timer.calls) == 4
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no staging file


def test_runtime_key_holds_provider_cpu_threads_and_version() -> None:
    here = Runtime.current("cpu", 3)
    assert here.provider == "CPUExecutionProvider" and here.threads == "3" and here.threads_count == 3
    assert here.onnxruntime == ort.__version__ and here.cpu
    assert Runtime.current("cpu", 0).threads.startswith("default:") and Runtime.current("cpu", 0).threads_count == 0


def test_a_model_onnxruntime_loads_but_cannot_run_is_a_graphopt_error() -> None:
    """model_latency (and the layer timer) turn onnxruntime's own run-time exception into a GraphoptError,
    which --target-latency's probe falls back on."""
    from graphopt.calibration.latency import model_latency
    from graphopt.errors import GraphoptError
    from tests.conftest import init, tiny

    model = tiny("y = Reshape (x, shape)", inputs="float[N, 2] x", outputs="float[7] y",
                 inits=init("shape", [7], dtype="int64"))
    with pytest.raises(GraphoptError, match="onnxruntime cannot run the model"):
        model_latency(model, {"x": (2, 2)}, Runtime.current("cpu", 1))


@pytest.mark.parametrize("single_ms, rounds", [(1.0, 12), (150.0, 12), (400.0, 6), (2000.0, 6)])
def test_paired_latency_runs_fewer_rounds_of_a_slow_model(monkeypatch: pytest.MonkeyPatch, single_ms: float,
                                                          rounds: int) -> None:
    """12 interleaved rounds, fewer when both models' rounds would take more than 4 s, never under MIN_ROUNDS."""
    from graphopt.calibration import latency
    from tests.conftest import tiny

    asked = []
    monkeypatch.setattr(latency, "time_runs", lambda run, **_: single_ms)
    monkeypatch.setattr(latency, "interleaved", lambda sessions, feeds, rounds, runs, warmup: asked.append(rounds))
    model = tiny("y = Relu (x)", inputs="float[N, 2] x", outputs="float[N, 2] y")
    latency.paired_latency(model, model, {"x": (2, 2)}, Runtime.current("cpu", 1))
    assert asked == [rounds] and latency.MIN_ROUNDS == 6

"""Staged runs (graphopt.calibration.staged): resuming a model from its frontier gives what a full run gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import graphopt
from graphopt.calibration.staged import Stage, Stages
from graphopt.passes.base import PassContext
from tests.conftest import run_ort


def _residual(seed: int, scale: float = 1.0) -> onnx.ModelProto:
    """x[N,4,6,6] -> conv a -> relu -> conv b -> add(relu a) -> Shape-driven Reshape -> MatMul -> y; the
    residual keeps `ra` on the frontier while b runs, and the Reshape reads a Shape of the stream."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((scale * rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32), "ka"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) / 3).astype(np.float32), "kb"),
             numpy_helper.from_array((rng.standard_normal((8, 5)) / 3).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 8, -1], np.int64), "dims"),
             numpy_helper.from_array(np.array([0, 2, 1], np.int64), "perm_unused")]
    nodes = [helper.make_node("Conv", ["x", "ka"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "kb"], ["b"], name="conv_b"),
             helper.make_node("Add", ["b", "ra"], ["s"], name="add"),
             helper.make_node("Reshape", ["s", "dims"], ["flat"], name="reshape"),
             helper.make_node("Transpose", ["flat"], ["rows"], perm=[0, 2, 1], name="transpose"),
             helper.make_node("MatMul", ["rows", "w"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", 1, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, ["N", 36, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _exposed(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_tensor_value_info(n, 1, None) for n in names)
    return exposed


def _batches(count: int = 3, size: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    return [{"x": rng.standard_normal((size, 4, 6, 6)).astype(np.float32)} for _ in range(count)]


def _staged(stage: Stage, model: onnx.ModelProto, names: list[str], batches) -> list[dict[str, np.ndarray]]:
    run = stage.runner(model, names, 4, "cpu", 1)
    return [run(index, batch) for index, batch in enumerate(batches)]


def _check(found: list[dict[str, np.ndarray]], model: onnx.ModelProto, names: list[str], batches) -> None:
    for values, batch in zip(found, batches):
        full = run_ort(_exposed(model, names), batch)
        for name in names:
            np.testing.assert_allclose(values[name], full[name], rtol=1e-5, atol=1e-6)


def test_deeper_calls_resume_from_the_frontier_and_match_full_runs() -> None:
    model, batches, stage = _residual(0), _batches(), Stage(1 << 30)
    for names in (["ra"], ["b"], ["s", "ra"], ["rows"], ["y"]):
        _check(_staged(stage, model, names, batches), model, names, batches)
    assert stage.resumed_calls == 4
    assert stage.enabled


def test_a_layer_rewritten_beyond_the_frontier_is_run_with_its_new_weights() -> None:
    batches, stage = _batches(), Stage(1 << 30)
    _staged(stage, _residual(0), ["ra"], batches)
    changed = _residual(0)
    changed.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        2 * numpy_helper.to_array(changed.graph.initializer[1]), "kb"))
    _check(_staged(stage, changed, ["s"], batches), changed, ["s"], batches)
    assert stage.resumed_calls == 1


def test_a_layer_rewritten_behind_the_frontier_restarts_from_the_inputs() -> None:
    batches, stage = _batches(), Stage(1 << 30)
    _staged(stage, _residual(0), ["s"], batches)
    changed = _residual(0, scale=3.0)  # conv a, behind the frontier, computes something else now
    _check(_staged(stage, changed, ["y"], batches), changed, ["y"], batches)
    assert stage.resumed_calls == 0


def test_a_frontier_over_its_memory_budget_is_kept_on_disk() -> None:
    model, batches = _residual(0), _batches()
    stage = Stage(10_000)  # a batch's frontier is 4 x 8 x 36 floats a tensor: one batch of {ra, b} fits in memory
    for names in (["ra"], ["b"]):
        _check(_staged(stage, model, names, batches), model, names, batches)
        assert any(isinstance(v, np.memmap) for b in stage._values.values() for v in b.values())
    folder = Path(stage._folder.name)
    assert folder.is_dir() and len(list(folder.iterdir())) == sum(map(len, stage._files.values())) == 4
    _check(_staged(stage, model, ["y"], batches), model, ["y"], batches)
    assert stage.enabled and stage.resumed_calls == 2
    stage._disable("test")
    assert not folder.exists()


def test_a_spilled_tensor_that_stays_on_the_frontier_keeps_its_file() -> None:
    model, batches = _residual(0), _batches()
    stage = Stage(6000)  # one tensor of one batch (4608 bytes) fits in memory, two do not
    _check(_staged(stage, model, ["ra"], batches), model, ["ra"], batches)
    spilled = {index: stage._files[index]["ra"][0] for index in (1, 2)}
    written = stage._written
    _check(_staged(stage, model, ["b"], batches), model, ["b"], batches)  # ra stays on the frontier beside b
    assert {index: stage._files[index]["ra"][0] for index in (1, 2)} == spilled
    assert all(path.exists() for path in spilled.values())
    assert stage._written == written + 3  # batch 0's ra and b, batch 2's b: ra of batches 1 and 2 not again
    _check(_staged(stage, model, ["y"], batches), model, ["y"], batches)
    assert stage.enabled and stage.resumed_calls == 2
    assert not any(path.exists() for path in spilled.values())  # off the frontier: its files are gone


def test_a_frontier_over_its_disk_budget_falls_back_to_full_runs() -> None:
    model, batches = _residual(0), _batches()
    stage = Stage(4000)  # every batch spills: {ra} fits SPILL_FACTOR x 4000 bytes on disk, {ra, b} does not
    for names in (["ra"], ["b"], ["y"]):
        _check(_staged(stage, model, names, batches), model, names, batches)
    assert not stage.enabled and stage.resumed_calls == 1  # the second call resumed, then the stage gave up


def test_error_correction_gives_the_same_model_staged_or_not(monkeypatch) -> None:
    from tests.passes.snp.test_snp_correct import _cnn

    from sklearn.datasets import load_digits

    images = (load_digits().images / 16.0).astype(np.float32)[:200, None]
    options = dict(method="snp", target_macs=0.4, calib={"x": images}, round_to=1, reconstruct_target="original",
                   batch_size=32)
    made: list[Stages] = []
    monkeypatch.setattr(PassContext, "staged_runs", lambda self: made.append(Stages(1 << 30)) or made[-1])
    staged = graphopt.optimize(_cnn(seed=3), **options)
    assert made[0].model.resumed_calls == 2 and made[0].reference.resumed_calls == 2  # conv2's wave, fc's wave
    monkeypatch.setattr(PassContext, "staged_runs", lambda self: Stages(0))  # every frontier over budget
    full = graphopt.optimize(_cnn(seed=3), **options)
    assert staged.report["passes"][-1]["stats"]["consumers_error_corrected"] == 3
    weights = {t.name: numpy_helper.to_array(t) for t in full.model.graph.initializer}
    for tensor in staged.model.graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(tensor), weights[tensor.name], rtol=1e-4, atol=1e-6)

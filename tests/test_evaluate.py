"""verify: metrics equal a direct numpy computation over several batches, the measures each kind of output gets
(class scores, CTC sequences, detector boxes) and a user's metric; bench: its report and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import DataError, MetricError, OptionError
from graphopt.evaluate import bench, random_feed, verify
from tests.calibration.test_fidelity import (CANDIDATE, MOVED_POSITIONS, MOVED_SEQUENCES, REFERENCE, sequence_data,
                                             sequence_models)
from tests.conftest import init, run_ort, tiny, weights

NOISE = weights(8, 6, seed=7) * 0.4


def _model(w: np.ndarray, extra: str = "") -> object:
    return tiny(f"y = MatMul (x, w)\n z = Relu (x){extra}", inputs="float[N, 8] x",
                outputs="float[N, 6] y, float[N, 8] z", inits=init("w", w))


def _numpy_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return {
        "max_abs": float(np.abs(a - b).max()),
        "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
        "cosine": float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))),
        "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
    }


@pytest.mark.parametrize("batch_size", [3, 64])
def test_verify_metrics_match_numpy(batch_size):
    reference, candidate = _model(weights(8, 6)), _model(weights(8, 6) + NOISE)
    data = {"x": weights(50, 8, seed=11)}
    report = verify(reference, candidate, data, batch_size=batch_size)
    ref, cand = run_ort(reference, data)["y"], run_ort(candidate, data)["y"]
    expected = _numpy_metrics(ref, cand)
    assert 0.2 < expected["top1_agreement"] < 1.0 and 0.0 < expected["rel_l2"] < 1.0  # a discriminating case
    for key, value in expected.items():
        assert report.first[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert report.samples == 50
    assert set(report.outputs) == {"y", "z"} and report.outputs["z"]["max_abs"] == 0.0
    payload = report.to_json()
    assert {"max_abs", "rel_l2", "cosine", "top1_agreement", "samples", "outputs"} <= set(payload)


def test_identical_models_agree_exactly():
    model = _model(weights(8, 6))
    report = verify(model, model, {"x": weights(7, 8)}, batch_size=2)
    assert report.first == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": pytest.approx(1.0), "top1_agreement": 1.0,
                            "kind": "classes", "position_agreement": None, "sequence_agreement": None}
    assert report.outputs["z"]["kind"] == "classes"  # Relu of [N, 8]: class scores by the shape rule


def test_top1_is_none_for_single_column_outputs():
    model = tiny("y = ReduceSum <keepdims = 1> (x, axes)", inputs="float[N, 8] x", outputs="float[N, 1] y",
                 inits="int64[1] axes = {1}")
    first = verify(model, model, {"x": weights(4, 8)}).first
    assert first["top1_agreement"] is None and first["kind"] == "values"


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("batch_size", [2, 32])
def test_sequence_outputs_get_position_and_ctc_sequence_agreement(time_major, batch_size):
    reference, candidate = sequence_models(time_major)
    data = sequence_data()
    if time_major:
        data = {name: np.ascontiguousarray(value.transpose(1, 0, 2)) for name, value in data.items()}
    first = verify(reference, candidate, data, batch_size=batch_size).first
    assert first["kind"] == "sequence" and first["top1_agreement"] is None and first["ctc_blank"] == 0
    assert first["position_agreement"] == pytest.approx(1 - MOVED_POSITIONS / 25)  # 21 of 25 positions
    assert first["sequence_agreement"] == pytest.approx(1 - MOVED_SEQUENCES / 5)  # 3 of 5 decodings


def _decode(labels: list[int], blank: int) -> list[int]:
    out: list[int] = []
    for index, label in enumerate(labels):
        if label != blank and (index == 0 or label != labels[index - 1]):
            out.append(label)
    return out


@pytest.mark.parametrize("blank", [1, 2, 3])
def test_the_blank_label_can_be_named(blank):
    reference, candidate = sequence_models()
    want = np.mean([_decode(a, blank) == _decode(b, blank) for a, b in zip(REFERENCE, CANDIDATE)])
    assert verify(reference, candidate, sequence_data(), ctc_blank=blank).first["sequence_agreement"] == want


def test_a_detector_output_gets_no_arg_max_measure():
    body = "s = Sigmoid (logits)\n boxes = Concat <axis = 2> (xywh, s)"
    reference = tiny(body, inputs="float[N, 6, 4] xywh, float[N, 6, 80] logits", outputs="float[N, 6, 84] boxes")
    candidate = tiny("moved = Mul (logits, half)\n " + body.replace("(logits)", "(moved)"),
                     inputs="float[N, 6, 4] xywh, float[N, 6, 80] logits", outputs="float[N, 6, 84] boxes",
                     inits="float[1] half = {0.5}")
    data = {"xywh": weights(5, 6, 4) * 100, "logits": weights(5, 6, 80, seed=1)}
    first = verify(reference, candidate, data).first
    assert first["kind"] == "values" and 0 < first["rel_l2"] < 1
    assert first["top1_agreement"] is None and first["position_agreement"] is None
    assert first["sequence_agreement"] is None


def test_a_metric_is_averaged_over_batches_by_samples():
    reference, candidate = _model(weights(8, 6)), _model(weights(8, 6) + NOISE)
    seen = []

    def agreement(ref, cand, inputs):
        seen.append((sorted(ref), sorted(cand), sorted(inputs), len(inputs["x"])))
        return {"agree": float(np.mean(ref["y"].argmax(-1) == cand["y"].argmax(-1))), "one": 1}

    report = verify(reference, candidate, {"x": weights(50, 8, seed=11)}, batch_size=16, metric=agreement)
    assert [batch for *_, batch in seen] == [16, 16, 16, 2]
    assert seen[0][:3] == (["y", "z"], ["y", "z"], ["x"])
    assert report.metric == {"agree": pytest.approx(report.first["top1_agreement"]), "one": 1.0}
    payload = report.to_json()
    assert payload["metric"] == report.metric and payload["metric_name"].endswith("agreement")


def test_a_metric_that_raises_or_returns_nonsense_is_named_in_one_line():
    model = _model(weights(8, 6))

    def broken(ref, cand, inputs):
        raise ValueError("no boxes")

    with pytest.raises(MetricError, match=r"^metric .*broken raised ValueError: no boxes$"):
        verify(model, model, {"x": weights(4, 8)}, metric=broken)
    with pytest.raises(MetricError, match="must return a non-empty dict"):
        verify(model, model, {"x": weights(4, 8)}, metric=lambda ref, cand, inputs: 0.5)
    with pytest.raises(MetricError, match="must return numbers"):
        verify(model, model, {"x": weights(4, 8)}, metric=lambda ref, cand, inputs: {"f1": "high"})


def test_verify_iterable_of_feeds():
    reference, candidate = _model(weights(8, 6)), _model(weights(8, 6) + NOISE)
    feeds = [{"x": weights(n, 8, seed=n)} for n in (3, 5, 2)]
    report = verify(reference, candidate, iter(feeds))
    data = {"x": np.concatenate([f["x"] for f in feeds])}
    expected = _numpy_metrics(run_ort(reference, data)["y"], run_ort(candidate, data)["y"])
    assert report.samples == 10
    assert report.first["rel_l2"] == pytest.approx(expected["rel_l2"], rel=1e-9)
    assert report.first["top1_agreement"] == pytest.approx(expected["top1_agreement"])


def test_candidate_without_the_first_output_is_refused():
    candidate = tiny("other = MatMul (x, w)", inputs="float[N, 8] x", outputs="float[N, 6] other",
                     inits=init("w", weights(8, 6)))
    with pytest.raises(DataError, match="candidate has no output 'y'"):
        verify(_model(weights(8, 6)), candidate, {"x": weights(2, 8)})


def test_output_shape_mismatch_is_refused():
    candidate = tiny("y = MatMul (x, w)", inputs="float[N, 8] x", outputs="float[N, 5] y",
                     inits=init("w", weights(8, 5)))
    with pytest.raises(DataError, match="output 'y' shape differs"):
        verify(_model(weights(8, 6)), candidate, {"x": weights(2, 8)})


def test_bench_reports_ordered_percentiles():
    model = _model(weights(8, 6))
    result = bench(model, batch=4, repeat=7, warmup=1)
    assert {"median_ms", "p10_ms", "p90_ms", "batch", "repeat", "samples_per_s", "providers"} <= set(result)
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["batch"] == 4 and result["repeat"] == 7 and result["providers"] == ["CPUExecutionProvider"]
    assert result["samples_per_s"] == pytest.approx(4e3 / result["median_ms"])


def test_bench_with_too_little_data_is_refused():
    with pytest.raises(DataError, match="fewer than --batch 8 samples"):
        bench(_model(weights(8, 6)), data={"x": weights(3, 8)}, batch=8, repeat=1, warmup=0)


def test_random_feed_is_seeded_and_typed():
    model = tiny("y = Cast <to = 1> (i)\n z = Not (b)\n w = Relu (x)",
                 inputs="float[N, 3] x, int64[N, 2] i, bool[N] b", outputs="float[N, 2] y, bool[N] z, float[N, 3] w")
    shapes = {"x": (4, 3), "i": (4, 2), "b": (4,)}
    first, again = random_feed(model, shapes, seed=3), random_feed(model, shapes, seed=3)
    assert {k: (v.dtype, v.shape) for k, v in first.items()} == {
        "x": (np.float32, (4, 3)), "i": (np.int64, (4, 2)), "b": (np.bool_, (4,))}
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["x"], random_feed(model, shapes, seed=4)["x"])


def test_bench_on_a_fixed_batch_model():
    model = tiny("y = Relu (x)", inputs="float[1, 3] x", outputs="float[1, 3] y")
    assert bench(model, batch=1, repeat=2, warmup=0)["batch"] == 1
    with pytest.raises(OptionError, match="fixed to 1; --batch 4 cannot apply"):
        bench(model, batch=4, repeat=2, warmup=0)


def test_a_rewritten_model_that_does_not_load_is_an_internal_error_and_nothing_is_written(tmp_path, monkeypatch, capfd):
    """optimize's fidelity check loads its own output: onnxruntime refusing it is graphopt's bug (exit 1), not a
    bad input (exit 2), and the output path stays empty. `verify` keeps blaming the candidate it was given."""
    import onnx

    import graphopt.api
    from graphopt.cli import main
    from graphopt.errors import CandidateLoadError

    model = _model(weights(8, 6))
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(CandidateLoadError, match="candidate: onnxruntime cannot load the model"):
        verify(model, broken, [{"x": weights(4, 8)}])
    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    real = graphopt.api.compare_outputs
    monkeypatch.setattr(graphopt.api, "compare_outputs",
                        lambda original, optimized, *args, **kwargs: real(original, broken, *args, **kwargs))
    assert main(["optimize", str(source), "-o", str(output), "--method", "none", "--input-shape", "x=2x8"]) == 1
    assert "internal error: RuntimeError: the rewritten model does not load in onnxruntime" in capfd.readouterr().err
    assert not output.exists()


def test_a_rewritten_model_whose_shapes_onnxruntime_cannot_observe_is_an_internal_error(tmp_path, monkeypatch, capfd):
    """The report's MAC count may run the rewritten model to observe shapes; onnxruntime refusing it there is
    graphopt's bug too (exit 1, nothing written), not the input's."""
    import onnx

    import graphopt.api
    from graphopt.cli import main
    from graphopt.errors import ModelLoadError

    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_model(weights(8, 6)), str(source))
    real, counted = graphopt.api.count_cost, []

    def count_cost(model, *args, **kwargs):
        counted.append(model)
        if len(counted) == 2:  # the original first, then the rewritten model
            raise ModelLoadError("onnxruntime cannot load the model: [TypeInferenceError] Invalid attribute perm")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(graphopt.api, "count_cost", count_cost)
    assert main(["optimize", str(source), "-o", str(output), "--method", "none", "--input-shape", "x=2x8"]) == 1
    assert "internal error: RuntimeError: the rewritten model does not load in onnxruntime" in capfd.readouterr().err
    assert not output.exists()

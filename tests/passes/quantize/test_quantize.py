"""The quantize method: static INT8 QDQ by onnxruntime's quantizer, alone and after pruning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.api import optimize
from graphopt.calibration.quantize import quantized_ops
from graphopt.cli import main
from graphopt.errors import GraphoptError, OptionError
from tests.conftest import init, tiny, weights

SAMPLES = Path(__file__).resolve().parents[3] / "samples"
MODEL, CALIB = SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_calib.npz"


def _stock_top1(original: onnx.ModelProto, candidate: Path) -> float:
    """Top-1 agreement of `candidate` (run as deployed: stock onnxruntime, full optimisation) with `original`."""
    images = np.load(CALIB)["input"]
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    deployed = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"input": images})[0]
    got = deployed.run(None, {"input": images})[0]
    return float(np.mean(np.argmax(expected, axis=1) == np.argmax(got, axis=1)))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("quantize") / "digits_int8.onnx"
    return output, optimize(MODEL, method="quantize", calib=CALIB, output=output, progress=False).report


def test_quantize_alone_writes_a_smaller_qdq_model_stock_onnxruntime_runs(quantized: tuple[Path, dict]) -> None:
    output, report = quantized
    model, original = onnx.load(str(output)), onnx.load(str(MODEL))
    ops = quantized_ops(model)
    assert ops.get("QuantizeLinear", 0) >= 3 and ops.get("DequantizeLinear", 0) >= 6
    weights_int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights_int8) == 5  # three Conv and two Gemm weights
    assert _stock_top1(original, output) >= 0.95
    assert report["fidelity"]["top1_agreement"] >= 0.95
    assert report["bytes_after"] < 0.6 * report["bytes_before"]
    assert report["macs_ratio"] == pytest.approx(1.0)
    assert report["params_after"] == report["steps"][0]["params"]  # int8 weights still count as parameters


def test_quantize_keeps_interface_metadata_doc_strings_and_opset(quantized: tuple[Path, dict]) -> None:
    output, _ = quantized
    model, original = onnx.load(str(output)), onnx.load(str(MODEL))
    assert [(p.key, p.value) for p in model.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert [v.name for v in model.graph.input] == [v.name for v in original.graph.input]
    assert [v.name for v in model.graph.output] == [v.name for v in original.graph.output]
    assert (model.doc_string, model.graph.doc_string) == (original.doc_string, original.graph.doc_string)
    assert [(o.domain, o.version) for o in model.opset_import] == [(o.domain, o.version) for o in original.opset_import]


def test_snp_then_quantize_keeps_the_pruned_macs_and_reports_both_steps(tmp_path: Path) -> None:
    report = optimize(MODEL, method="snp,quantize", calib=CALIB, target_macs=0.7, output=tmp_path / "m.onnx",
                      progress=False).report
    pruned, quantized = report["steps"]
    assert (pruned["step"], quantized["step"]) == ("snp", "quantize")
    assert report["macs_ratio"] <= 0.72 and quantized["macs_ratio"] == pytest.approx(pruned["macs_ratio"])
    assert pruned["fidelity"]["top1_agreement"] is not None and quantized["fidelity"]["top1_agreement"] >= 0.9
    assert 0 < pruned["fidelity"]["rel_l2"] < quantized["fidelity"]["rel_l2"]  # each step measured on its own
    assert quantized["bytes"] < 0.6 * pruned["bytes"] and pruned["bytes"] < report["bytes_before"]
    assert quantized["fidelity"] == report["fidelity"]
    assert quantized_ops(onnx.load(str(tmp_path / "m.onnx"))).get("QuantizeLinear", 0) > 0


def test_an_already_quantized_model_is_refused_with_the_reason(quantized: tuple[Path, dict]) -> None:
    output, _ = quantized
    with pytest.raises(GraphoptError, match="already quantized .*QuantizeLinear"):
        optimize(output, method="quantize", calib=CALIB, progress=False)


def test_a_pipeline_ending_in_quantize_refuses_a_quantized_model_before_pruning_it(
        quantized: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.passes.snp.prune import SubspaceNodePruning

    def pruned(*args: object) -> None:
        raise AssertionError("SNP ran on a model the pipeline refuses")

    monkeypatch.setattr(SubspaceNodePruning, "run", pruned)
    output, _ = quantized
    with pytest.raises(GraphoptError, match="already quantized .*prune a QDQ model as it is"):
        optimize(output, method="snp,quantize", calib=CALIB, target_macs=0.7, progress=False)


def test_quantize_must_be_last_and_needs_data() -> None:
    with pytest.raises(OptionError, match="last method"):
        optimize(MODEL, method="quantize,magnitude", calib=CALIB, target_macs=0.7, progress=False)
    with pytest.raises(GraphoptError, match="needs calibration data"):
        optimize(MODEL, method="quantize", progress=False)


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_each_calibration_method_is_accepted(tmp_path: Path, calibration: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["optimize", str(MODEL), "--method", "quantize", "--calib", str(CALIB), "--quant-calibration",
                 calibration, "-o", str(tmp_path / "m.onnx"), "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # the quantizer's own prints stay off stdout
    assert report["options"]["quant_calibration"] == calibration
    assert report["steps"][-1]["fidelity"]["top1_agreement"] >= 0.95
    assert _stock_top1(onnx.load(str(MODEL)), tmp_path / "m.onnx") >= 0.95


def test_a_bad_calibration_method_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(MODEL), "--method", "quantize", "--calib", str(CALIB), "--quant-calibration",
              "median", "-o", str(tmp_path / "m.onnx")])
    assert info.value.code == 2 and "median" in capsys.readouterr().err
    with pytest.raises(OptionError, match="--quant-calibration"):
        optimize(MODEL, method="quantize", calib=CALIB, quant_calibration="median", progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_per_tensor_and_excluded_op_types(tmp_path: Path) -> None:
    per_tensor = optimize(MODEL, method="quantize", calib=CALIB, quant_per_channel=False, progress=False)
    scales = [t for t in per_tensor.model.graph.initializer if t.name.endswith("_scale")]
    assert scales and all(len(t.dims) == 0 or int(np.prod(t.dims)) == 1 for t in scales)
    kept = optimize(MODEL, method="quantize", calib=CALIB, quant_exclude="Gemm", progress=False)
    gemm_weights = [node.input[1] for node in kept.model.graph.node if node.op_type == "Gemm"]
    floats = {t.name for t in kept.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert gemm_weights and all(name in floats for name in gemm_weights)
    assert "op type Gemm left in float" in " ".join(kept.report["passes"][-1]["skipped"])


def test_an_opset_11_model_is_converted_to_opset_13_not_relabelled() -> None:
    model = tiny("h = Conv(x, w)\ny = Relu(h)", outputs="float[N, 4, 8, 8] y", opset=11,
                 inits=init("w", weights(4, 3, 1, 1)))
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = optimize(model, method="quantize", calib=calib, progress=False)
    opsets = {o.domain: o.version for o in result.model.opset_import}
    assert opsets[""] == 13
    assert result.report["passes"][-1]["stats"]["opset_raised_from"] == 11
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report["fidelity"]["cosine"] > 0.999


def test_a_float16_model_is_quantized_at_opset_19_and_the_cli_notes_the_cpu_cost(tmp_path: Path, capsys) -> None:
    """The quantizer writes float16 scales for a float16 model; DequantizeLinear reads them from opset 19 on
    (at opset 17 the written model did not load)."""
    half, helper = onnx.TensorProto.FLOAT16, onnx.helper
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "half",
        [helper.make_tensor_value_info("x", half, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", half, ["N", 4, 8, 8])],
        [onnx.numpy_helper.from_array(weights(4, 3, 1, 1).astype(np.float16), "w"),
         onnx.numpy_helper.from_array(weights(4, seed=1).astype(np.float16), "b")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = tmp_path / "half.onnx"
    onnx.save(model, str(source))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float16))
    assert main(["optimize", str(source), "-o", str(tmp_path / "int8.onnx"), "--method", "quantize", "--calib",
                 str(calib), "--report", str(tmp_path / "report.json")]) == 0
    assert "the model computes in float16" in capsys.readouterr().out
    written = onnx.load(str(tmp_path / "int8.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert {o.domain: o.version for o in written.opset_import}[""] == 19
    stats = json.loads((tmp_path / "report.json").read_text())["passes"][-1]["stats"]
    assert stats["opset_raised_from"] == 17 and stats["half_precision"] == 1
    feed = {"x": np.load(calib)["x"][:4]}  # inside the calibrated ranges
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert got.dtype == np.float16
    error = np.linalg.norm(got.astype(np.float32) - expected) / np.linalg.norm(expected.astype(np.float32))
    assert error < 0.05


def test_weights_listed_as_graph_inputs_ir3_are_quantized_and_callers_feed_the_same_inputs() -> None:
    model = tiny("h = Conv(x, w, b)\ny = Relu(h)", outputs="float[N, 4, 8, 8] y", opset=9,
                 inits=f"{init('w', weights(4, 3, 1, 1))}, {init('b', weights(4, seed=1))}")
    for name, shape in (("w", [4, 3, 1, 1]), ("b", [4])):  # IR 3: every initializer is also a graph input
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = optimize(model, method="quantize", calib=calib, progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    initializers = {t.name for t in result.model.graph.initializer}
    assert [v.name for v in result.model.graph.input if v.name not in initializers] == ["x"]
    assert quantized_ops(result.model).get("QuantizeLinear", 0) >= 1
    assert result.report["fidelity"]["cosine"] > 0.999


def test_a_bias_shared_by_several_convolutions_is_quantized_per_reader_without_clashing_names() -> None:
    """tf2onnx shares one zero bias among convolutions and names tensors after layers; onnxruntime's quantizer
    names its per-reader copy of a shared bias by appending a number, which here is an activation's name."""
    model = tiny("b0 = Conv(x, w1, b)\nr = Neg(b0)\nb1 = Conv(r, w2, b)\nh = Neg(b1)\ny = Conv(h, w2, b)",
                 inits=f"{init('w1', weights(4, 3, 1, 1))}, {init('w2', weights(4, 4, 1, 1, seed=2))}, "
                       f"{init('b', weights(4, seed=1))}")
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = optimize(model, method="quantize", calib=calib, progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    biases = [node.input[2] for node in result.model.graph.node if node.op_type == "Conv"]
    assert len(set(biases)) == 3  # each convolution reads its own int32 bias
    assert quantized_ops(result.model).get("QuantizeLinear", 0) >= 3
    assert result.report["fidelity"]["cosine"] > 0.999


def test_the_quantizer_leaves_the_model_it_is_given_unchanged() -> None:
    """onnxruntime's quantizer saves the proto it is given with external data in a folder it deletes; the float
    model graphopt hands it is used after quantization (stats, the side-by-side timing) and must stay whole."""
    from graphopt.calibration.data import load_data
    from graphopt.calibration.quantize import QuantizeSettings, quantize_qdq

    model = onnx.load(str(MODEL))
    before = model.SerializeToString()
    quantize_qdq(model, load_data(CALIB, model), QuantizeSettings())
    assert model.SerializeToString() == before


def test_the_quantized_model_is_timed_against_the_float_one_and_a_slower_one_is_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import graphopt.passes.quantize.qdq as qdq

    report = optimize(MODEL, method="quantize", calib=CALIB, progress=False).report
    stats = next(p["stats"] for p in report["passes"] if p["pass"] == "quantize")
    assert 0 < stats["speedup_b1_p10"] <= stats["speedup_b1"] <= stats["speedup_b1_p90"]
    timed = []

    def slower(reference, candidate, shapes, where):  # as if the integer kernels lost on this graph
        timed.append((quantized_ops(reference), quantized_ops(candidate), shapes))
        return {"speedup": 0.7, "speedup_p10": 0.6, "speedup_p90": 0.8, "reference_ms": 1.0, "candidate_ms": 1.4}

    monkeypatch.setattr(qdq, "paired_latency", slower)
    assert main(["optimize", str(MODEL), "-o", str(tmp_path / "q.onnx"), "--method", "quantize",
                 "--calib", str(CALIB), "--quiet"]) == 0
    assert timed[0][0] == {} and timed[0][1].get("QuantizeLinear", 0) > 0 and timed[0][2] == {"input": (1, 1, 8, 8)}
    assert "warning: the quantized model ran 0.70x as fast as the float model" in capsys.readouterr().err


def log_mel(floor: str) -> onnx.ModelProto:
    """A log-mel front end: a power spectrum of wide dynamic range through a filterbank MatMul, then a floor
    (`Clip` at float32's epsilon, or NeMo's guard `Add`) and Log."""
    from onnx import TensorProto, helper, numpy_helper

    bank = (np.abs(weights(64, 16, seed=3)) * (np.abs(weights(64, 16, seed=4)) > 1.0) * 0.05).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "bank"], ["mel"]),
             helper.make_node("Clip" if floor == "clip" else "Add", ["mel", "eps"], ["m"]),
             helper.make_node("Log", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "log_mel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                              [numpy_helper.from_array(bank, "bank"),
                               numpy_helper.from_array(np.array(1.1920929e-07, np.float32), "eps")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("floor", ["clip", "add"])
def test_a_floor_before_log_keeps_the_quantized_model_finite(floor: str) -> None:
    """Quantizing the filterbank's output rounds quiet frames to exactly 0 and drops the floor with it: the
    output would be -inf; the producer is kept in float, named, and every output stays finite."""
    model = log_mel(floor)
    rng = np.random.default_rng(0)
    calib = {"x": np.exp(rng.normal(0.0, 4.0, (64, 64))).astype(np.float32)}
    result = optimize(model, method="quantize", calib=calib, progress=False)
    record = next(p for p in result.report["passes"] if p["pass"] == "quantize")
    assert record["stats"]["kept_float"] >= 1
    assert any("(MatMul) left in float" in reason or "(Add) left in float" in reason for reason in record["skipped"])
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, calib)[0]).all()
    assert result.report["fidelity"]["rel_l2"] < 0.5

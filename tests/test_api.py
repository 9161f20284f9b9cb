"""graphopt.optimize: sources, report, refusals; opsets 11..newest, dynamic axes and subgraphs pass through."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.errors import OptionError
from graphopt.ir.io import load_model, save_model
from tests.conftest import (assert_equivalent, bn_inputs, bn_params, init, op_types, random_inputs, run_ort, tiny,
                            weights, with_raw_data)
from tests.ir.test_graph import assert_model_fields_equal, rich_model

BN = bn_inputs("bn")


def conv_bn_model(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """Constant-node weight, Conv -> BN -> Relu -> Identity -> Dropout -> pool -> Gemm."""
    w = ", ".join(repr(v.item()) for v in weights(4, 3, 3, 3).reshape(-1))
    return tiny(f"""w = Constant <value = float[4, 3, 3, 3] {{{w}}}> ()
                    c = Conv <pads = [1, 1, 1, 1]> (x, w)
                    b = BatchNormalization (c, {BN})
                    r = Relu (b)
                    i = Identity (r)
                    d = Dropout (i)
                    p = GlobalAveragePool (d)
                    f = Flatten (p)
                    y = Gemm <transB = 1> (f, fc, fc_bias)""",
                inputs="float[N, 3, 8, 8] x", outputs="float[N, 5] y", opset=opset, ir_version=ir_version,
                inits=", ".join([bn_params("bn", 4), init("fc", weights(5, 4, seed=2)), init("fc_bias", weights(5))]))


def test_optimize_none_runs_the_prepasses_and_reports():
    model = conv_bn_model()
    result = graphopt.optimize(model, method="none")
    assert op_types(result.model) == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    report = result.report
    assert report["macs_before"] == report["macs_after"] == 4 * 64 * 27 + 20
    assert report["params_before"] == 108 + 16 + 25
    assert report["params_after"] == 108 + 4 + 25  # BN folded into a Conv bias
    assert [p["pass"] for p in report["passes"]] == graphopt.passes.PREPASSES
    folded = next(p for p in report["passes"] if p["pass"] == "fold_batchnorm")
    assert folded["modified"] and folded["stats"]["folded"] == 1
    assert report["fidelity"]["data"] == "random" and report["fidelity"]["max_abs"] < 1e-5
    assert_equivalent(model, result.model, random_inputs(model, batch=3))


def test_calibration_sources_are_equivalent(tmp_path):
    model = conv_bn_model()
    data = weights(6, 3, 8, 8, seed=4)
    np.savez(tmp_path / "calib.npz", x=data)
    reports = [
        graphopt.optimize(model, calib=tmp_path / "calib.npz").report,
        graphopt.optimize(model, calib=str(tmp_path / "calib.npz")).report,
        graphopt.optimize(model, calib={"x": data}).report,
        graphopt.optimize(model, calib=({"x": data[i:i + 2]} for i in range(0, 6, 2))).report,
    ]
    for report in reports:
        assert report["fidelity"]["data"] == "calibration" and report["fidelity"]["samples"] == 6
        assert report["fidelity"]["max_abs"] < 1e-5


def test_path_source_and_output(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(conv_bn_model(), str(source))
    result = graphopt.optimize(source, output=tmp_path / "out.onnx")
    saved = load_model(tmp_path / "out.onnx")
    assert result.report["output"] == str(tmp_path / "out.onnx")
    assert result.report["bytes_after"] == (tmp_path / "out.onnx").stat().st_size
    assert_equivalent(conv_bn_model(), saved, random_inputs(saved))


def test_refusals_leave_the_input_untouched(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(conv_bn_model(), str(source))
    before = source.read_bytes()
    with pytest.raises(OptionError, match="refusing to overwrite the input model"):
        graphopt.optimize(source, output=source)
    with pytest.raises(OptionError, match="unknown method 'nope'"):
        graphopt.optimize(source, method="nope", output=tmp_path / "out.onnx")
    with pytest.raises(OptionError, match="--target-macs must be in"):
        graphopt.optimize(source, target_macs=1.5, output=tmp_path / "out.onnx")
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def _latest_opsets() -> list[int]:
    return list(range(11, onnx.defs.onnx_opset_version() + 1))


@pytest.mark.parametrize("opset", _latest_opsets())
def test_every_opset_loads_optimizes_and_saves(tmp_path, opset):
    ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    model = conv_bn_model(opset, ir_version)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    graphopt.optimize(path, output=tmp_path / "out.onnx")
    saved = load_model(tmp_path / "out.onnx")
    assert saved.opset_import == model.opset_import and saved.ir_version == ir_version
    assert "BatchNormalization" not in op_types(saved)
    assert_equivalent(model, saved, random_inputs(model))


def test_dynamic_axes_pass_through(tmp_path):
    model = tiny(f"""c = Conv <pads = [1, 1, 1, 1]> (x, w)
                     y = BatchNormalization (c, {BN})""", inputs="float[N, 3, H, W] x", outputs="float[N, 4, H, W] y",
                 inits=", ".join([init("w", weights(4, 3, 3, 3)), bn_params("bn", 4)]))
    with pytest.raises(OptionError, match="dynamic axis 2"):
        graphopt.optimize(model)
    result = graphopt.optimize(model, input_shapes={"x": (1, 3, 8, 8)}, output=tmp_path / "out.onnx")
    assert result.report["macs_before"] == 4 * 64 * 27
    saved = load_model(tmp_path / "out.onnx")
    assert saved.graph.input == model.graph.input and saved.graph.output[0].type == model.graph.output[0].type
    for h, w in ((8, 8), (5, 11)):
        assert_equivalent(model, saved, random_inputs(model, batch=2, dims={"H": h, "W": w}))
    by_data = graphopt.optimize(model, calib={"x": weights(2, 3, 6, 4)})
    assert by_data.report["macs_before"] == 4 * 24 * 27


IF_MODEL = """k = Constant <value = float[1] {2.0}> ()
              s = ReduceSum <keepdims = 0> (x)
              zero = Constant <value = float {0.0}> ()
              cond = Greater (s, zero)
              y = If (cond) <then_branch = then_g () => (float[N, 3] t) {
                    three = Constant <value = float[1] {3.0}> ()
                    u = Mul (x, three)
                    i = Identity (u)
                    t = Mul (i, k)
                  }, else_branch = else_g () => (float[N, 3] e) {
                    e = Sub (x, k)
                  }>"""

LOOP_MODEL = """trip = Constant <value = int64 {3}> ()
                go = Constant <value = bool {1}> ()
                init_acc = Identity (x)
                final, scan = Loop (trip, go, init_acc) <body = body_g (int64 iter, bool cond_in, float[N, 3] acc)
                    => (bool cond_out, float[N, 3] acc_out, float[N, 3] scan_out) {
                    half = Constant <value = float[1] {0.5}> ()
                    step = Mul (acc, half)
                    acc_out = Add (step, w)
                    cond_out = Identity (cond_in)
                    scan_out = Identity (acc_out)
                  }>
                y = Relu (final)
                z = ReduceSum <keepdims = 0> (scan, axes)"""


@pytest.mark.parametrize("body,outputs", [
    (IF_MODEL, "float[N, 3] y"),
    (LOOP_MODEL, "float[N, 3] y, float[N, 3] z"),
], ids=["if", "loop"])
def test_subgraphs_pass_through(tmp_path, body, outputs):
    model = tiny(body, inputs="float[N, 3] x", outputs=outputs,
                 inits=", ".join([init("w", weights(3)), "int64[1] axes = {0}"]))
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    graphopt.optimize(path, output=tmp_path / "out.onnx")
    saved = load_model(tmp_path / "out.onnx")
    assert [o.name for o in saved.graph.output] == [o.name for o in model.graph.output]
    feeds = random_inputs(model, batch=4)
    assert_equivalent(model, saved, feeds)
    assert_equivalent(model, saved, {"x": -feeds["x"]})


def test_model_fields_functions_and_doc_strings_survive(tmp_path):
    model = rich_model()
    path = tmp_path / "rich.onnx"
    onnx.save_model(model, str(path))
    graphopt.optimize(path, output=tmp_path / "out.onnx")
    saved = load_model(tmp_path / "out.onnx")
    assert_model_fields_equal(saved, model)
    assert saved.graph.node[0].name == "my_relu" and saved.graph.node[0].doc_string == "relu doc"
    assert_equivalent(model, saved, random_inputs(model))


def test_initializers_listed_as_graph_inputs(tmp_path):
    model = tiny(f"""c = Conv <pads = [1, 1, 1, 1]> (x, w)
                     y = BatchNormalization (c, {BN})""",
                 inputs="float[N, 3, 8, 8] x, float[4, 3, 3, 3] w, "
                        + ", ".join(f"float[4] {name}" for name in BN.split(", ")),
                 outputs="float[N, 4, 8, 8] y", inits=", ".join([init("w", weights(4, 3, 3, 3)), bn_params("bn", 4)]))
    result = graphopt.optimize(model, calib={"x": weights(2, 3, 8, 8)}, output=tmp_path / "out.onnx")
    assert op_types(result.model) == ["Conv"]
    assert result.report["macs_before"] == result.report["macs_after"] == 4 * 64 * 27
    saved = load_model(tmp_path / "out.onnx")
    feeds = random_inputs(model)
    assert list(feeds) == ["x"]
    np.testing.assert_allclose(run_ort(saved, feeds)["y"], run_ort(model, feeds)["y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_exported_models_optimize_exactly(torch_export, tmp_path, exporter):
    torch = pytest.importorskip("torch")
    from tests.torch_models import BUILDERS

    for name in ("conv_stack", "linear_stack"):
        model = torch_export(name, exporter)
        module, example = BUILDERS[name]()
        result = graphopt.optimize(model, calib={"input": example.numpy()})
        assert "BatchNormalization" not in op_types(result.model)
        assert result.report["params_after"] < result.report["params_before"]
        with torch.no_grad():
            expected = module(example).numpy()
        np.testing.assert_allclose(run_ort(result.model, {"input": example.numpy()})["output"], expected,
                                   rtol=1e-4, atol=1e-5)
        assert_equivalent(model, result.model, random_inputs(model, batch=5))
        save_model(result.model, tmp_path / f"{name}.onnx")
        assert load_model(tmp_path / f"{name}.onnx").graph.input == model.graph.input


def test_fixed_batch_models(tmp_path):
    model = tiny(f"""c = Conv <pads = [1, 1, 1, 1]> (x, w)
                     y = BatchNormalization (c, {BN})""", inputs="float[1, 3, 8, 8] x", outputs="float[1, 4, 8, 8] y",
                 inits=", ".join([init("w", weights(4, 3, 3, 3)), bn_params("bn", 4)]))
    random_check = graphopt.optimize(model).report["fidelity"]
    assert random_check["samples"] == 1 and random_check["max_abs"] < 1e-5
    calibrated = graphopt.optimize(model, calib={"x": weights(5, 3, 8, 8)}, batch_size=32).report["fidelity"]
    assert calibrated["samples"] == 5 and calibrated["max_abs"] < 1e-5


def test_scalar_inputs_get_scalar_random_feeds():
    model = tiny("y = Mul (x, s)", inputs="float[N, 3] x, float s", outputs="float[N, 3] y")
    report = graphopt.optimize(model).report
    assert report["fidelity"]["samples"] == 8 and report["fidelity"]["max_abs"] == 0.0


def test_output_onto_the_input_data_file_is_refused(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save_model(with_raw_data(conv_bn_model()), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    before = (tmp_path / "weights.bin").read_bytes()
    with pytest.raises(OptionError, match="refusing to overwrite the input model"):
        graphopt.optimize(path, output=tmp_path / "weights.bin")
    assert (tmp_path / "weights.bin").read_bytes() == before


def test_output_onto_the_calibration_file_is_refused(tmp_path):
    model = conv_bn_model()
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, x=random_inputs(model, batch=4)["x"])
    before = data_path.read_bytes()
    with pytest.raises(OptionError, match="refusing to overwrite the input model or data"):
        graphopt.optimize(model, calib=data_path, output=data_path)
    assert data_path.read_bytes() == before


def test_report_file_sizes_count_the_model_only(tmp_path):
    model_path = save_model(conv_bn_model(), tmp_path / "in.onnx")
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, x=random_inputs(conv_bn_model(), batch=4)["x"])
    report = graphopt.optimize(model_path, calib=data_path, output=tmp_path / "out.onnx").report
    assert report["bytes_before"] == model_path.stat().st_size
    assert report["bytes_after"] == (tmp_path / "out.onnx").stat().st_size


SWITCH_MODEL = """h0 = MatMul (x, wa)
                  h = Relu (h0)
                  rate = Constant <value = int64 {16000}> ()
                  cond = Equal (sr, rate)
                  y = If (cond) <then_branch = then_g () => (float[M, 4] t) {
                        p = MatMul (h, w1)
                        q = Relu (p)
                        t = MatMul (q, w2)
                      }, else_branch = else_g () => (float[M, 4] e) {
                        pairs = Constant <value = int64[2] {-1, 32}> ()
                        r = Reshape (h, pairs)
                        p = MatMul (r, w3)
                        q = Relu (p)
                        e = MatMul (q, w2)
                      }>"""


def _switch_model() -> onnx.ModelProto:
    """Silero VAD's shape: a sample-rate input picks the If branch that holds the layers, both branches read
    the outer weight w2, and the other branch cannot run one sample (it pairs rows)."""
    return tiny(SWITCH_MODEL, inputs="float[N, 16] x, int64 sr", outputs="float[M, 4] y",
                inits=", ".join([init("wa", weights(16, 16)), init("w1", weights(16, 16, seed=1)),
                                 init("w2", weights(16, 4, seed=2)), init("w3", weights(32, 16, seed=3))]))


def test_layers_inside_branches_are_named_and_the_shapes_come_from_the_data() -> None:
    """The shapes the channel rules need are observed on the first calibration sample (zeros would take the
    branch that cannot run one sample), the layers inside the branches are named among the skipped reasons,
    the branches' shared weight stays written once and counts once."""
    model = _switch_model()
    calib = {"x": weights(8, 16, seed=4), "sr": np.array(16000, dtype=np.int64)}
    result = graphopt.optimize(model, method="snp", target_macs=0.7, calib=calib)
    assert result.report["target_reached"] is False
    skipped = [line for found in result.report["passes"] for line in found["skipped"]]
    assert any("(If): 4 layers inside its bodies are not pruned" in line for line in skipped)
    assert result.report["params_before"] == result.report["params_after"] == 16 * 16 * 2 + 16 * 4 + 32 * 16
    assert_equivalent(model, result.model, {"x": calib["x"], "sr": calib["sr"]})
    assert_equivalent(model, result.model, {"x": calib["x"], "sr": np.array(8000, dtype=np.int64)})


def test_every_step_of_a_pipeline_is_checked_at_the_batch_of_the_kept_outputs(monkeypatch) -> None:
    """Where calibration captured in smaller runs than --batch-size (its outputs kept at that batch, as on a
    320-px detector), each step of `snp,quantize` is checked at that batch too, so its reference outputs line up."""
    from graphopt.calibration import capture

    monkeypatch.setattr(capture, "CAPTURE_BYTES", 60_000)  # the digits CNN's consumer inputs: 9 samples a run
    result = graphopt.optimize("samples/digits_cnn.onnx", method="snp,quantize", target_macs=0.7,
                               calib="samples/digits_calib.npz", progress=False)
    assert result.report["fidelity"]["batch_size"] < 32  # the check read the outputs calibration kept
    steps = result.report["steps"]
    assert [step["step"] for step in steps] == ["snp", "quantize"]
    assert steps[0]["fidelity"]["samples"] == steps[1]["fidelity"]["samples"] == 256


@pytest.mark.parametrize("method, options", [("cob", {"target_macs": 0.7}), ("omp", {"sparsity": 0.5}),
                                             ("magnitude", {"target_macs": 0.7})])
def test_every_method_names_the_layers_it_cannot_reach_inside_branches(method: str, options: dict) -> None:
    """cob and omp, like the channel methods, list the If whose branches hold layers among what they skipped."""
    calib = {"x": weights(8, 16, seed=4), "sr": np.array(16000, dtype=np.int64)}
    result = graphopt.optimize(_switch_model(), method=method, calib=calib, **options)
    skipped = [line for found in result.report["passes"] for line in found["skipped"]]
    assert any("(If): 4 layers inside its bodies are not pruned" in line for line in skipped), skipped

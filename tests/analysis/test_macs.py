"""MACs and parameters per sample, against hand-computed values; dynamic axes and their resolution."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration.shapes import count_cost
from graphopt.errors import OptionError
from graphopt.inspect import inspect_model
from graphopt.ir.io import load_model
from graphopt.ir.shapes import parse_input_shape, resolve_input_shapes
from tests.conftest import init, tiny, weights

CASES = [  # (id, body, input, output, initializers, MACs, params)
    ("conv", "y = Conv <pads = [1, 1, 1, 1]> (x, w, b)", "float[N, 4, 8, 8] x", "float[N, 6, 8, 8] y",
     [init("w", weights(6, 4, 3, 3)), init("b", weights(6))], 6 * 8 * 8 * 4 * 9, 6 * 4 * 9 + 6),
    ("conv_groups_strided", "y = Conv <group = 2, strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)",
     "float[N, 4, 8, 8] x", "float[N, 6, 4, 4] y", [init("w", weights(6, 2, 3, 3))], 6 * 4 * 4 * 2 * 9, 108),
    ("depthwise", "y = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w)", "float[N, 4, 8, 8] x", "float[N, 4, 8, 8] y",
     [init("w", weights(4, 1, 3, 3))], 4 * 8 * 8 * 9, 36),
    ("conv1d_dilated", "y = Conv <dilations = [2]> (x, w)", "float[N, 4, 10] x", "float[N, 6, 6] y",
     [init("w", weights(6, 4, 3))], 6 * 6 * 4 * 3, 72),
    ("convtranspose", "y = ConvTranspose <strides = [2, 2]> (x, w)", "float[N, 4, 5, 5] x", "float[N, 6, 10, 10] y",
     [init("w", weights(4, 6, 2, 2))], 4 * 5 * 5 * 6 * 4, 96),
    ("convtranspose_groups", "y = ConvTranspose <group = 2, strides = [2, 2]> (x, w)", "float[N, 4, 5, 5] x",
     "float[N, 6, 10, 10] y", [init("w", weights(4, 3, 2, 2))], 4 * 5 * 5 * 3 * 4, 48),
    ("gemm_transB", "y = Gemm <transB = 1> (x, w, c)", "float[N, 8] x", "float[N, 5] y",
     [init("w", weights(5, 8)), init("c", weights(5))], 5 * 8, 45),
    ("gemm_transA", "y = Gemm <transA = 1> (x, w)", "float[8, 1] x", "float[1, 5] y",
     [init("w", weights(8, 5))], 5 * 8, 40),
    ("matmul_rank3", "y = MatMul (x, w)", "float[N, 3, 8] x", "float[N, 3, 5] y", [init("w", weights(8, 5))],
     3 * 5 * 8, 40),
    ("matmul_activations", "t = Transpose <perm = [0, 2, 1]> (x)\n y = MatMul (x, t)", "float[N, 3, 8] x",
     "float[N, 3, 3] y", [], 3 * 3 * 8, 0),
]


@pytest.mark.parametrize("body,inputs,outputs,inits,macs,params", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hand_computed_macs_and_params(body, inputs, outputs, inits, macs, params):
    model = tiny(body, inputs=inputs, outputs=outputs, inits=", ".join(inits))
    shapes = resolve_input_shapes(model)
    report = count_cost(model, shapes)
    assert report.macs == macs
    assert report.params == params
    assert sum(report.per_node.values()) == macs


def test_macs_sum_over_nodes_and_ignore_other_ops():
    model = tiny("""c = Conv <pads = [1, 1, 1, 1]> (x, w)
                    r = Relu (c)
                    p = GlobalAveragePool (r)
                    f = Flatten (p)
                    y = Gemm <transB = 1> (f, fc)""", inputs="float[N, 3, 8, 8] x", outputs="float[N, 10] y",
                 inits=", ".join([init("w", weights(4, 3, 3, 3)), init("fc", weights(10, 4))]))
    report = count_cost(model, resolve_input_shapes(model))
    assert report.macs == 4 * 64 * 27 + 10 * 4
    assert sorted(report.per_node.values()) == [40, 4 * 64 * 27]
    assert report.op_histogram == {"Conv": 1, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 1}


def test_constant_node_weights_count_as_params():
    model = tiny("""w = Constant <value = float[2, 3] {1, 2, 3, 4, 5, 6}> ()
                    shape = Constant <value = int64[2] {1, -1}> ()
                    r = Reshape (x, shape)
                    y = Gemm <transB = 1> (r, w)""", inputs="float[N, 3] x", outputs="float[N, 2] y")
    report = count_cost(model, resolve_input_shapes(model))
    assert report.params == 6 and report.macs == 6


DYNAMIC = dict(body="y = Conv <pads = [1, 1, 1, 1]> (x, w)", inputs="float[N, 3, H, W] x",
               outputs="float[N, 4, H, W] y", inits=init("w", weights(4, 3, 3, 3)))


def test_dynamic_axes_resolved_by_explicit_shape():
    model = tiny(**DYNAMIC)
    shapes = resolve_input_shapes(model, {"x": (1, 3, 16, 8)})
    assert shapes == {"x": (1, 3, 16, 8)}
    assert count_cost(model, shapes).macs == 4 * 16 * 8 * 27
    info = inspect_model(model, input_shapes={"x": (1, 3, 10, 10)})
    assert info["macs"] == 4 * 100 * 27 and info["input_shapes"] == {"x": [1, 3, 10, 10]}


def test_dynamic_axes_resolved_by_data_shapes():
    model = tiny(**DYNAMIC)
    shapes = resolve_input_shapes(model, None, {"x": (1, 3, 6, 6)})
    assert count_cost(model, shapes).macs == 4 * 36 * 27


def test_explicit_shape_wins_over_data():
    model = tiny(**DYNAMIC)
    assert resolve_input_shapes(model, {"x": (1, 3, 2, 2)}, {"x": (1, 3, 6, 6)}) == {"x": (1, 3, 2, 2)}


def test_batch_axis_defaults_to_one_but_other_axes_must_be_given():
    model = tiny(**DYNAMIC)
    with pytest.raises(OptionError, match=r"input 'x' has dynamic axis 2 \('H'\).*--input-shape x="):
        resolve_input_shapes(model)


@pytest.mark.parametrize("explicit,message", [
    ({"y": (1, 3, 8, 8)}, "'y', which is not a model input"),
    ({"x": (1, 3, 8)}, "has rank 3, model says 4"),
    ({"x": (1, 4, 8, 8)}, "sets axis 1 to 4, the model fixes it to 3"),
])
def test_bad_explicit_shapes(explicit, message):
    with pytest.raises(OptionError, match=message):
        resolve_input_shapes(tiny(**DYNAMIC), explicit)


def test_shapes_inference_cannot_reach_are_observed_by_running():
    # Resize by runtime-computed float scales: shape inference leaves the Conv's shapes unknown
    model = tiny("""scales = Mul (half, two)
                    u = Resize <mode = "nearest"> (x, "", scales)
                    y = Conv (u, w)""", inputs="float[N, 3, 4, 4] x", outputs="float[N, 2, 8, 8] y",
                 inits=", ".join([init("half", [1.0, 1.0, 1.0, 1.0]), init("two", [1.0, 1.0, 2.0, 2.0]),
                                  init("w", weights(2, 3, 1, 1))]))
    assert count_cost(model, resolve_input_shapes(model)).macs == 2 * 8 * 8 * 3


@pytest.mark.parametrize("text,expected", [
    ("x=1x3x224x224", ("x", (1, 3, 224, 224))),
    ("input.1=2X3", ("input.1", (2, 3))),
    ("a=b=4", ("a=b", (4,))),
])
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["x", "x=", "=1x3", "x=1x0x3", "x=1x-3", "x=1xax3", "x=1,3"])
def test_parse_input_shape_refuses_bad_text(text):
    with pytest.raises(OptionError, match="--input-shape expects NAME=D1xD2x..."):
        parse_input_shape(text)


# -- per sample: a static batch divides out -----------------------------------------------------

STATIC_BATCH = dict(body="c = Conv <pads = [1, 1, 1, 1]> (x, w)\n f = Flatten (c)\n y = Gemm <transB = 1> (f, fc)",
                    outputs="float[{b}, 5] y", inits=", ".join([init("w", weights(4, 3, 3, 3)),
                                                                  init("fc", weights(5, 4 * 64))]))


@pytest.mark.parametrize("batch", [1, 8])
def test_a_static_batch_counts_per_sample(batch):
    model = tiny(STATIC_BATCH["body"], inputs=f"float[{batch}, 3, 8, 8] x",
                 outputs=STATIC_BATCH["outputs"].format(b=batch), inits=STATIC_BATCH["inits"])
    report = count_cost(model, resolve_input_shapes(model))
    assert report.macs == 4 * 64 * 27 + 5 * 4 * 64
    assert sorted(report.per_node.values()) == [5 * 4 * 64, 4 * 64 * 27]


def test_a_dynamic_batch_given_as_eight_counts_per_sample():
    model = tiny(STATIC_BATCH["body"], inputs="float[N, 3, 8, 8] x", outputs=STATIC_BATCH["outputs"].format(b="N"),
                 inits=STATIC_BATCH["inits"])
    assert count_cost(model, {"x": (8, 3, 8, 8)}).macs == 4 * 64 * 27 + 5 * 4 * 64


@pytest.mark.parametrize("inputs,outputs,body,macs", [
    # no batch axis: the output does not carry the inputs' first axis, nothing is divided
    ("float[3, 8] x", "float[4] y", "m = MatMul (x, w)\n y = ReduceSum <keepdims = 0> (m, axes)", 3 * 4 * 8),
    # two inputs whose first axes differ
    ("float[3, 8] x, float[2, 4] z", "float[3, 4] y, float[2, 4] v", "y = MatMul (x, w)\n v = Relu (z)", 3 * 4 * 8),
])
def test_no_shared_batch_counts_the_inputs_as_given(inputs, outputs, body, macs):
    model = tiny(body, inputs=inputs, outputs=outputs,
                 inits=", ".join([init("w", weights(8, 4)), init("axes", [0], dtype="int64")]))
    assert count_cost(model, resolve_input_shapes(model)).macs == macs


# -- control flow: If, Loop and Scan bodies ------------------------------------------------------

IF_BODY = """cond = Greater (s, zero)
             y = If (cond) <then_branch = then_g () => (float[N, 5] t) {
                   t = MatMul (x, w)
                 }, else_branch = else_g () => (float[N, 5] e) {
                   h = MatMul (x, w2)
                   e = MatMul (h, w3)
                 }>"""
IF_INITS = ", ".join([init("zero", [0.0]), init("w", weights(8, 5)), init("w2", weights(8, 16)),
                      init("w3", weights(16, 5))])


def test_if_counts_its_larger_branch():
    model = tiny(IF_BODY, inputs="float[N, 8] x, float s", outputs="float[N, 5] y", inits=IF_INITS)
    report = count_cost(model, resolve_input_shapes(model))
    assert report.macs == 8 * 16 + 16 * 5 and report.per_node == {"If_1": 8 * 16 + 16 * 5}
    assert report.uncounted == []
    # the scalar input has no batch axis to share, so four rows count as given
    assert count_cost(model, {"x": (4, 8), "s": ()}).macs == 4 * (8 * 16 + 16 * 5)


def _loop(trip: str, declared: str = "float[N, 8] h") -> str:
    return f"""{trip}
               cond = Constant <value = bool {{1}}> ()
               y, ys = Loop (trip, cond, x) <body = body (int64 i, bool c, {declared}) => (bool c_out,
                                                          float[N, 8] h_out, float[N, 8] scan) {{
                   c_out = Identity (c)
                   h_out = MatMul (h, w)
                   scan = Identity (h_out)
                 }}>"""


@pytest.mark.parametrize("trip,inputs,iterations", [
    ("trip = Constant <value = int64 {3}> ()", "float[N, 8] x", 3),
    ("trip = Constant <value = int64 {9223372036854775807}> ()", "float[N, 8] x", 1),  # a while loop's marker
    ("trip = Identity (t)", "float[N, 8] x, int64 t", 1),  # known only at run time
])
def test_loop_counts_its_body_per_constant_iteration(trip, inputs, iterations):
    model = tiny(_loop(trip), inputs=inputs, outputs="float[N, 8] y, float[M, N, 8] ys",
                 inits=init("w", weights(8, 8)))
    report = count_cost(model, resolve_input_shapes(model))
    assert report.macs == iterations * 8 * 8 and report.uncounted == []


def test_loop_body_with_unknown_rank_inputs_is_shaped_from_the_outer_values():
    model = tiny(_loop("trip = Constant <value = int64 {2}> ()", declared="float[?, ?] h"),
                 inputs="float[N, 8] x", outputs="float[N, 8] y, float[M, N, 8] ys", inits=init("w", weights(8, 8)))
    assert count_cost(model, {"x": (1, 8)}).macs == 2 * 8 * 8


def test_scan_counts_its_body_once_per_scanned_step():
    model = tiny("""final, outs = Scan <num_scan_inputs = 1, body = step (float[1, 4] state, float[3] row)
                                                                => (float[1, 4] next, float[1, 4] out) {
                      shape = Constant <value = int64[2] {1, 3}> ()
                      r = Reshape (row, shape)
                      p = MatMul (r, w)
                      next = Add (state, p)
                      out = Identity (next)
                    }> (s0, x)""", inputs="float[1, 4] s0, float[7, 3] x",
                 outputs="float[1, 4] final, float[7, 1, 4] outs",
                 inits=init("w", weights(3, 4)))
    report = count_cost(model, resolve_input_shapes(model))
    assert report.macs == 7 * 3 * 4 and report.per_node == {"Scan_0": 7 * 3 * 4}


def test_nested_control_flow_multiplies():
    # Loop x4 { If (sum(h) > 0) { MatMul 8x8 } else { Identity } }: 4 times the larger branch
    model = tiny("""trip = Constant <value = int64 {4}> ()
                    cond = Constant <value = bool {1}> ()
                    y, ys = Loop (trip, cond, x) <body = body (int64 i, bool c, float[N, 8] h) => (bool c_out,
                                                               float[N, 8] h_out, float[N, 8] scan) {
                        c_out = Identity (c)
                        total = ReduceSum <keepdims = 0> (h)
                        positive = Greater (total, zero)
                        h_out = If (positive) <then_branch = a () => (float[N, 8] ta) {
                                   ta = MatMul (h, w)
                               }, else_branch = b () => (float[N, 8] tb) {
                                   tb = Identity (h)
                               }>
                        scan = Identity (h_out)
                    }>""", inputs="float[N, 8] x", outputs="float[N, 8] y, float[M, N, 8] ys",
                 inits=", ".join([init("w", weights(8, 8)), "float zero = {0.0}"]))
    report = count_cost(model, resolve_input_shapes(model))
    assert report.macs == 4 * 8 * 8 and report.uncounted == []


def test_a_body_node_inference_cannot_shape_is_named_as_uncounted():
    # inside the branch the Reshape target is a run-time value: the MatMul after it cannot be counted
    model = tiny("""cond = Greater (s, zero)
                    y = If (cond) <then_branch = then_g () => (float[N, 5] t) {
                          r = Reshape (x, target)
                          t = MatMul (r, w)
                        }, else_branch = else_g () => (float[N, 5] e) {
                          e = MatMul (x, w)
                        }>""",
                 inputs="float[N, 8] x, float s, int64[2] target", outputs="float[N, 5] y",
                 inits=", ".join([init("zero", [0.0]), init("w", weights(8, 5))]))
    report = inspect_model(model)
    assert report["macs"] == 8 * 5  # the else branch, the one whose cost is known
    assert report["macs_uncounted"] == ["MatMul_1: shape of 'r' unknown"]


def test_the_branch_the_sample_takes_is_counted_by_running_it():
    """Inference cannot shape a branch whose Reshape target is a run-time value; the branch the first
    calibration sample takes (its sample-rate input picks it, as Silero VAD's does) is run spliced into the main
    graph and counted; the other branch, which cannot run one sample, stays uncounted and named."""
    model = tiny("""rate = Constant <value = int64 {16000}> ()
                    cond = Equal (sr, rate)
                    y = If (cond) <then_branch = then_g () => (float[M, 4] t) {
                          r = Reshape (x, target)
                          p = MatMul (r, w1)
                          t = MatMul (p, w2)
                        }, else_branch = else_g () => (float[M, 4] e) {
                          pairs = Constant <value = int64[2] {-1, 32}> ()
                          q = Reshape (x, pairs)
                          e = MatMul (q, w3)
                        }>""", inputs="float[N, 16] x, int64 sr, int64[2] target", outputs="float[M, 4] y",
                 inits=", ".join([init("w1", weights(16, 16)), init("w2", weights(16, 4, seed=1)),
                                  init("w3", weights(32, 4, seed=2))]))
    shapes = {"x": (1, 16), "sr": (), "target": (2,)}
    by_zeros = count_cost(model, shapes)
    assert by_zeros.macs == 0 and len(by_zeros.uncounted) == 3  # zeros pick the branch that cannot run
    sample = {"x": weights(1, 16), "sr": np.array(16000, dtype=np.int64), "target": np.array([1, 16], np.int64)}
    by_sample = count_cost(model, shapes, sample=sample)
    assert by_sample.macs == 16 * 16 + 16 * 4
    assert [line.split(":")[0] for line in by_sample.uncounted] == ["MatMul_2"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_torch_export_with_a_static_batch_of_8_counts_what_batch_1_does(exporter, tmp_path):
    torch = pytest.importorskip("torch")
    from graphopt.torch.export import export_onnx

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 36, 5)).eval()
    counts = []
    for batch in (1, 8):
        path = export_onnx(module, torch.randn(batch, 3, 6, 6), tmp_path / f"b{batch}.onnx", exporter=exporter,
                           dynamic_batch=False)
        model = load_model(path)
        assert resolve_input_shapes(model)[model.graph.input[0].name][0] == batch
        counts.append(count_cost(model, resolve_input_shapes(model)).macs)
    assert counts == [4 * 36 * 27 + 5 * 4 * 36] * 2


@pytest.mark.parametrize("form", ["integer", "qlinear"])
def test_integer_convolutions_and_matmuls_count_as_their_float_originals(form, tmp_path):
    """ConvInteger/MatMulInteger (dynamic quantization) and QLinearConv/QLinearMatMul (static, operator
    format) are counted as the Conv/MatMul they replace: the same MACs as the float model."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    from pathlib import Path

    import numpy as np
    import onnx

    samples = Path(__file__).resolve().parents[2] / "samples"
    source, target = str(samples / "digits_cnn.onnx"), str(tmp_path / "q.onnx")
    if form == "integer":
        quantization.quantize_dynamic(source, target, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        wanted = {"ConvInteger", "MatMulInteger"}
    else:
        images = np.load(samples / "digits_calib.npz")["input"][:16]

        class Reader(quantization.CalibrationDataReader):
            def __init__(self) -> None:
                self.feeds = iter([{"input": images[i:i + 1]} for i in range(len(images))])

            def get_next(self):
                return next(self.feeds, None)

        quantization.quantize_static(source, target, Reader(), quant_format=quantization.QuantFormat.QOperator)
        wanted = {"QLinearConv", "QGemm"}
    quantized = onnx.load(target)
    ops = {node.op_type for node in quantized.graph.node}
    assert wanted <= ops and "Conv" not in ops
    before, after = count_cost(onnx.load(source), {"input": (1, 1, 8, 8)}), count_cost(quantized, {"input": (1, 1, 8, 8)})
    assert after.macs == before.macs
    # every weight is counted once, integer or float (a few float rescaling constants come in, int32 biases go)
    assert abs(after.params - before.params) <= 0.01 * before.params

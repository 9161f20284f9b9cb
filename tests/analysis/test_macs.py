"""MACs and parameters per sample, against hand-computed values; dynamic axes and their resolution."""

from __future__ import annotations

import pytest

from graphopt.calibration.shapes import count_cost
from graphopt.errors import OptionError
from graphopt.inspect import inspect_model
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

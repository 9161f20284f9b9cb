"""The torch interpreter (graphopt.torch.interpreter) computes what onnxruntime computes.

Every zoo architecture exported by both torch exporters (BatchNorm kept as nodes), the same graphs after
graphopt's pre-passes (what --repair trains), the raw exports of the small test modules (Constant nodes,
Identity, shape arithmetic left in) and hand-written graphs for the attribute corners (asymmetric pads,
negative Slice steps, opset-11 Softmax, ...) run in the interpreter and in onnxruntime without graph
optimisations, at a batch size other than the export's, to float32 tolerance. Ops without a rule are
refused at build time, naming the op and the node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import parse, random_inputs, run_ort

torch = pytest.importorskip("torch")

from graphopt.api import optimize  # noqa: E402
from graphopt.errors import GraphoptError, UnsupportedOpError  # noqa: E402
from graphopt.torch.interpreter.module import GraphModule  # noqa: E402
from graphopt.torch.zoo import ZOO  # noqa: E402

EXPORTERS = ("legacy", "dynamo")


def interpreted(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    module = GraphModule(model)
    with torch.no_grad():
        found = module({name: torch.from_numpy(value) for name, value in feeds.items()})
    return {name: value.numpy() for name, value in found.items()}


def assert_matches_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected, actual = run_ort(model, feeds), interpreted(model, feeds)
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.fixture(scope="module")
def zoo_exports(zoo_path) -> dict[tuple[str, str], onnx.ModelProto]:
    """Every zoo model from both exporters (opset 17, BatchNorm kept), from the session's export cache."""
    return {(name, exporter): onnx.load(str(zoo_path(name, exporter, 17, False)))
            for name in ZOO for exporter in EXPORTERS}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_match_onnxruntime(zoo_exports, name: str, exporter: str) -> None:
    model = zoo_exports[name, exporter]
    assert_matches_onnxruntime(model, random_inputs(model, batch=3, seed=1))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "shufflenet", "transformer", "unet"])
def test_pre_passed_models_match_onnxruntime(zoo_exports, name: str, exporter: str) -> None:
    model = optimize(zoo_exports[name, exporter], method="none").model
    assert_matches_onnxruntime(model, random_inputs(model, batch=3, seed=2))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "legacy_raw", "dynamo_raw"])
@pytest.mark.parametrize("name", ["conv_stack", "linear_stack"])
def test_raw_exports_match_onnxruntime(torch_export, name: str, exporter: str) -> None:
    model = torch_export(name, exporter)
    assert_matches_onnxruntime(model, random_inputs(model, batch=3, seed=3))


def test_the_digits_sample_matches_onnxruntime() -> None:
    model = onnx.load(str(Path(__file__).resolve().parents[2] / "samples" / "digits_cnn.onnx"))
    assert_matches_onnxruntime(model, random_inputs(model, batch=5, seed=4))


def test_weights_and_biases_are_parameters_and_the_rest_buffers(zoo_exports) -> None:
    model = optimize(zoo_exports["transformer", "legacy"], method="none").model
    module = GraphModule(model)
    trained = set(module.parameter_names)
    weighted = {node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm", "LayerNormalization")
                if node.input[1] in {t.name for t in model.graph.initializer}}
    assert weighted and weighted <= trained
    integers = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64}
    assert integers and not integers & trained  # shapes and axes stay buffers
    feeds = random_inputs(model, batch=2, seed=5)
    module({k: torch.from_numpy(v) for k, v in feeds.items()})["output"].square().sum().backward()
    assert all(parameter.grad is not None for parameter in module.parameters())


HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>'
CORNERS = {
    "conv_asymmetric_pads_and_dilation": (17, """
        g (float[2, 3, 9, 9] x) => (float[2, 4, 4, 5] y)
            <float[4, 3, 3, 3] w = {SEQ108}, float[4] b = {0.1, -0.2, 0.3, 0.0}> {
            y = Conv <pads = [0, 1, 2, 0], strides = [2, 2], dilations = [1, 2]> (x, w, b)
        }"""),
    "conv_same_lower": (17, """
        g (float[1, 2, 7, 6] x) => (float[1, 2, 4, 3] y) <float[2, 2, 2, 3] w = {SEQ24}> {
            y = Conv <auto_pad = "SAME_LOWER", strides = [2, 2]> (x, w)
        }"""),
    "conv_transpose_asymmetric": (17, """
        g (float[1, 4, 5, 5] x) => (float[1, 2, 10, 12] y) <float[4, 1, 3, 3] w = {SEQ36}> {
            y = ConvTranspose <strides = [2, 2], pads = [1, 0, 0, 0], output_padding = [1, 1], group = 2> (x, w)
        }"""),
    "pools": (17, """
        g (float[1, 3, 7, 7] x) => (float[1, 3, 4, 4] a, float[1, 3, 3, 4] m) {
            a = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
            m = MaxPool <kernel_shape = [3, 2], strides = [2, 2], pads = [0, 1, 0, 0]> (x)
        }"""),
    "average_pool_asymmetric_counts": (17, """
        g (float[1, 2, 6, 6] x) => (float[1, 2, 4, 4] a, float[1, 2, 4, 4] i) {
            a = AveragePool <kernel_shape = [2, 2], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
            i = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [2, 2, 1, 1], count_include_pad = 1> (x)
        }"""),
    "depth_space_and_prelu": (17, """
        g (float[1, 8, 3, 2] x) => (float[1, 2, 6, 4] d, float[1, 2, 6, 4] c, float[1, 8, 3, 2] s, float[1, 8, 3, 2] p)
            <float[8, 1, 1] slope = {0.1, -0.2, 0.3, 0.0, 0.5, 1.5, -1.0, 0.25}> {
            d = DepthToSpace <blocksize = 2> (x)
            c = DepthToSpace <blocksize = 2, mode = "CRD"> (x)
            s = SpaceToDepth <blocksize = 2> (d)
            p = PRelu (x, slope)
        }"""),
    "softmax_opset_11_flattens": (11, """
        g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[2, 3, 4] z) {
            y = Softmax <axis = 1> (x)
            z = LogSoftmax (x)
        }"""),
    "slice_negative_steps_and_clamping": (17, """
        g (float[4, 6, 5] x) => (float[2, 3, 5] y) <int64[2] s = {-1, 100}, int64[2] e = {-100, 0}, int64[2] a = {0, 1},
                                                    int64[2] k = {-2, -2}> {
            y = Slice (x, s, e, a, k)
        }"""),
    "shape_arithmetic": (17, """
        g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[1, 3, 4] z, float[2, 3, 4] w, float[2, 3, 4] q)
            <int64[1] one = {1}, int64[1] three = {3}, int64[3] lead = {2, 1, 1}> {
            s = Shape <start = 1> (x)
            r = Gather <axis = 0> (s, one)
            c = Concat <axis = 0> (three, r)
            fill = ConstantOfShape <value = float[1] {0.5}> (c)
            y = Add (x, fill)
            big = Expand (fill, lead)
            z = Slice (big, one, three)
            more = Greater (big, y)
            w = Where (more, big, y)
            u = Unsqueeze (r, one)
            sq = Squeeze (u)
            f = Cast <to = 1> (sq)
            q = Mul (x, f)
        }"""),
    "split_pad_reduce_clip": (18, """
        g (float[2, 6, 4] x) => (float[2, 2, 4] a, float[2, 4, 8] b, float[2, 1, 4] c, float[2, 6, 4] d)
            <int64[2] parts = {2, 4}, int64[6] pads = {0, 0, 2, 0, 0, 2}, int64[1] ax = {1}, float lo = {-0.5},
             float hi = {0.5}> {
            a, rest = Split <axis = 1> (x, parts)
            b = Pad <mode = "reflect"> (rest, pads)
            c = ReduceMean <keepdims = 1> (x, ax)
            d = Clip (x, lo, hi)
        }"""),
    "border_pads_on_any_axis": (18, """
        g (float[2, 5, 1] x) => (float[2, 9, 1] r, float[2, 8, 1] e, float[3, 7, 1] w, float[2, 3, 1] c)
            <int64[6] two = {0, 2, 0, 0, 2, 0}, int64[6] edge = {0, 1, 0, 0, 2, 0}, int64[6] wrap = {1, 0, 0, 0, 2, 0},
             int64[6] crop = {0, -1, 0, 0, -1, 0}> {
            r = Pad <mode = "reflect"> (x, two)
            e = Pad <mode = "edge"> (x, edge)
            w = Pad <mode = "wrap"> (x, wrap)
            c = Pad <mode = "reflect"> (x, crop)
        }"""),
    "normalisations_and_activations": (17, """
        g (float[2, 3, 4] x) => (float[2, 3, 4] y)
            <float[4] s = {1.0, 0.5, -1.0, 2.0}, float[4] b = {0.0, 0.1, 0.2, 0.3}> {
            n = LayerNormalization <epsilon = 0.001> (x, s, b)
            h = HardSwish (n)
            g1 = HardSigmoid <alpha = 0.3> (h)
            l = LeakyRelu <alpha = 0.2> (g1)
            e = Erf (l)
            p = Pow (x, s)
            m = Abs (p)
            root = Sqrt (m)
            th = Tanh (root)
            y = Add (e, th)
        }"""),
    "group_normalization": (21, """
        g (float[2, 6, 3, 4] x) => (float[2, 6, 3, 4] y)
            <float[6] s = {1.0, 0.5, -1.0, 2.0, 0.3, 1.5}, float[6] b = {0.0, 0.1, 0.2, 0.3, -0.4, 0.5}> {
            y = GroupNormalization <num_groups = 3, epsilon = 0.001> (x, s, b)
        }"""),
    "resize_nearest_and_linear": (17, """
        g (float[1, 2, 3, 4] x) => (float[1, 2, 6, 8] n, float[1, 2, 6, 8] l) <float[4] sc = {1.0, 1.0, 2.0, 2.0}> {
            n = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric",
                        nearest_mode = "floor"> (x, , sc)
            l = Resize <mode = "linear"> (x, , sc)
        }"""),
    "one_hot_axes_and_negative_indices": (11, """
        g (float[2, 3] x) => (float[2, 3, 4] y, float[4, 2, 3] z)
            <int64[2, 3] i = {0, -1, 3, 5, -4, 2}, float[1] depth = {4.0}, float[2] v = {-0.5, 2.0}> {
            h = OneHot (i, depth, v)
            u = Unsqueeze <axes = [2]> (x)
            y = Add (h, u)
            z = OneHot <axis = 0> (i, depth, v)
        }"""),
    "gemm_transposes": (17, """
        g (float[3, 5] x) => (float[5, 2] y) <float[2, 3] w = {SEQ6}, float[2] b = {1.0, -1.0}> {
            y = Gemm <transA = 1, transB = 1, alpha = 0.5, beta = 2.0> (x, w, b)
        }"""),
}


def _corner(opset: int, body: str) -> onnx.ModelProto:
    for size in (108, 36, 24, 6):  # SEQn: n seeded values, exactly representable
        values = np.random.default_rng(size).standard_normal(size).astype(np.float32)
        body = body.replace(f"SEQ{size}", ", ".join(repr(float(v)) for v in values))
    return parse(HEADER.format(opset=opset) + body, check=False)


@pytest.mark.parametrize("name", list(CORNERS))
def test_attribute_corners_match_onnxruntime(name: str) -> None:
    model = _corner(*CORNERS[name])
    assert_matches_onnxruntime(model, random_inputs(model, seed=6))


def test_an_op_without_a_rule_is_refused_naming_op_and_node() -> None:
    model = parse(HEADER.format(opset=17) + """
        g (float[2, 4] x) => (float[2, 4] y) <int64 axis = {1}> {
            r = Relu (x)
            y = CumSum <name = "running_total"> (r, axis)
        }""", check=False)
    model.graph.node[1].name = "running_total"
    with pytest.raises(UnsupportedOpError, match="op CumSum of node 'running_total' has no rule") as caught:
        GraphModule(model)
    assert isinstance(caught.value, GraphoptError) and "\n" not in str(caught.value)


def test_an_attribute_a_rule_cannot_honour_is_refused_naming_the_node() -> None:
    model = parse(HEADER.format(opset=17) + """
        g (float[1, 1, 2, 2] x) => (float[1, 1, 4, 4] y) <float[4] sc = {1.0, 1.0, 2.0, 2.0}> {
            y = Resize <mode = "cubic"> (x, , sc)
        }""", check=False)
    model.graph.node[0].name = "upsample"
    with pytest.raises(UnsupportedOpError, match="cannot run Resize node 'upsample': mode cubic"):
        interpreted(model, random_inputs(model))


@pytest.mark.parametrize("axis", [1, -1])
def test_graphopts_own_functions_match_onnxruntime(axis: int) -> None:
    # graphopt.RMSNorm (its divisor the attribute, not the axis size) and graphopt.TSRA, as CoB writes them
    from onnx import TensorProto, helper

    from graphopt.ops.library import ensure_functions
    from graphopt.ops.rms_norm import make_rms_norm_node
    from graphopt.ops.tsra import make_tsra_node

    shape = [3, 6, 4, 5] if axis == 1 else [3, 4, 6]
    nodes = [make_rms_norm_node("x", "n", 9, 1e-5, axis=axis),
             make_tsra_node("n", "y", 2, axis=axis, alpha_u=3.0, beta_v=0.6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ensure_functions(model)
    assert_matches_onnxruntime(model, random_inputs(model, seed=3))


def _recurrent(op: str, direction: str, layout: int, states: bool, peepholes: bool = False,
               **attrs: int) -> onnx.ModelProto:
    """One `op` layer (hidden 5 over 4 features, 6 steps) with biases, every output named."""
    from onnx import TensorProto, helper, numpy_helper

    gates, count, hidden = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 2 if direction == "bidirectional" else 1, 5
    rng = np.random.default_rng(len(op) + layout)
    arrays = {"W": rng.standard_normal((count, gates * hidden, 4)),
              "R": rng.standard_normal((count, gates * hidden, hidden)),
              "B": rng.standard_normal((count, 2 * gates * hidden))}
    names = ["x", "W", "R", "B", ""]
    state_shape = [3, count, hidden] if layout else [count, 3, hidden]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6, 4] if layout else [6, 3, 4])]
    if states:
        for state in ["h0", "c0"][:2 if op == "LSTM" else 1]:
            names.append(state)
            inputs.append(helper.make_tensor_value_info(state, TensorProto.FLOAT, state_shape))
    if peepholes:
        arrays["P"] = rng.standard_normal((count, 3 * hidden))
        names += [""] * (7 - len(names)) + ["P"]
    outputs = ["Y", "Y_h", "Y_c"][:3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outputs, hidden_size=hidden, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph([node], op.lower(), inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                           for o in outputs],
                              [numpy_helper.from_array(v.astype(np.float32) * 0.5, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,direction,layout,states,peepholes,attrs", [
    ("LSTM", "bidirectional", 0, True, True, {}), ("LSTM", "reverse", 0, False, False, {}),
    ("GRU", "forward", 0, True, False, {}), ("GRU", "bidirectional", 0, False, False, {"linear_before_reset": 1}),
    ("RNN", "reverse", 0, True, False, {}), ("RNN", "bidirectional", 0, True, False, {})],
    ids=["lstm-bi-peepholes", "lstm-reverse", "gru", "gru-bi-before-reset", "rnn-reverse", "rnn-bi"])
def test_recurrent_layers_match_onnxruntime(op: str, direction: str, layout: int, states: bool, peepholes: bool,
                                            attrs: dict) -> None:
    model = _recurrent(op, direction, layout, states, peepholes, **attrs)
    assert_matches_onnxruntime(model, random_inputs(model, seed=7))


def test_a_recurrent_layer_with_other_activations_or_batch_first_is_refused_naming_them() -> None:
    model = _recurrent("RNN", "forward", 0, False, activations=["Relu"])
    with pytest.raises(UnsupportedOpError, match="activations"):
        interpreted(model, random_inputs(model))
    model = _recurrent("GRU", "forward", 1, False)
    with pytest.raises(UnsupportedOpError, match="layout 1"):
        interpreted(model, random_inputs(model))

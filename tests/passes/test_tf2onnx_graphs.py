"""Graphs that are not from torch: the layouts tf2onnx and Paddle2ONNX write, pruned like torch's.

The models are written with onnx.helper the way those exporters write Keras and Paddle layers:
- a content classifier (one-hot bytes, Dense + GELU, LayerNorm, a wide Conv1D, global max pooling,
  Dense), whose Conv output is also read by a ReduceSum over the channel axis; at opset 17 with
  LayerNormalization, at opset 13 with the LayerNorm decomposed into moments as tf2onnx writes it;
- a token tagger: Conv1D as Transpose/Conv/Transpose, a Dense on [N, T, C] as tf.tensordot writes it
  (Reshape to [-1, C], MatMul, Add, Reshape back to a shape concatenated from Shape and a constant),
  a per-token Dense, a decomposed LayerNorm, mean pooling over tokens, Dense, Softmax;
- an NHWC convnet before tf2onnx's transpose optimiser: a Transpose to NCHW and back around every
  Conv, the residual Add and ReLUs in NHWC, global average pooling as ReduceMean over [1, 2];
- Paddle2ONNX's Conv1D as Unsqueeze/Conv2D/Squeeze pairs, a residual Add, ReduceMean with keepdims
  and a Reshape to [0, -1], Linear as MatMul + Add;
- a JAX byte classifier through jax2tf and tf2onnx, as Magika's model is written: one-hot by Equal, a
  Reshape laying neighbouring positions side by side on the channel axis, a normalisation over positions
  broadcast back by Reshape and Expand with shapes built in int32 and cast, a Conv between tf2onnx's
  Unsqueeze/Transpose/Squeeze, global max pooling, a decomposed LayerNorm over the channels.

magnitude and snp reach 0.7 and 0.5 of the MACs within 2% on each, in a model that passes the ONNX
checker (full check) with the original's input and output names, dtypes and declared dims and runs in
onnxruntime. Planted zero and duplicate channels are removed exactly (snp at keep_variance 1, magnitude
for zeros), the duplicate folded into every consumer, a ReduceSum over the channels included. A
reduction over the channels is a linear consumer (a row of ones, or of 1/n for a mean); a statistic
over channels broadcast back onto them (a decomposed LayerNorm) blocks them with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.analysis.groups import find_groups
from graphopt.calibration.shapes import batch1_shapes
from graphopt.ir import graph as ir
from graphopt.ir.shapes import resolve_input_shapes
from graphopt.passes.channels.engine import apply_kept
from graphopt.passes.channels.reduction import as_linear
from tests.conftest import run_ort

TOLERANCE = 0.02
TARGETS = (0.7, 0.5)
EXACT = 1e-4
CALIBRATION, CHECK = 48, 3
PLANTED_CALIBRATION = 256  # more samples than a pooled consumer reads features: exact fits are determined


# -- the graphs ---------------------------------------------------------------------------------

class Writer:
    """Nodes and initializers of one graph, with seeded weights."""

    def __init__(self, seed: int, opset: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, values: Any) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def weight(self, name: str, *shape: int) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        return self.const(name, (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    def bias(self, name: str, size: int, offset: float = 0.0) -> str:
        return self.const(name, (offset + 0.1 * self.rng.standard_normal(size)).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}:0"], name=name, **attrs))
        return f"{name}:0"

    def axes_op(self, op_type: str, x: str, name: str, axes: list[int], **attrs: Any) -> str:
        """Squeeze/Unsqueeze (axes an input from opset 13) and reductions (from 13 for ReduceSum, 18 others)."""
        as_input = self.opset >= (13 if op_type in ("Squeeze", "Unsqueeze", "ReduceSum") else 18)
        if as_input:
            return self.op(op_type, [x, self.const(f"{name}/axes", np.array(axes, np.int64))], name, **attrs)
        return self.op(op_type, [x], name, axes=axes, **attrs)

    def model(self, output: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        self.nodes[-1].output[0] = output
        graph = helper.make_graph(self.nodes, "tf2onnx", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="tf2onnx",
                                  producer_version="1.16.1 15c810")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def dense(w: Writer, x: str, name: str, fan_in: int, units: int) -> str:
    """Keras Dense on [..., C]: MatMul by a constant [C, K] and an Add of the bias."""
    y = w.op("MatMul", [x, w.weight(f"{name}/kernel", fan_in, units)], f"{name}/MatMul")
    return w.op("Add", [y, w.bias(f"{name}/bias", units)], f"{name}/BiasAdd")


def gelu(w: Writer, x: str, name: str) -> str:
    """tf.nn.gelu(approximate=False): 0.5 * x * (1 + erf(x / sqrt 2))."""
    sqrt2 = w.const(f"{name}/sqrt2", np.array(np.sqrt(2.0), np.float32))
    erf = w.op("Erf", [w.op("Div", [x, sqrt2], f"{name}/truediv")], f"{name}/Erf")
    one = w.op("Add", [erf, w.const(f"{name}/one", np.array(1.0, np.float32))], f"{name}/add")
    return w.op("Mul", [w.op("Mul", [x, one], f"{name}/mul_1"), w.const(f"{name}/half", np.array(0.5, np.float32))],
                f"{name}/mul")


def layer_norm(w: Writer, x: str, name: str, channels: int) -> str:
    """Keras LayerNormalization: the op from opset 17; below, tf.nn.moments and batch_normalization."""
    gamma = w.const(f"{name}/gamma", (1 + 0.1 * w.rng.standard_normal(channels)).astype(np.float32))
    beta = w.bias(f"{name}/beta", channels)
    if w.opset >= 17:
        return w.op("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=1e-3)
    mean = w.axes_op("ReduceMean", x, f"{name}/moments/mean", [-1], keepdims=1)
    centred = w.op("Sub", [x, mean], f"{name}/moments/SquaredDifference")
    variance = w.axes_op("ReduceMean", w.op("Mul", [centred, centred], f"{name}/moments/SquaredDifference__1"),
                         f"{name}/moments/variance", [-1], keepdims=1)
    std = w.op("Sqrt", [w.op("Add", [variance, w.const(f"{name}/eps", np.array(1e-3, np.float32))], f"{name}/add")],
               f"{name}/Rsqrt__1")
    scale = w.op("Mul", [w.op("Reciprocal", [std], f"{name}/Rsqrt"), gamma], f"{name}/mul")
    shift = w.op("Sub", [beta, w.op("Mul", [mean, scale], f"{name}/mul_2")], f"{name}/sub")
    return w.op("Add", [w.op("Mul", [x, scale], f"{name}/mul_1"), shift], f"{name}/add_1")


def conv1d_nhwc(w: Writer, x: str, name: str, cin: int, cout: int, width: int) -> str:
    """Keras Conv1D + ReLU on [N, T, C]: ExpandDims -> Conv2D in NHWC -> Squeeze, with tf2onnx's transposes."""
    nchw = w.op("Transpose", [w.axes_op("Unsqueeze", x, f"{name}/ExpandDims", [1])], f"{name}/Conv2D__6",
                perm=[0, 3, 1, 2])
    y = w.op("Conv", [nchw, w.weight(f"{name}/kernel", cout, cin, 1, width), w.bias(f"{name}/bias", cout, 0.5)],
             f"{name}/Conv2D", pads=[0, width // 2, 0, width // 2], kernel_shape=[1, width])
    nhwc = w.op("Transpose", [w.op("Relu", [y], f"{name}/Relu")], f"{name}/Conv2D__8", perm=[0, 2, 3, 1])
    return w.axes_op("Squeeze", nhwc, f"{name}/Squeeze", [1])


def text_classifier(opset: int = 17, length: int = 48, embed: int = 24, filters: int = 64) -> onnx.ModelProto:
    w = Writer(0, opset)
    ids = w.op("Cast", ["bytes"], "model/tf.cast/Cast", to=TensorProto.INT64)
    hot = w.op("OneHot", [ids, w.const("model/one_hot/depth", np.array([256], np.int64)),
                          w.const("model/one_hot/values", np.array([0.0, 1.0], np.float32))], "model/one_hot", axis=-1)
    h = layer_norm(w, gelu(w, dense(w, hot, "model/embed", 256, embed), "model/embed/Gelu"), "model/ln", embed)
    h = conv1d_nhwc(w, h, "model/conv1d", embed, filters, 9)
    salience = w.axes_op("ReduceSum", h, "model/salience/Sum", [-1], keepdims=0)
    peak = w.axes_op("ReduceMax", salience, "model/salience/Max", [1], keepdims=1)
    pooled = w.axes_op("ReduceMax", h, "model/global_max_pooling1d/Max", [1], keepdims=0)
    features = w.op("Concat", [pooled, peak], "model/concatenate/concat", axis=-1)
    dense(w, features, "model/dense", filters + 1, 4)
    return w.model("dense", [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["unk__8", length])],
                   [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__9", 4])])


def gelu_tanh(w: Writer, x: str, name: str) -> str:
    """jax.nn.gelu (the tanh form): 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))."""
    cube = w.op("Mul", [x, w.op("Mul", [x, w.op("Mul", [w.const(f"{name}/c", np.array(0.044715, np.float32)), x],
                                                     f"{name}/Mul")], f"{name}/Mul_1")], f"{name}/Mul_2")
    inner = w.op("Mul", [w.const(f"{name}/k", np.array(0.7978846, np.float32)),
                         w.op("Add", [x, cube], f"{name}/AddV2")], f"{name}/Mul_3")
    one = w.op("Add", [w.const(f"{name}/one", np.array(1.0, np.float32)), w.op("Tanh", [inner], f"{name}/Tanh")],
               f"{name}/AddV2_1")
    return w.op("Mul", [x, w.op("Mul", [w.const(f"{name}/half", np.array(0.5, np.float32)), one], f"{name}/Mul_4")],
                f"{name}/Mul_5")


def _runtime_shape(w: Writer, batch: str, name: str, *sizes: int) -> str:
    """[N, *sizes] as jax2tf writes it: int32 pieces concatenated after the batch size, cast to int64."""
    pieces = [w.const(f"{name}/c{i}", np.array([size], np.int32)) for i, size in enumerate(sizes)]
    return w.op("Cast", [w.op("Concat", [batch, *pieces], f"{name}/Concat", axis=0)], f"{name}/Cast",
                to=TensorProto.INT64)


def byte_classifier(length: int = 64, embed: int = 64, fold: int = 4, filters: int = 32) -> onnx.ModelProto:
    """A JAX content classifier through jax2tf and tf2onnx, as Magika's model is written (opset 15): one-hot
    bytes by Equal against a range, Dense + tanh GELU on [N, L, C], a Reshape that lays `fold` neighbouring
    positions side by side ([N, L, C] -> [N, L / fold, fold x C], shapes concatenated in int32 and cast), a
    normalisation of each feature over the positions with per-position scale and shift (its moments broadcast
    back by Reshape and Expand), a Conv over the positions with tf2onnx's Unsqueeze/Transpose/Squeeze, GELU,
    global max pooling, a decomposed LayerNorm over the channels and a Dense."""
    w = Writer(4, 15)
    batch = w.op("Slice", [w.op("Cast", [w.op("Shape", ["bytes"], "Shape")], "Shape__8", to=TensorProto.INT32),
                           w.const("axes0", np.array([0], np.int64)), w.const("one", np.array([1], np.int64))],
                 "strided_slice")
    column = w.op("Reshape", ["bytes", w.const("one_hot/shape", np.array([-1, length, 1], np.int64))],
                  "one_hot/Reshape")
    hot = w.op("Cast", [w.op("Equal", [column, w.const("one_hot/range", np.arange(257, dtype=np.int32)[None, None])],
                             "one_hot/Equal")], "one_hot/Cast", to=TensorProto.FLOAT)
    h = w.op("MatMul", [hot, w.weight("Dense_0/kernel", 257, embed)], "Dense_0/einsum/Einsum")
    h = gelu_tanh(w, w.op("Add", [h, w.bias("Dense_0/bias", embed)], "Dense_0/AddV2"), "ApplyActivation_0")
    rows, features = length // fold, fold * embed
    x = w.op("Reshape", [h, _runtime_shape(w, batch, "Reshape/shape", rows, features)], "Reshape")
    count = w.const("LayerNorm_0/count", np.array(1.0 / rows, np.float32))
    mean = w.op("Mul", [w.axes_op("ReduceSum", x, "LayerNorm_0/Sum", [1], keepdims=0), count], "LayerNorm_0/truediv")
    square = w.op("Mul", [w.axes_op("ReduceSum", w.op("Mul", [x, x], "LayerNorm_0/Square"), "LayerNorm_0/Sum_1", [1],
                                    keepdims=0), count], "LayerNorm_0/truediv_1")
    variance = w.op("Max", [w.const("zero", np.array(0.0, np.float32)),
                            w.op("Sub", [square, w.op("Mul", [mean, mean], "LayerNorm_0/Square_1")],
                                 "LayerNorm_0/Sub")], "LayerNorm_0/Maximum")
    shape = _runtime_shape(w, batch, "LayerNorm_0/BroadcastTo/shape", 1, features)
    spread = w.op("Expand", [w.op("Reshape", [variance, shape], "LayerNorm_0/Reshape_1"), shape],
                  "LayerNorm_0/BroadcastTo_1")
    root = w.op("Sqrt", [w.op("Add", [spread, w.const("eps", np.array(1e-6, np.float32))], "LayerNorm_0/AddV2")],
                "LayerNorm_0/Rsqrt")
    inverse = w.op("Reciprocal", [root], "LayerNorm_0/Rsqrt__1")
    scale = w.op("Mul", [inverse, w.const("LayerNorm_0/scale", (1 + 0.1 * w.rng.standard_normal((1, rows, 1)))
                                          .astype(np.float32))], "LayerNorm_0/Mul")
    centre = w.op("Expand", [w.op("Reshape", [mean, shape], "LayerNorm_0/Reshape"), shape], "LayerNorm_0/BroadcastTo")
    y = w.op("Add", [w.op("Mul", [w.op("Sub", [x, centre], "LayerNorm_0/Sub_1"), scale], "LayerNorm_0/Mul_1"),
                     w.const("LayerNorm_0/shift", (0.1 * w.rng.standard_normal((1, rows, 1))).astype(np.float32))],
             "LayerNorm_0/AddV2_1")
    nchw = w.op("Transpose", [w.axes_op("Unsqueeze", y, "Unsqueeze", [3])], "Conv_0/Conv2D__1", perm=[0, 2, 1, 3])
    c = w.op("Conv", [nchw, w.weight("Conv_0/kernel", filters, features, 5, 1)], "Conv_0/Conv2D", kernel_shape=[5, 1])
    c = w.op("Add", [w.axes_op("Squeeze", c, "Conv_0/Squeeze", [3]),
                     w.const("Conv_0/bias", (0.1 * w.rng.standard_normal((1, filters, 1))).astype(np.float32))],
             "Conv_0/AddV2")
    pooled = w.axes_op("Squeeze", w.op("GlobalMaxPool", [gelu_tanh(w, c, "ApplyActivation_1")], "Max"), "Max_Squeeze",
                       [2])
    dense(w, layer_norm(w, pooled, "LayerNorm_1", filters), "Dense_1", filters, 6)
    return w.model("target_label", [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["unk__214", length])],
                   [helper.make_tensor_value_info("target_label", TensorProto.FLOAT, ["unk__215", 6])])


def tensordot_tagger(opset: int = 13, length: int = 24, channels: int = 16) -> onnx.ModelProto:
    w = Writer(1, opset)
    x = w.op("Transpose", ["embeddings"], "model/conv1d/conv1d__4", perm=[0, 2, 1])
    y = w.op("Conv", [x, w.weight("model/conv1d/kernel", 48, channels, 3), w.bias("model/conv1d/bias", 48)],
             "model/conv1d/conv1d", pads=[1, 1], kernel_shape=[3])
    h = w.op("Transpose", [w.op("Relu", [y], "model/conv1d/Relu")], "model/conv1d/conv1d__6", perm=[0, 2, 1])
    rows = w.op("Reshape", [h, w.const("model/dense/Tensordot/Reshape/shape", np.array([-1, 48], np.int64))],
                "model/dense/Tensordot/Reshape")
    z = dense(w, rows, "model/dense/Tensordot", 48, 40)
    free = w.op("Slice", [w.op("Shape", [h], "model/dense/Tensordot/Shape"),
                          w.const("model/dense/Tensordot/begin", np.array([0], np.int64)),
                          w.const("model/dense/Tensordot/end", np.array([2], np.int64))], "model/dense/Tensordot/free")
    shape = w.op("Concat", [free, w.const("model/dense/Tensordot/Const_2", np.array([40], np.int64))],
                 "model/dense/Tensordot/concat_1", axis=0)
    z = w.op("Relu", [w.op("Reshape", [z, shape], "model/dense/Tensordot")], "model/dense/Relu")
    z = w.op("Relu", [dense(w, z, "model/token", 40, 32)], "model/token/Relu")
    pooled = w.axes_op("ReduceMean", layer_norm(w, z, "model/ln", 32), "model/global_average_pooling1d/Mean", [1],
                       keepdims=0)
    w.op("Softmax", [dense(w, pooled, "model/dense_1", 32, 5)], "model/dense_1/Softmax", axis=-1)
    embeddings = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["unk__3", length, channels])
    return w.model("dense_1", [embeddings], [helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, ["unk__4", 5])])


def nhwc_convnet(opset: int = 13, size: int = 12) -> onnx.ModelProto:
    w = Writer(2, opset)

    def conv(x: str, name: str, cin: int, cout: int) -> str:
        nchw = w.op("Transpose", [x], f"{name}/Conv2D__1", perm=[0, 3, 1, 2])
        y = w.op("Conv", [nchw, w.weight(f"{name}/kernel", cout, cin, 3, 3), w.bias(f"{name}/bias", cout)],
                 f"{name}/Conv2D", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        return w.op("Transpose", [y], f"{name}/Conv2D__2", perm=[0, 2, 3, 1])

    h = w.op("Relu", [conv("input_1", "model/conv2d", 3, 24)], "model/conv2d/Relu")
    r = w.op("Relu", [conv(h, "model/conv2d_1", 24, 24)], "model/conv2d_1/Relu")
    h = w.op("Relu", [w.op("Add", [h, conv(r, "model/conv2d_2", 24, 24)], "model/add/add")], "model/re_lu/Relu")
    h = w.op("Relu", [conv(h, "model/conv2d_3", 24, 32)], "model/conv2d_3/Relu")
    pooled = w.axes_op("ReduceMean", h, "model/global_average_pooling2d/Mean", [1, 2], keepdims=0)
    dense(w, pooled, "model/dense", 32, 10)
    return w.model("dense", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__5", size, size, 3])],
                   [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__6", 10])])


def paddle_conv1d(opset: int = 13, length: int = 32) -> onnx.ModelProto:
    w = Writer(3, opset)

    def conv(x: str, name: str, cin: int, cout: int) -> str:
        up = w.axes_op("Unsqueeze", x, f"{name}/unsqueeze2", [2])
        y = w.op("Conv", [up, w.weight(f"{name}.w_0", cout, cin, 1, 3), w.bias(f"{name}.b_0", cout)], f"{name}/conv2d",
                 pads=[0, 1, 0, 1], kernel_shape=[1, 3])
        return w.axes_op("Squeeze", y, f"{name}/squeeze2", [2])

    h = w.op("Relu", [conv("x", "conv1d_0", 8, 24)], "relu_0")
    r = w.op("Relu", [conv(h, "conv1d_1", 24, 24)], "relu_1")
    h = w.op("Relu", [w.op("Add", [h, conv(r, "conv1d_2", 24, 24)], "elementwise_add_0")], "relu_2")
    pooled = w.axes_op("ReduceMean", h, "reduce_mean_0", [2], keepdims=1)
    flat = w.op("Reshape", [pooled, w.const("reshape2_0.shape", np.array([0, -1], np.int64))], "reshape2_0")
    dense(w, flat, "linear_0", 24, 6)
    return w.model("linear_0.tmp_1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, length])],
                   [helper.make_tensor_value_info("linear_0.tmp_1", TensorProto.FLOAT, ["batch", 6])])


GRAPHS: dict[str, Callable[[], onnx.ModelProto]] = {
    "text_classifier": text_classifier,
    "text_classifier_opset13": lambda: text_classifier(opset=13),
    "text_classifier_opset11": lambda: text_classifier(opset=11),  # below the opset graphopt's RMSNorm needs
    "tensordot_tagger": tensordot_tagger,
    "nhwc_convnet": nhwc_convnet,
    "paddle_conv1d": paddle_conv1d,
    "byte_classifier": byte_classifier,
}
# per graph: producers of the groups that must be prunable, and of those a decomposed LayerNorm blocks
PRUNABLE = {
    "text_classifier": ["model/conv1d/Conv2D"],
    "text_classifier_opset13": ["model/conv1d/Conv2D"],
    "text_classifier_opset11": ["model/conv1d/Conv2D"],
    "tensordot_tagger": ["model/conv1d/conv1d", "model/dense/Tensordot/MatMul"],
    "nhwc_convnet": ["model/conv2d/Conv2D", "model/conv2d_1/Conv2D", "model/conv2d_3/Conv2D"],
    "paddle_conv1d": ["conv1d_0/conv2d", "conv1d_1/conv2d"],
    "byte_classifier": ["Dense_0/einsum/Einsum"],
}
NORMALISED = {"text_classifier": "model/embed/MatMul", "text_classifier_opset13": "model/embed/MatMul",
              "text_classifier_opset11": "model/embed/MatMul",
              "tensordot_tagger": "model/token/MatMul", "byte_classifier": "Conv_0/Conv2D"}


def feeds(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: bytes in [0, 256) for integer inputs, Gaussian floats otherwise."""
    rng = np.random.default_rng(seed)
    found = {}
    for value in model.graph.input:
        shape = [samples if not d.HasField("dim_value") else d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT32:
            found[value.name] = rng.integers(0, 256, shape).astype(np.int32)
        else:
            found[value.name] = rng.standard_normal(shape).astype(np.float32)
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("tf2onnx")

    def write(name: str) -> Path:
        path = folder / f"{name}.onnx"
        if not path.exists():
            onnx.save(GRAPHS[name](), str(path))
        return path

    return write


def _declared(values: Any) -> list[tuple[str, int, list[int | str]]]:
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in values]


def optimized(path: Path, tmp_path: Path, **options: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Optimize `path`; the written model passes the full check, keeps the interface and runs."""
    original = onnx.load(str(path))
    output = tmp_path / f"{path.stem}_out.onnx"
    report = graphopt.optimize(path, output=output, **options).report
    onnx.checker.check_model(str(output), full_check=True)
    written = onnx.load(str(output))
    assert _declared(written.graph.input) == _declared(original.graph.input)
    assert _declared(written.graph.output) == _declared(original.graph.output)
    check = feeds(original, CHECK, seed=7)
    expected, actual = run_ort(original, check), run_ort(written, check)
    for name, value in expected.items():
        assert actual[name].shape == value.shape and actual[name].dtype == value.dtype, name
        assert np.all(np.isfinite(actual[name])), name
    return written, report


def _groups(model: onnx.ModelProto) -> dict[str, Any]:
    """Channel groups of `model` by producer name: (prunable, reason)."""
    graph = ir.import_graph(model)
    analysis = find_groups(graph, batch1_shapes(model, resolve_input_shapes(model)))
    found = {}
    for group in analysis.groups():
        for site in group.sites:
            if site.role == "producer":
                found[site.node.name] = (group.prunable, group.describe()["reason"])
    return found


# -- the layouts are recognised -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(GRAPHS))
def test_exporter_layouts_leave_the_groups_prunable(name: str) -> None:
    groups = _groups(GRAPHS[name]())
    for producer in PRUNABLE[name]:
        assert groups[producer][0], (producer, groups[producer])
    if name in NORMALISED:
        prunable, reason = groups[NORMALISED[name]]
        assert not prunable and "normalises over the channel axis" in reason


def test_a_decomposed_layer_norm_blocks_its_channels_with_the_reason() -> None:
    prunable, reason = _groups(tensordot_tagger())["model/token/MatMul"]
    assert not prunable
    assert "model/ln/moments/SquaredDifference (Sub): combines channels with a statistic over them" in reason


# -- every method reaches its target in a valid model ----------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", ["magnitude", "snp"])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_methods_reach_the_target(name: str, method: str, target: float, source: Callable[[str], Path],
                                  tmp_path: Path) -> None:
    path = source(name)
    options: dict[str, Any] = {"method": method, "target_macs": target, "round_to": 1}
    if method == "snp":
        options["calib"] = feeds(onnx.load(str(path)), CALIBRATION, seed=1)
    _, report = optimized(path, tmp_path, **options)
    stats = report["passes"][-1]["stats"]
    assert target - TOLERANCE <= report["macs_ratio"] <= target * (1 + TOLERANCE), report["macs_ratio"]
    assert stats["channels_removed"] > 0
    assert report["macs_ratio"] == pytest.approx(stats["estimated_macs_ratio"], abs=1e-9)  # the plan is what is counted


def test_tensordot_reshape_back_follows_the_kept_channels(source: Callable[[str], Path], tmp_path: Path) -> None:
    written, _ = optimized(source("tensordot_tagger"), tmp_path, method="magnitude", target_macs=0.5, round_to=1)
    initializers = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    kernel = next(v for k, v in initializers.items() if k.startswith("model/dense/Tensordot/kernel"))
    rows = next(v for k, v in initializers.items() if k.startswith("model/dense/Tensordot/Reshape/shape"))
    back = next(v for k, v in initializers.items() if k.startswith("model/dense/Tensordot/Const_2"))
    assert kernel.shape[1] < 40 and back.tolist() == [kernel.shape[1]]
    assert rows.tolist() == [-1, kernel.shape[0]] and kernel.shape[0] < 48


# -- planted redundancy goes exactly ---------------------------------------------------------------

# graph -> producers (Conv or MatMul) with (zero unit, copied unit, source of the copy)
PLANTS = {
    "text_classifier": {"model/conv1d/kernel": (3, 10, 4)},
    "tensordot_tagger": {"model/conv1d/kernel": (5, 7, 2), "model/dense/Tensordot/kernel": (1, 30, 12)},
    "nhwc_convnet": {"model/conv2d_1/kernel": (0, 9, 3), "model/conv2d_3/kernel": (6, 20, 11)},
    "paddle_conv1d": {"conv1d_1.w_0": (2, 17, 5)},
}


def _bias_of(kernel: str) -> str:
    return kernel.replace("/kernel", "/bias").replace(".w_0", ".b_0")


def planted(name: str, path: Path, zeros_only: bool = False) -> Path:
    """A copy of graph `name` with a zero unit and (unless `zeros_only`) a duplicate unit in each planted
    producer (weight row and bias alike; a MatMul kernel's units are its columns)."""
    model = GRAPHS[name]()
    values = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for kernel, (zero, copy, copied) in PLANTS[name].items():
        weight, bias = values[kernel], values[_bias_of(kernel)]
        axis = 1 if weight.ndim == 2 else 0
        units = np.moveaxis(weight, axis, 0)
        units[zero], bias[zero] = 0.0, 0.0
        if not zeros_only:
            units[copy], bias[copy] = units[copied], bias[copied]
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    onnx.save(model, str(path))
    return path


def _assert_exact(original: Path, written: onnx.ModelProto) -> None:
    model = onnx.load(str(original))
    check = feeds(model, 5, seed=11)
    expected, actual = run_ort(model, check), run_ort(written, check)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=EXACT, atol=EXACT, err_msg=name)


def _kept_units(written: onnx.ModelProto, kernel: str) -> int:
    weight = next(numpy_helper.to_array(t) for t in written.graph.initializer if t.name.startswith(kernel))
    return weight.shape[1] if weight.ndim == 2 else weight.shape[0]


@pytest.mark.parametrize("name", list(PLANTS))
def test_snp_removes_planted_zero_and_duplicate_units_exactly(name: str, tmp_path: Path) -> None:
    path = planted(name, tmp_path / f"{name}_planted.onnx")
    original = onnx.load(str(path))
    sizes = {k: _kept_units(original, k) for k in PLANTS[name]}
    written, report = optimized(path, tmp_path, method="snp", keep_variance=1.0, round_to=1,
                                calib=feeds(original, PLANTED_CALIBRATION, seed=1))
    assert report["passes"][-1]["stats"]["channels_removed"] == 2 * len(PLANTS[name])
    for kernel, size in sizes.items():
        assert _kept_units(written, kernel) == size - 2, kernel
    _assert_exact(path, written)
    again = tmp_path / "again.onnx"
    onnx.save(written, str(again))
    _, second = optimized(again, tmp_path, method="snp", keep_variance=1.0, round_to=1,
                          calib=feeds(original, PLANTED_CALIBRATION, seed=1))
    assert second["passes"][-1]["stats"]["channels_removed"] == 0


def test_units_laid_side_by_side_go_exactly_from_every_position(tmp_path: Path) -> None:
    """A Dense unit of the byte classifier that repeats another reaches the Conv as `fold` channels, one per
    neighbouring position: snp removes it and folds its reconstruction into all of them, exactly; the Reshape
    targets and the normalisation's Reshape and Expand shapes follow the kept count."""
    model = byte_classifier()
    values = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    kernel, bias = values["Dense_0/kernel"], values["Dense_0/bias"]
    kernel[:, 9], bias[9] = kernel[:, 2], bias[2]
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    path = tmp_path / "byte_classifier_planted.onnx"
    onnx.save(model, str(path))
    written, report = optimized(path, tmp_path, method="snp", keep_variance=1.0, round_to=1,
                                calib=feeds(model, PLANTED_CALIBRATION, seed=1))
    assert report["passes"][-1]["stats"]["channels_removed"] == 1
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert next(v for k, v in weights.items() if k.startswith("Conv_0/kernel")).shape[1] == 4 * 63
    _assert_exact(path, written)


def _macs_without_zero_units(name: str, path: Path, tmp_path: Path) -> float:
    """The MAC ratio of the planted model with exactly its zero units cut (by the pruning engine)."""
    model = onnx.load(str(path))
    graph = ir.import_graph(model)
    analysis = find_groups(graph, batch1_shapes(model, resolve_input_shapes(model)))
    kept = {}
    for site in analysis.sites:
        kernel = site.node.inputs[site.index].name if site.kind == "weight" else ""
        if site.role == "producer" and kernel in PLANTS[name]:
            (leaf,) = analysis.atoms.leaves(site.state.atoms)
            size = analysis.atoms.sizes[leaf]
            kept[analysis.atoms.find(leaf)] = np.delete(np.arange(size), PLANTS[name][kernel][0])
    apply_kept(graph, analysis, kept)
    cut = tmp_path / "cut.onnx"
    onnx.save(ir.export_model(ir.cleanup(graph), model), str(cut))
    return graphopt.optimize(cut, method="none").report["macs_before"] / \
        graphopt.optimize(path, method="none").report["macs_before"]


@pytest.mark.parametrize("name", list(PLANTS))
def test_magnitude_removes_planted_zero_units_first_and_exactly(name: str, tmp_path: Path) -> None:
    path = planted(name, tmp_path / f"{name}_zeros.onnx", zeros_only=True)
    original = onnx.load(str(path))
    target = _macs_without_zero_units(name, path, tmp_path)
    written, report = optimized(path, tmp_path, method="magnitude", target_macs=target, round_to=1)
    assert report["passes"][-1]["stats"]["channels_removed"] == len(PLANTS[name])
    for kernel in PLANTS[name]:
        assert _kept_units(written, kernel) == _kept_units(original, kernel) - 1, kernel
    _assert_exact(path, written)


# -- a reduction over the channels is a linear consumer --------------------------------------------

def _reduction(op: str, channels_last: bool, keepdims: int) -> onnx.ModelProto:
    w = Writer(5, 13)
    x = w.op("Relu", [w.op("Conv", ["x", w.weight("conv/kernel", 6, 3, 3, 3), w.bias("conv/bias", 6)], "conv",
                           pads=[1, 1, 1, 1])], "relu")
    x = w.op("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1]) if channels_last else x
    reduced = w.axes_op(op, x, "reduce", [3 if channels_last else 1], keepdims=keepdims)
    w.op("Identity", [reduced], "out")
    shape = ["N", 5, 5, 1] if channels_last else ["N", 1, 5, 5]
    if not keepdims:
        shape.pop(3 if channels_last else 1)
    return w.model("y", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


CASES = [(op, last, keep) for op in ("ReduceSum", "ReduceMean") for last in (True, False) for keep in (1, 0)]


@pytest.mark.parametrize("op,channels_last,keepdims", CASES)
def test_reduction_as_a_weighted_sum_computes_the_same(op: str, channels_last: bool, keepdims: int) -> None:
    model = _reduction(op, channels_last, keepdims)
    graph = ir.import_graph(model)
    analysis = find_groups(graph, batch1_shapes(model, resolve_input_shapes(model)))
    site = next(s for s in analysis.sites if s.kind == "reduce")
    linear = as_linear(graph, analysis, site)
    rewritten = ir.export_model(ir.cleanup(graph), model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert linear.node.op == "Mul" and linear.axis == 1
    assert [n.op_type for n in rewritten.graph.node].count("ReduceSum") == 1  # a mean is the sum weighted by 1/n
    assert "ReduceMean" not in [n.op_type for n in rewritten.graph.node]
    check = feeds(model, 4, seed=3)
    np.testing.assert_allclose(run_ort(rewritten, check)["y"], run_ort(model, check)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,channels_last,keepdims", CASES)
def test_pruning_through_a_reduction_keeps_its_divisor(op: str, channels_last: bool, keepdims: int,
                                                         tmp_path: Path) -> None:
    model = _reduction(op, channels_last, keepdims)
    kernel = next(t for t in model.graph.initializer if t.name == "conv/kernel")
    values = numpy_helper.to_array(kernel).copy()
    values[[1, 4]] = 0.0
    kernel.CopyFrom(numpy_helper.from_array(values, kernel.name))
    bias = next(t for t in model.graph.initializer if t.name == "conv/bias")
    bias.CopyFrom(numpy_helper.from_array(np.where(np.isin(np.arange(6), [1, 4]), 0.0, numpy_helper.to_array(bias))
                                          .astype(np.float32), bias.name))
    path = tmp_path / "reduction.onnx"
    onnx.save(model, str(path))
    written, report = optimized(path, tmp_path, method="magnitude", target_macs=4 / 6, round_to=1)
    assert report["passes"][-1]["stats"]["channels_removed"] == 2
    ops = [n.op_type for n in written.graph.node]
    assert ops.count("Mul") == (op == "ReduceMean") and "ReduceMean" not in ops  # a sum of the rest is the sum
    assert report["macs_ratio"] == pytest.approx(report["passes"][-1]["stats"]["estimated_macs_ratio"], abs=1e-9)
    _assert_exact(path, written)


def test_other_reductions_over_the_channels_block_with_the_reason() -> None:
    for op, axes, shape in (("ReduceMax", [1], ["N", 1, 5, 5]), ("ReduceSum", [1, 2], ["N", 1, 1, 5]),
                            ("ReduceL2", [1], ["N", 1, 5, 5])):
        w = Writer(6, 13)
        x = w.op("Conv", ["x", w.weight("conv/kernel", 6, 3, 3, 3), w.bias("conv/bias", 6)], "conv", pads=[1, 1, 1, 1])
        w.axes_op(op, x, "reduce", axes, keepdims=1) if op == "ReduceSum" else \
            w.op(op, [x], "reduce", axes=axes, keepdims=1)
        w.op("Identity", [w.nodes[-1].output[0]], "out")
        model = w.model("y", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        prunable, found = _groups(model)["conv"]
        assert not prunable and f"reduce ({op}): reduces over the channel axis" in found


def test_an_expand_whose_target_broadcasts_the_channels_follows_the_cut(tmp_path: Path) -> None:
    """Expand to [2, 1, 1] (1 on the channel axis: a broadcast) keeps the channel axis, counted from the end, and
    its target as it is; a planted zero unit in front of it goes first and exactly (magnitude)."""
    from tests.conftest import init, tiny, weights

    kernel = weights(6, 8)
    kernel[:, 5] = 0.0  # unit 5 is always 0 after the Relu
    model = tiny("""h = MatMul (x, w1)
                    r = Relu (h)
                    e = Expand (r, target)
                    s = ReduceSum <keepdims = 0> (e, axes)
                    y = MatMul (s, w2)""", inputs="float[N, 6] x", outputs="float[N, 3] y",
                 inits=", ".join([init("w1", kernel), init("w2", weights(8, 3, seed=1)),
                                  init("target", [2, 1, 1], "int64"), init("axes", [0], "int64")]))
    prunable, reason = _groups(model)["MatMul_0"]
    assert prunable, reason
    path = tmp_path / "expand.onnx"
    onnx.save(model, str(path))
    result = graphopt.optimize(path, method="magnitude", target_macs=0.9, round_to=1)
    weights_after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert next(v for k, v in weights_after.items() if k.startswith("w2")).shape == (7, 3)
    assert next(v for k, v in weights_after.items() if k.startswith("target")).tolist() == [2, 1, 1]
    check = {"x": np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(result.model, check)["y"], run_ort(model, check)["y"], rtol=1e-5, atol=1e-5)

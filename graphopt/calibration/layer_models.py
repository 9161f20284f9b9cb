"""One-layer ONNX models to time: a Conv, Gemm or MatMul with a layer's real attributes and shapes, at
any input and output channel count.

A `LayerSpec` holds what decides a layer's speed besides its channel counts: the op and its attributes
(kernel, strides, pads, dilations, Gemm's transB/alpha/beta), the input shape at the timed batch (its
channel entry is a placeholder), whether a bias is added, the elementwise activation that follows it
(onnxruntime fuses Conv+activation, so the pair is timed together) and the dtype. A depthwise Conv has
one channel count (group = input = output channels). `signature()` is the JSON identity of everything
but the channel counts: two layers with equal signatures share timings. Weights are seeded random
values (normal, scale 0.1): timings do not depend on them, and normal values avoid denormals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17
IR_VERSION = 8
LAYER_OPS = ("Conv", "Gemm", "MatMul")
# elementwise activations timed with the layer they follow (onnxruntime fuses several of them)
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Softplus")


def plain_attrs(attrs: dict[str, Any], drop: tuple[str, ...] = ()) -> tuple[tuple[str, Any], ...]:
    """A node's scalar and list attributes as sorted JSON-ready pairs (tensors and graphs left out)."""
    kept = []
    for name, value in sorted(attrs.items()):
        if name in drop:
            continue
        if isinstance(value, (bytes, str)):
            kept.append((name, value.decode() if isinstance(value, bytes) else value))
        elif isinstance(value, (int, float, np.integer, np.floating)):
            kept.append((name, value.item() if hasattr(value, "item") else value))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, np.integer, np.floating))
                                                      for v in value):
            kept.append((name, tuple(v.item() if hasattr(v, "item") else v for v in value)))
    return tuple(kept)


@dataclass(frozen=True)
class Activation:
    op: str
    attrs: tuple[tuple[str, Any], ...] = ()
    constants: tuple[float | None, ...] = ()  # extra scalar inputs after x (Clip's min, max); None: absent


@dataclass(frozen=True)
class LayerSpec:
    op: str                           # one of LAYER_OPS
    input_shape: tuple[int, ...]      # at the timed batch; the channel entry is ignored
    channel_axis: int
    attrs: tuple[tuple[str, Any], ...] = ()  # Conv: kernel_shape always present; never `group`
    depthwise: bool = False
    bias: bool = False
    activation: Activation | None = None
    dtype: str = "float32"

    def signature(self) -> dict[str, Any]:
        shape = list(self.input_shape)
        shape[self.channel_axis] = -1
        activation = None if self.activation is None else {
            "op": self.activation.op, "attrs": [list(a) for a in self.activation.attrs],
            "constants": list(self.activation.constants)}
        return {"op": self.op, "input": shape, "channel_axis": self.channel_axis,
                "attrs": [[name, list(value) if isinstance(value, tuple) else value] for name, value in self.attrs],
                "depthwise": self.depthwise, "bias": self.bias, "activation": activation, "dtype": self.dtype}

    def build(self, cin: int, cout: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The layer with `cin` input and `cout` output channels (depthwise: `cin` for both), and a feed."""
        if self.depthwise:
            cout = cin
        rng = np.random.default_rng(seed)
        dtype = np.dtype(self.dtype)
        shape = list(self.input_shape)
        shape[self.channel_axis] = cin
        attrs = dict(self.attrs)
        weight_shape, extra = self._weight(cin, cout, attrs)
        initializers = [numpy_helper.from_array((0.1 * rng.standard_normal(weight_shape)).astype(dtype), "W")]
        inputs = ["x", "W"]
        if self.bias:
            initializers.append(numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(dtype), "B"))
            inputs.append("B")
        elif self.op == "Gemm":
            attrs.pop("beta", None)
        nodes = [helper.make_node(self.op, inputs, ["h" if self.activation else "y"], **attrs, **extra)]
        if self.activation is not None:
            nodes.append(self._activation_node(initializers, dtype))
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        rank = 2 if self.op == "Gemm" else len(shape)
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, shape)],
                                  [helper.make_tensor_value_info("y", elem, [f"d{axis}" for axis in range(rank)])],
                                  initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model, {"x": rng.standard_normal(shape).astype(dtype)}

    def _weight(self, cin: int, cout: int, attrs: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, Any]]:
        if self.op == "Conv":
            kernel = tuple(attrs["kernel_shape"])
            if self.depthwise:
                return (cin, 1, *kernel), {"group": cin}
            return (cout, cin, *kernel), {}
        if self.op == "Gemm" and attrs.get("transB", 0):
            return (cout, cin), {}
        return (cin, cout), {}

    def _activation_node(self, initializers: list[onnx.TensorProto], dtype: np.dtype) -> onnx.NodeProto:
        assert self.activation is not None
        names = ["h"]
        for index, value in enumerate(self.activation.constants):
            if value is None:
                names.append("")
                continue
            initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), f"c{index}"))
            names.append(f"c{index}")
        while names and names[-1] == "":
            names.pop()
        return helper.make_node(self.activation.op, names, ["y"], **dict(self.activation.attrs))

"""Per-sample cost: multiply-accumulates (MACs) and parameters.

MACs count the multiply-accumulates of Conv, ConvTranspose (with groups), Gemm and MatMul:
- Conv:          prod(output) * Cin/groups * prod(kernel)
- ConvTranspose: prod(input) * Cout/groups * prod(kernel)
- Gemm/MatMul:   prod(output) * K
- LSTM/GRU/RNN:  seq * batch * directions * gates * hidden * (features + hidden), the input and the
                 recurrent products of every step (W [directions, gates x hidden, features], R [..., hidden])
- graphopt.ExPruneLinearRelu / ExPruneConvRelu: as MatMul / Conv, their dense cost (what they skip
  depends on the input; the exprune pass reports the fraction skipped on calibration data)
- the integer forms ConvInteger / QLinearConv and MatMulInteger / QLinearMatMul: as Conv / MatMul (one
  integer multiply-accumulate counts as one MAC), com.microsoft QGemm as Gemm; in the QDQ format the float
  Conv/MatMul is counted itself. Parameters: float constants (those of control-flow bodies too), and the
  integer weights these ops (or a DequantizeLinear) read; scales and zero points are not parameters

What is counted, per sample:
- The shapes are those of the inputs as resolved (a dynamic batch axis at 1). When every real input and
  every graph output has the same first-axis size B > 1 (a model exported with a static batch of B), every
  count is divided by B, so a static batch-8 export reports what its batch-1 twin does. Otherwise the
  count is that of the inputs as given.
- Nodes inside control-flow bodies count. If: the larger of its two branches (whichever runs costs at
  most that). Loop: the body times the trip count when that is a constant below 2**31 (an upper bound
  when the loop condition can end it earlier; larger values are the "run until the condition says stop"
  marker exporters write, counted as unknown), else the body once. Scan: the body times the length of the
  scanned axis (opset 9 and later), else once. Nested bodies compose.
- `per_node` lists the nodes of the main graph; an If/Loop/Scan node carries its bodies' total, so the
  values sum to `macs`. A counted node whose shapes are unknown (inside a body inference cannot follow)
  adds nothing and is named in `uncounted` with the tensor that was missing.

The counts read tensor shapes given by the caller and never run a model
(graphopt.calibration.shapes.count_cost infers the shapes, with one onnxruntime run where ONNX
inference leaves a needed one unknown). Parameters count the elements of all floating-point
initializers and Constant-node tensors of the main graph, and of the (integer) constants a
DequantizeLinear reads as its data; quantization scales and zero points are not parameters.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.ir.graph import nested_graphs
from graphopt.ir.shapes import input_specs

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ExPruneLinearRelu", "ExPruneConvRelu", "ConvInteger",
            "QLinearConv", "MatMulInteger", "QLinearMatMul", "QGemm", "Attention", "MultiHeadAttention",
            "GroupQueryAttention", "LSTM", "GRU", "RNN")
# onnxruntime's fused attention (com.microsoft): (inputs whose shapes count, MACs from the shapes and attributes)
_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
# where the data and weight inputs sit, for the ops whose operands are not inputs 0 and 1
_OPERANDS = {"QLinearConv": (0, 3), "QLinearMatMul": (0, 3), "QGemm": (0, 3)}
_CONVOLUTIONS = ("Conv", "ExPruneConvRelu", "ConvInteger", "QLinearConv")
RECURRENT = ("LSTM", "GRU", "RNN")
_INTEGER = ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "QGemm")
CONTROL_FLOW = ("If", "Loop", "Scan")
_UNBOUNDED_TRIPS = 2**31  # torch writes INT64_MAX as the trip count of a while loop


@dataclass
class CostReport:
    macs: int
    params: int
    per_node: dict[str, int] = field(default_factory=dict)
    op_histogram: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)


def bodies(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    """The subgraphs a node holds, by attribute name (then_branch, else_branch, body)."""
    return {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for scope in nested_graphs(graph):
        yield from scope.node


def _scan_inputs(node: onnx.NodeProto) -> list[tuple[str, int]]:
    """(name, scanned axis) of each scanned input of a Scan node (opset 9 and later)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    count = int(attrs.get("num_scan_inputs", 0))
    names = list(node.input[len(node.input) - count:])
    axes = list(attrs.get("scan_input_axes", [0] * count))
    return list(zip(names, axes))


def _needed(node: onnx.NodeProto) -> list[str]:
    if node.op_type == "Loop":
        names = list(node.input[2:])  # loop-carried values: their shapes are the body's input shapes
    elif node.op_type == "Scan":
        names = list(node.input)
    elif node.op_type == "If":
        names = []
    elif node.op_type in _ATTENTION:
        names = list(node.input[:2 if node.op_type == "Attention" else 3]) + [node.output[0]]
    elif node.op_type in RECURRENT:
        names = list(node.input[:3])
    else:
        data, weight = _OPERANDS.get(node.op_type, (0, 1))
        names = [node.input[data], node.input[weight], node.output[0]]
    return [n for n in names if n]


def _first_axes(names: list[str], shapes: dict[str, tuple[int, ...]]) -> set[int | None]:
    return {shapes[n][0] if len(shapes.get(n, ())) else None for n in names}


def input_batch(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """The first-axis size every real input shares, when it is above 1; else 1."""
    firsts = _first_axes([s.name for s in input_specs(model)], shapes)
    batch = firsts.pop() if len(firsts) == 1 else None
    return batch if batch is not None and batch > 1 else 1


def per_sample_batch(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """B when every real input and every graph output has first-axis size B > 1 (the counts divide by it)."""
    batch = input_batch(model, shapes)
    if batch > 1 and _first_axes([o.name for o in model.graph.output], shapes) == {batch}:
        return batch
    return 1


def needed_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> set[str]:
    """The tensors whose shapes the MAC count reads (the graph outputs too when the inputs given by
    `input_shapes` share a batch above 1, to tell whether the counts divide by it)."""
    names = {name for node in _all_nodes(model.graph) if node.op_type in COUNTED_OPS + CONTROL_FLOW
             for name in _needed(node)}
    if input_shapes is not None and input_batch(model, input_shapes) > 1:
        names |= {o.name for o in model.graph.output}
    return names


def _scalar_int(tensor: onnx.TensorProto) -> int | None:
    integer = tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    if integer and math.prod(tensor.dims) == 1 and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return int(np.asarray(numpy_helper.to_array(tensor)).reshape(-1)[0])
    return None


def _scalar_ints(model: onnx.ModelProto) -> dict[str, int]:
    """Every one-element integer constant of the model and its bodies, by name (trip counts)."""
    named = [(t.name, t) for t in model.graph.initializer]
    found = {}
    for node in _all_nodes(model.graph):
        named += [(t.name, t) for body in bodies(node).values() for t in body.initializer]
        for attribute in node.attribute if node.op_type == "Constant" else ():
            if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                named.append((node.output[0], attribute.t))
            elif attribute.name == "value_int":
                found[node.output[0]] = int(attribute.i)
    for name, tensor in named:
        value = _scalar_int(tensor)
        if value is not None:
            found[name] = value
    return found


class _MacCounter:
    """MACs of graphs and nodes on known shapes, recursing into control-flow bodies."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], constants: dict[str, int], scan_axes: bool) -> None:
        self.shapes, self.constants, self.scan_axes = shapes, constants, scan_axes
        self.uncounted: list[str] = []

    def graph(self, graph: onnx.GraphProto) -> dict[str, int]:
        return {node.name or f"{node.op_type}_{index}": self.node(node, node.name or f"{node.op_type}_{index}")
                for index, node in enumerate(graph.node) if node.op_type in COUNTED_OPS + CONTROL_FLOW}

    def body(self, graph: onnx.GraphProto) -> int:
        return sum(self.graph(graph).values())

    def node(self, node: onnx.NodeProto, name: str) -> int:
        if node.op_type in CONTROL_FLOW:
            return self._control_flow(node)
        missing = [n for n in _needed(node) if n not in self.shapes]
        if missing:
            self.uncounted.append(f"{name}: shape of '{missing[0]}' unknown")
            return 0
        return _node_macs(node, self.shapes)

    def _control_flow(self, node: onnx.NodeProto) -> int:
        graphs = bodies(node)
        if node.op_type == "If":
            return max((self.body(g) for g in graphs.values()), default=0)
        return self.body(graphs["body"]) * self._iterations(node)

    def _iterations(self, node: onnx.NodeProto) -> int:
        if node.op_type == "Loop":
            trips = self.constants.get(node.input[0]) if node.input and node.input[0] else None
            return trips if trips is not None and 0 <= trips < _UNBOUNDED_TRIPS else 1
        scanned = _scan_inputs(node) if self.scan_axes else []
        lengths = {self.shapes[n][a % len(self.shapes[n])] for n, a in scanned if self.shapes.get(n)}
        return lengths.pop() if len(lengths) == 1 else 1


def _attention_macs(node: onnx.NodeProto, attrs: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """Attention: the packed QKV projection, then q·kᵀ and p·v over every head; MultiHeadAttention (separate
    [N, T, C] query, key and value) and GroupQueryAttention (query heads as wide as its output): q·kᵀ and p·v,
    every key counted (GroupQueryAttention is causal and may skip the later half). Self-attention without
    past state."""
    out = shapes[node.output[0]]
    rows, value_width = math.prod(out[:-1]), out[-1]
    if node.op_type == "Attention":
        tokens, columns = shapes[node.input[0]][-2], shapes[node.input[1]][-1]
        qk_width = int(attrs["qkv_hidden_sizes"][0]) if attrs.get("qkv_hidden_sizes") else columns // 3
        return rows * shapes[node.input[0]][-1] * columns + rows * tokens * (qk_width + value_width)
    if node.op_type == "GroupQueryAttention":  # every query head against its key/value head's keys
        query = shapes[node.input[0]]
        key = shapes[node.input[1]] if len(node.input) > 1 and node.input[1] else query
        return rows * key[-2] * 2 * value_width if len(query) == 3 and len(key) == 3 else 0
    query, key = shapes[node.input[0]], shapes[node.input[1]]
    if len(query) != 3 or len(key) != 3:
        return 0
    return rows * key[-2] * (query[-1] + value_width)


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in _ATTENTION:
        return _attention_macs(node, attrs, shapes)
    if node.op_type in RECURRENT:  # X [seq, batch, features] (or [batch, seq, ...]), W, R
        x, w, r = (shapes[name] for name in node.input[:3])
        return math.prod(x[:2]) * w[0] * w[1] * (w[2] + r[2])
    data, weight_index = _OPERANDS.get(node.op_type, (0, 1))
    weight = shapes[node.input[weight_index]]
    if node.op_type in _CONVOLUTIONS:
        return math.prod(shapes[node.output[0]]) * weight[1] * math.prod(weight[2:])
    if node.op_type == "ConvTranspose":  # weight is [Cin, Cout/groups, k...]
        return math.prod(shapes[node.input[0]]) * weight[1] * math.prod(weight[2:])
    a_shape = shapes[node.input[data]]
    if node.op_type in ("Gemm", "QGemm"):
        inner = a_shape[0] if attrs.get("transA", 0) else a_shape[-1]
    else:
        inner = a_shape[-1] if len(a_shape) > 1 else a_shape[0]
    return math.prod(shapes[node.output[0]]) * inner


def parameter_count(model: onnx.ModelProto) -> int:
    """Float constants of the main graph and of every control-flow body (a weight counted once by name)."""
    constants = {name: t for g in nested_graphs(model.graph) for name, t in _constants(g).items()}
    quantized, scales = _quantized_names(list(_all_nodes(model.graph)))
    counted = [t for name, t in constants.items() if name in quantized or name not in scales
               and onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f"]
    return int(sum(math.prod(t.dims) for t in counted))


def _quantized_names(nodes: list[onnx.NodeProto]) -> tuple[set[str], set[str]]:
    """(the integer weights quantized ops and DequantizeLinear read, the scales and zero points)."""
    quantized = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear"}
    quantized |= {n.input[_OPERANDS.get(n.op_type, (0, 1))[1]] for n in nodes
                  if n.op_type in _INTEGER and len(n.input) > 1}
    scales = {name for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") for name in n.input[1:]}
    return quantized, scales


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {**{t.name: t for t in graph.initializer}, **_constant_nodes(graph)}


def _constant_nodes(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type of the main graph, custom domains as `domain::op`."""
    histogram = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                        for n in model.graph.node)
    return dict(sorted(histogram.items()))


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def cost_from_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> CostReport:
    """MACs per main-graph node and in all, parameters and the op histogram, per sample (see the module
    docstring), on `shapes` (which must hold every tensor in `needed_shapes(model, input shapes)`)."""
    counter = _MacCounter(shapes, _scalar_ints(model), scan_axes=_default_opset(model) >= 9)
    per_node = counter.graph(model.graph)
    batch = per_sample_batch(model, shapes)
    if batch > 1:
        per_node = {name: (macs + batch // 2) // batch for name, macs in per_node.items()}
    return CostReport(sum(per_node.values()), parameter_count(model), per_node, op_histogram(model),
                      counter.uncounted)

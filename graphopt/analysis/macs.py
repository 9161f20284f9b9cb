"""Per-sample cost: multiply-accumulates (MACs) and parameters.

MACs count batch-1 multiply-accumulates of Conv, ConvTranspose (with groups), Gemm and MatMul:
- Conv:          prod(output[1:]) * Cin/groups * prod(kernel)
- ConvTranspose: prod(input[1:]) * Cout/groups * prod(kernel)
- Gemm/MatMul:   prod(output) * K
- graphopt.ExPruneLinearRelu / ExPruneConvRelu: as MatMul / Conv, their dense cost (what they skip
  depends on the input; the exprune pass reports the fraction skipped on calibration data)
The counts read batch-1 tensor shapes given by the caller and never run a model
(graphopt.calibration.shapes.count_cost infers the shapes, with one onnxruntime run where ONNX
inference leaves a needed one unknown). Parameters count the elements of all floating-point
initializers and Constant-node tensors.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import onnx

_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ExPruneLinearRelu", "ExPruneConvRelu")


@dataclass
class CostReport:
    macs: int
    params: int
    per_node: dict[str, int] = field(default_factory=dict)
    op_histogram: dict[str, int] = field(default_factory=dict)


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = shapes[node.input[1]]
    if node.op_type in ("Conv", "ExPruneConvRelu"):
        return math.prod(shapes[node.output[0]][1:]) * weight[1] * math.prod(weight[2:])
    if node.op_type == "ConvTranspose":  # weight is [Cin, Cout/groups, k...]
        return math.prod(shapes[node.input[0]][1:]) * weight[1] * math.prod(weight[2:])
    a_shape = shapes[node.input[0]]
    if node.op_type == "Gemm":
        inner = a_shape[0] if attrs.get("transA", 0) else a_shape[-1]
    else:
        inner = a_shape[-1] if len(a_shape) > 1 else a_shape[0]
    return math.prod(shapes[node.output[0]]) * inner


def _needed(node: onnx.NodeProto) -> list[str]:
    names = [node.input[0], node.input[1], node.output[0]]
    return [n for n in names if n]


def _counted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in _COUNTED]


def needed_shapes(model: onnx.ModelProto) -> set[str]:
    """The tensors whose shapes the MAC count reads."""
    return {name for node in _counted(model) for name in _needed(node)}


def parameter_count(model: onnx.ModelProto) -> int:
    constants = [*model.graph.initializer,
                 *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")]
    floating = [t for t in constants if onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f"]
    return int(sum(math.prod(t.dims) for t in floating))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, custom domains as `domain::op`."""
    histogram = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                        for n in model.graph.node)
    return dict(sorted(histogram.items()))


def cost_from_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> CostReport:
    """MACs per counted node and in all, parameters and the op histogram, on batch-1 `shapes`
    (which must hold every tensor in `needed_shapes(model)`)."""
    per_node = {node.name or f"{node.op_type}_{index}": int(_node_macs(node, shapes))
                for index, node in enumerate(_counted(model))}
    return CostReport(sum(per_node.values()), parameter_count(model), per_node, op_histogram(model))

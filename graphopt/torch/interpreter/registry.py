"""The rule registry of the torch interpreter: one rule per ONNX op type, looked up once per node.

A rule receives a `Call` (the node, its attributes decoded, the model's default-domain opset) and the
node's input tensors (None for an omitted optional input) and returns the node's outputs (a tensor, or a
list in output order). Rules follow the ONNX operator specification as onnxruntime implements it; an
attribute value or input a rule cannot honour raises `UnsupportedOpError` naming the node, never a
silently different result. The default ONNX domain is covered, and graphopt's own differentiable functions
(graphopt.RMSNorm, graphopt.TSRA: graphopt.torch.interpreter.functions), as their function bodies compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from graphopt.errors import UnsupportedOpError

Outputs = torch.Tensor | Sequence[torch.Tensor | None]
Rule = Callable[["Call", list[Any]], Outputs]

RULES: dict[str, Rule] = {}
DOMAINS = ("", "ai.onnx")


def rule_key(op_type: str, domain: str = "") -> str:
    """The registry's key of an op: its type in the ONNX domain, `domain::type` in any other."""
    return op_type if domain in DOMAINS else f"{domain}::{op_type}"


def rule(*op_types: str, domain: str = "") -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of `op_types` (in `domain`); a second rule for one op is
    refused."""
    def register(function: Rule) -> Rule:
        for op_type in op_types:
            key = rule_key(op_type, domain)
            if key in RULES:
                raise ValueError(f"the torch interpreter already has a rule for {key}")
            RULES[key] = function
        return function
    return register


def node_rule(node: onnx.NodeProto) -> Rule | None:
    return RULES.get(rule_key(node.op_type, node.domain))


def tensor_of(proto: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto (attribute or initializer) as a torch tensor of its own dtype."""
    return torch.from_numpy(np.array(numpy_helper.to_array(proto), copy=True))


def _decoded(attribute: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return tensor_of(value)
    if isinstance(value, list):
        return [item.decode() if isinstance(item, bytes) else item for item in value]
    return value


@dataclass
class Call:
    """One node as its rule sees it."""

    node: onnx.NodeProto
    attributes: dict[str, Any]
    opset: int

    @classmethod
    def of(cls, node: onnx.NodeProto, opset: int) -> Call:
        return cls(node, {a.name: _decoded(a) for a in node.attribute}, opset)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)

    def refuse(self, why: str) -> UnsupportedOpError:
        """The error for an attribute or input this rule cannot honour (raise it)."""
        return UnsupportedOpError(f"--repair cannot run {self.node.op_type} node '{self.node.name or '(unnamed)'}': "
                                  f"{why}")

    def outputs_used(self) -> int:
        """How many of the node's outputs are named (trailing optional outputs may be omitted or empty)."""
        return sum(1 for name in self.node.output if name)


def ints(value: torch.Tensor | Sequence[int] | None) -> list[int] | None:
    """A shape-like input or attribute as Python ints (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def scalar(value: torch.Tensor | float | None) -> float | None:
    if value is None:
        return None
    return float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)


def check_domain(node: onnx.NodeProto) -> str | None:
    """Why no rule can run `node`, or None when one can."""
    if node.domain not in DOMAINS and node_rule(node) is None:
        return f"op {node.domain}::{node.op_type} of node '{node.name or '(unnamed)'}' is outside the ONNX domain"
    if node_rule(node) is None:
        return f"op {node.op_type} of node '{node.name or '(unnamed)'}' has no rule in the torch interpreter"
    return None


TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(call: Call, onnx_type: int) -> torch.dtype:
    if onnx_type not in TORCH_DTYPES:
        raise call.refuse(f"element type {onnx.TensorProto.DataType.Name(onnx_type)} is not supported")
    return TORCH_DTYPES[onnx_type]

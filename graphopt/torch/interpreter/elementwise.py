"""Rules for elementwise ops, activations, comparisons, reductions and Softmax (numpy broadcasting, as ONNX).

Integer Div truncates toward zero, Mod follows `fmod` (the dividend's sign, or the divisor's) and Pow keeps
the base's element type, as onnxruntime computes them; Softmax and LogSoftmax below opset 13 normalise over
the input flattened to 2-D at `axis` (default 1), from opset 13 over `axis` alone (default -1). Reductions
read their axes from the attribute (ReduceSum before opset 13, the others before 18) or from the optional
second input; no axes reduce every axis unless `noop_with_empty_axes` is set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.torch.interpreter.registry import Call, ints, rule, scalar, torch_dtype


@rule("Add")
def add(call: Call, inputs: list[Any]) -> torch.Tensor:
    return inputs[0] + inputs[1]


@rule("Sub")
def sub(call: Call, inputs: list[Any]) -> torch.Tensor:
    return inputs[0] - inputs[1]


@rule("Mul")
def mul(call: Call, inputs: list[Any]) -> torch.Tensor:
    return inputs[0] * inputs[1]


@rule("Div")
def div(call: Call, inputs: list[Any]) -> torch.Tensor:
    left, right = inputs
    if left.dtype.is_floating_point:
        return left / right
    return torch.div(left, right, rounding_mode="trunc")


@rule("Mod")
def mod(call: Call, inputs: list[Any]) -> torch.Tensor:
    """`fmod` 1: the sign of the dividend (C's fmod); 0 (integers only): the sign of the divisor (Python's %)."""
    return (torch.fmod if call.attr("fmod", 0) else torch.remainder)(inputs[0], inputs[1])


@rule("Pow")
def power(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


@rule("Sum", "Max", "Min", "Mean")
def variadic(call: Call, inputs: list[Any]) -> torch.Tensor:
    combine = {"Sum": torch.add, "Max": torch.maximum, "Min": torch.minimum, "Mean": torch.add}[call.node.op_type]
    found = inputs[0]
    for operand in inputs[1:]:
        found = combine(found, operand)
    return found / len(inputs) if call.node.op_type == "Mean" else found


_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
    "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish, "Sign": torch.sign,
}


@rule(*_UNARY)
def unary(call: Call, inputs: list[Any]) -> torch.Tensor:
    return _UNARY[call.node.op_type](inputs[0])


@rule("LeakyRelu")
def leaky_relu(call: Call, inputs: list[Any]) -> torch.Tensor:
    return F.leaky_relu(inputs[0], call.attr("alpha", 0.01))


@rule("PRelu")
def prelu(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, slope = inputs[0], inputs[1]  # the slope broadcasts to x (one per channel: [C, 1, 1])
    return torch.where(x < 0, x * slope, x)


@rule("Elu")
def elu(call: Call, inputs: list[Any]) -> torch.Tensor:
    return F.elu(inputs[0], call.attr("alpha", 1.0))


@rule("Selu")
def selu(call: Call, inputs: list[Any]) -> torch.Tensor:
    alpha, gamma = call.attr("alpha", 1.67326319217681884765625), call.attr("gamma", 1.05070102214813232421875)
    x = inputs[0]
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@rule("HardSigmoid")
def hard_sigmoid(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.clamp(call.attr("alpha", 0.2) * inputs[0] + call.attr("beta", 0.5), 0.0, 1.0)


@rule("HardSwish")
def hard_swish(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@rule("Gelu")
def gelu(call: Call, inputs: list[Any]) -> torch.Tensor:
    return F.gelu(inputs[0], approximate=call.attr("approximate", "none"))


@rule("Clip")
def clip(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    if call.opset < 11:
        low, high = call.attr("min"), call.attr("max")
    else:
        low, high = (scalar(inputs[i]) if len(inputs) > i else None for i in (1, 2))
    return torch.clamp(x, low, high) if low is not None or high is not None else x


_COMPARE = {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
            "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor}


@rule(*_COMPARE)
def compare(call: Call, inputs: list[Any]) -> torch.Tensor:
    return _COMPARE[call.node.op_type](inputs[0], inputs[1])


@rule("Where")
def where(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.where(inputs[0], inputs[1], inputs[2])


@rule("Cast")
def cast(call: Call, inputs: list[Any]) -> torch.Tensor:
    return inputs[0].to(torch_dtype(call, call.attr("to")))


@rule("CastLike")
def cast_like(call: Call, inputs: list[Any]) -> torch.Tensor:
    return inputs[0].to(inputs[1].dtype)


@rule("Identity", "Dropout")
def identity(call: Call, inputs: list[Any]) -> list[torch.Tensor]:
    """Dropout in inference: the input, and a mask of ones where its second output is named."""
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)][:max(1, call.outputs_used())]


def _softmax_axis(call: Call, rank: int) -> int:
    return call.attr("axis", -1 if call.opset >= 13 else 1) % max(rank, 1)


@rule("Softmax", "LogSoftmax")
def softmax(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axis = _softmax_axis(call, x.dim())
    function = torch.softmax if call.node.op_type == "Softmax" else torch.log_softmax
    if call.opset >= 13:
        return function(x, dim=axis)
    flat = x.reshape(math.prod(x.shape[:axis]), -1)  # below opset 13: over every axis from `axis` on
    return function(flat, dim=1).reshape(x.shape)


def _reduce_axes(call: Call, inputs: list[Any]) -> list[int] | None:
    """The axes to reduce; [] means none (noop_with_empty_axes), None every axis."""
    takes_input = call.opset >= (13 if call.node.op_type == "ReduceSum" else 18)
    axes = ints(inputs[1] if len(inputs) > 1 else None) if takes_input else ints(call.attr("axes"))
    if not axes:
        return [] if call.attr("noop_with_empty_axes", 0) else None
    return axes


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceProd": None,
           "ReduceSumSquare": None, "ReduceL2": None, "ReduceMax": torch.amax, "ReduceMin": torch.amin}


@rule(*_REDUCE)
def reduce(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, axes = inputs[0], _reduce_axes(call, inputs)
    if axes == []:
        return x
    keep = bool(call.attr("keepdims", 1))
    dims = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
    op_type = call.node.op_type
    if op_type == "ReduceSumSquare":
        return torch.sum(x * x, dim=dims, keepdim=keep)
    if op_type == "ReduceL2":
        return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))
    if op_type == "ReduceProd":
        for dim in sorted(dims, reverse=True):
            x = torch.prod(x, dim=dim, keepdim=keep)
        return x
    return _REDUCE[op_type](x, dim=dims, keepdim=keep) if dims else x

"""Weightless RMS normalisation over channels as a model-local ONNX function `graphopt.RMSNorm`.

    y = x / sqrt(Σ_c x_c² / channels + eps)      (sum over axis 1, per position)
`channels` is an attribute, not the run-time channel count: when pruning removes channels, it keeps the
original divisor, so removing channels that are identically zero leaves y exactly unchanged (a
ReduceMean would rescale the output by sqrt(C_kept / C)). The norm depends on x only through ||x||₂,
so y is equivariant to every orthogonal Q on the channel axis: RMSNorm(Q x) = Q RMSNorm(x).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, MIN_OPSET, constant_attr, like

NAME = "RMSNorm"


def rms_norm_reference(x: np.ndarray, channels: int | None = None, eps: float = 1e-6) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[1] if channels is None else channels
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True) / channels + eps)


def make_rms_norm_node(x: str, y: str, channels: int, eps: float = 1e-6, name: str = "") -> onnx.NodeProto:
    return helper.make_node(NAME, [x], [y], name=name or None, domain=DOMAIN, channels=int(channels),
                            eps=float(eps))


def build_rms_norm_function(opset: int) -> onnx.FunctionProto:
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.RMSNorm needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = [
        helper.make_node("Constant", [], ["axes"], value_ints=[1]),
        helper.make_node("Mul", ["X", "X"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "axes"], ["total"], keepdims=1),
        constant_attr("channels_i", "channels", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["channels_i"], ["channels_f"], to=onnx.TensorProto.FLOAT),
        like("channels_f", "X", "channels_c", opset),
        constant_attr("eps_f", "eps", onnx.AttributeProto.FLOAT),
        like("eps_f", "X", "eps_c", opset),
        helper.make_node("Div", ["total", "channels_c"], ["mean"]),
        helper.make_node("Add", ["mean", "eps_c"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["rms"]),
        helper.make_node("Div", ["X", "rms"], ["Y"]),
    ]
    function = helper.make_function(DOMAIN, NAME, ["X"], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                    attributes=["channels", "eps"])
    function.doc_string = "Weightless RMS normalisation over axis 1; see graphopt.ops.rms_norm."
    return function


"""Weightless RMS normalisation over one axis as a model-local ONNX function `graphopt.RMSNorm`.

    y = x / sqrt(Σ_c x_c² / channels + eps)      (sum over `axis`, per position of the other axes)
Attributes: `channels` (int, required), `eps` (float, required), `axis` (int, default 1: the channel
axis of NCHW / [N, C] tensors; -1 is the last axis of token-major [N, T, C] activations; a negative
axis counts from the end, as in ReduceSum). A node without `axis` normalises over axis 1, so models
written before the attribute existed keep their meaning (the default is a function-attribute
default, `FunctionProto.attribute_proto`, which onnx and onnxruntime honour; an older copy of the
function without `axis` is replaced when a node needs it, see graphopt.ops.functions).
`channels` is an attribute, not the run-time size of `axis`: when pruning removes channels, it keeps
the original divisor, so removing channels that are identically zero leaves y exactly unchanged (a
ReduceMean would rescale the output by sqrt(C_kept / C)). The norm depends on x only through the
Euclidean norm over `axis`, so y is equivariant to every orthogonal Q on that axis:
RMSNorm(Q x) = Q RMSNorm(x) (Q acting on `axis` alone, the same at every position); a rotation of
any other axis does not commute with it.
The body picks, at run time, a branch for axis 1 or -1 (a ReduceSum over that static axis, as fast as a
hand-written graph) or, for any other axis, the last entry of a CumSum along the attribute's axis
(Gather(·, [-1], axis)); every branch keeps every shape inferable by ONNX shape inference
(graphopt.ops.functions.axis_dispatch). The sums accumulate in the input dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, MIN_OPSET, axis_dispatch, constant_attr, like

NAME = "RMSNorm"
DEFAULT_AXIS = 1


def rms_norm_reference(x: np.ndarray, channels: int | None = None, eps: float = 1e-6,
                       axis: int = DEFAULT_AXIS) -> np.ndarray:
    """RMS normalisation of `x` over `axis` in float64 (divisor `channels`, default the size of `axis`)."""
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[axis] if channels is None else channels
    return x / np.sqrt((x * x).sum(axis=axis, keepdims=True) / channels + eps)


def make_rms_norm_node(x: str, y: str, channels: int, eps: float = 1e-6, name: str = "",
                       axis: int = DEFAULT_AXIS) -> onnx.NodeProto:
    """A `graphopt.RMSNorm` node; `axis` is written only when it differs from the default 1."""
    extra = {} if int(axis) == DEFAULT_AXIS else {"axis": int(axis)}
    return helper.make_node(NAME, [x], [y], name=name or None, domain=DOMAIN, channels=int(channels),
                            eps=float(eps), **extra)


def _gather_axis(inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """Gather along the function attribute `axis` (an attribute reference, so shapes stay inferable)."""
    node = helper.make_node("Gather", inputs, outputs)
    node.attribute.append(onnx.AttributeProto(name="axis", ref_attr_name="axis", type=onnx.AttributeProto.INT))
    return node


def _branch(prefix: str, axis: int | None) -> tuple[list[onnx.NodeProto], str]:
    """y for a static `axis` (ReduceSum) or for the attribute's axis (None: CumSum, last entry)."""
    p = prefix
    nodes = [helper.make_node("Mul", ["X", "X"], [f"{p}squares"])]
    if axis is None:
        nodes += [helper.make_node("CumSum", [f"{p}squares", "axis_scalar"], [f"{p}running"]),
                  _gather_axis([f"{p}running", "last"], [f"{p}total"])]
    else:
        nodes += [helper.make_node("Constant", [], [f"{p}axes"], value_ints=[axis]),
                  helper.make_node("ReduceSum", [f"{p}squares", f"{p}axes"], [f"{p}total"], keepdims=1)]
    nodes += [
        helper.make_node("Div", [f"{p}total", "channels_c"], [f"{p}mean"]),
        helper.make_node("Add", [f"{p}mean", "eps_c"], [f"{p}shifted"]),
        helper.make_node("Sqrt", [f"{p}shifted"], [f"{p}rms"]),
        helper.make_node("Div", ["X", f"{p}rms"], [f"{p}y"]),
    ]
    return nodes, f"{p}y"


def build_rms_norm_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.RMSNorm needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = [
        helper.make_node("Constant", [], ["last"], value_ints=[-1]),
        constant_attr("channels_i", "channels", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["channels_i"], ["channels_f"], to=onnx.TensorProto.FLOAT),
        like("channels_f", "X", "channels_c", opset),
        constant_attr("eps_f", "eps", onnx.AttributeProto.FLOAT),
        like("eps_f", "X", "eps_c", opset),
        *axis_dispatch("Y", _branch),
    ]
    function = helper.make_function(DOMAIN, NAME, ["X"], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                    attributes=["channels", "eps"],
                                    attribute_protos=[helper.make_attribute("axis", DEFAULT_AXIS)])
    function.doc_string = "Weightless RMS normalisation over `axis` (default 1); see graphopt.ops.rms_norm."
    return function

"""ExPrune linear+ReLU as a model-local ONNX function `graphopt.ExPruneLinearRelu` (domain opset 1).

Inputs X [..., d], W [n, d] (neuron-major, columns already permuted so the probe terms come first),
B [n], Tau [n] and Perm [d] (int64, the input permutation); attributes m (probe length, 1 <= m <= d)
and rule ("threshold", the only rule implemented). With x' = X[..., Perm]:

    partial_j = Σ_{i<m} W[j, i] x'_i            (the first m exchangeable terms of neuron j)
    score_j   = partial_j · (d / m) + B_j       (float32: scale = float(d) / float(m), no fused multiply-add)
    Y_j       = 0                     if score_j < Tau_j      (neuron predicted negative, rest skipped)
              = max(W[j] · x' + B_j, 0)  otherwise

Tau_j = -inf never fires, and the op is exactly ReLU(X[..., Perm] Wᵀ + B) = ReLU(X W_origᵀ + B). The
function body below uses standard ops only (it computes every dot product in full: the saving needs the
native kernel, graphopt/ops/src/exprune_kernel.cc, whose decisions agree with the body's up to float
rounding of the partial sum). `exprune_reference` is the numpy reference of the same formula.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, constant_attr, like

NAME = "ExPruneLinearRelu"
RULES = ("threshold",)
MIN_OPSET = 15  # CastLike, so the body serves float16/float32/float64 alike


def probe_scale(d: int, m: int) -> np.float32:
    return np.float32(d) / np.float32(m)


def exprune_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, tau: np.ndarray, perm: np.ndarray,
                      m: int) -> tuple[np.ndarray, np.ndarray]:
    """(Y, skipped) for float32 inputs; `skipped` is the boolean mask of predicted-negative neurons."""
    x = np.asarray(x, dtype=np.float32)[..., np.asarray(perm)]
    d = x.shape[-1]
    partial = (x[..., :m].astype(np.float64) @ w[:, :m].T.astype(np.float64)).astype(np.float32)
    score = partial * probe_scale(d, m) + b.astype(np.float32)
    skipped = score < tau.astype(np.float32)
    full = x.astype(np.float64) @ w.T.astype(np.float64) + b
    return np.where(skipped, 0.0, np.maximum(full, 0.0)).astype(np.float32), skipped


def make_exprune_node(inputs: list[str], output: str, m: int, rule: str = "threshold",
                      name: str = "") -> onnx.NodeProto:
    """A `graphopt.ExPruneLinearRelu` node reading [X, W, B, Tau, Perm]."""
    if rule not in RULES:
        raise ValueError(f"unknown ExPrune rule '{rule}' (implemented: {', '.join(RULES)})")
    if len(inputs) != 5:
        raise ValueError("ExPruneLinearRelu reads X, W, B, Tau, Perm")
    return helper.make_node(NAME, inputs, [output], name=name or None, domain=DOMAIN, m=int(m), rule=rule)


def build_exprune_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.{NAME} needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = [
        helper.make_node("Constant", [], ["zero_1d"], value_ints=[0]),
        helper.make_node("Constant", [], ["one_1d"], value_ints=[1]),
        helper.make_node("Constant", [], ["last_1d"], value_ints=[-1]),
        helper.make_node("Constant", [], ["zero_f"], value_float=0.0),
        constant_attr("m_scalar", "m", onnx.AttributeProto.INT),
        helper.make_node("Unsqueeze", ["m_scalar", "zero_1d"], ["m_1d"]),
        helper.make_node("Gather", ["X", "Perm"], ["xp"], axis=-1),
        helper.make_node("Slice", ["xp", "zero_1d", "m_1d", "last_1d"], ["x_probe"]),
        helper.make_node("Slice", ["W", "zero_1d", "m_1d", "one_1d"], ["w_probe"]),
        helper.make_node("Transpose", ["w_probe"], ["w_probe_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x_probe", "w_probe_t"], ["partial"]),
        helper.make_node("Shape", ["W"], ["w_shape"]),
        helper.make_node("Gather", ["w_shape", "one_1d"], ["d_1d"], axis=0),
        helper.make_node("Cast", ["d_1d"], ["d_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", ["m_1d"], ["m_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Div", ["d_f", "m_f"], ["scale_f"]),
        like("scale_f", "X", "scale", opset),
        helper.make_node("Mul", ["partial", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "B"], ["score"]),
        helper.make_node("Less", ["score", "Tau"], ["skipped"]),
        helper.make_node("Transpose", ["W"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["xp", "w_t"], ["linear"]),
        helper.make_node("Add", ["linear", "B"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["active"]),
        like("zero_f", "X", "zero", opset),
        helper.make_node("Where", ["skipped", "zero", "active"], ["Y"]),
    ]
    function = helper.make_function(DOMAIN, NAME, ["X", "W", "B", "Tau", "Perm"], ["Y"], nodes,
                                    [helper.make_opsetid("", opset)], attributes=["m", "rule"])
    function.doc_string = "ExPrune dynamic neuron pruning before a ReLU; see graphopt.ops.exprune."
    return function

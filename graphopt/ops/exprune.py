"""ExPrune linear+ReLU as a model-local ONNX function `graphopt.ExPruneLinearRelu` (domain opset 1).

Inputs X [..., d], W [n, d] (neuron-major, columns already permuted so the probe terms come first),
B [n], Tau [n] and Perm [d] (int64, the input permutation). Attributes: m (first probe length,
1 <= m < d), rule ("threshold" or "sequential") and checkpoints (strictly increasing probe lengths
k_1 = m < k_2 < ... < d; exactly [m] for the threshold rule; absent, as in models written before it
existed, it means [m]: the body's default [0] is dropped). With x' = X[..., Perm]:

    S_jk    = Σ_{i<k} W[j, i] x'_i                (the first k exchangeable terms of neuron j)
    score_jk = S_jk · (d / k) + B_j               (the estimate of the full pre-activation)
    f_k     = sqrt((d − k) · k_1 / (k · (d − k_1)))   (standard error of that estimate relative to the
                                                   first checkpoint's, sampling terms without replacement)
    Y_j     = 0                      if score_jk < Tau_j · f_k at some checkpoint k   (predicted negative;
                                                   the remaining d − k terms are skipped)
            = max(W[j] · x' + B_j, 0)  otherwise

rule="threshold" is the single test score_jm < Tau_j on the scaled partial sum. rule="sequential"
tests again at every later checkpoint with the boundary shrunk as the estimate's standard error
shrinks (a group-sequential test whose boundaries are proportional to the standard error, with the
per-neuron spread folded into Tau_j): a neuron not confidently negative after k_1 terms may be
after k_2. All float32: scale_k = float(d) / float(k), f_k = sqrt(float(d − k) · float(k_1) /
(float(k) · float(d − k_1))), no fused multiply-add in the score or the boundary.

Tau_j = -inf never fires, and the op is exactly ReLU(X[..., Perm] Wᵀ + B) = ReLU(X W_origᵀ + B). The
function body below uses standard ops only (it computes every dot product in full: the saving needs the
native kernel, graphopt/ops/src/exprune_kernel.cc, whose decisions agree with the body's up to float
rounding of the partial sums). `exprune_reference` is the numpy reference of the same formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, constant_attr, like

NAME = "ExPruneLinearRelu"
RULES = ("threshold", "sequential")
MIN_OPSET = 15  # CastLike, so the body serves float16/float32/float64 alike


def probe_scale(d: int, m: int) -> np.float32:
    return np.float32(d) / np.float32(m)


def boundary_factors(d: int, checkpoints: Sequence[int]) -> np.ndarray:
    """f_k of every checkpoint, float32 as the body and the kernel compute it (f_{k_1} = 1)."""
    first = np.float32(d - checkpoints[0])
    return np.array([np.sqrt(np.float32(d - k) * np.float32(checkpoints[0]) / (np.float32(k) * first))
                     for k in checkpoints], dtype=np.float32)


def checkpoint_scores(x: np.ndarray, w: np.ndarray, b: np.ndarray, checkpoints: Sequence[int]) -> np.ndarray:
    """score_jk for permuted float rows x [r, d]: array [r, n, c] (float32, partials summed in float64)."""
    d = x.shape[-1]
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    scores = [((x64[:, :k] @ w64[:, :k].T).astype(np.float32) * probe_scale(d, k) + b.astype(np.float32))
              for k in checkpoints]
    return np.stack(scores, axis=-1).astype(np.float32)


def validate_checkpoints(d: int, m: int, rule: str, checkpoints: Sequence[int] | None) -> list[int]:
    """The checkpoints a node with these attributes uses; ValueError when they are inconsistent."""
    if rule not in RULES:
        raise ValueError(f"unknown ExPrune rule '{rule}' (implemented: {', '.join(RULES)})")
    ks = [int(m)] if checkpoints is None else [int(k) for k in checkpoints]
    if rule == "threshold" and ks != [int(m)]:
        raise ValueError("the threshold rule has the single checkpoint [m]")
    if ks[0] != int(m) or any(b <= a for a, b in zip(ks, ks[1:])) or ks[0] < 1 or (d and ks[-1] >= d):
        raise ValueError(f"checkpoints must increase strictly from m={m} and stay below d={d}: {ks}")
    return ks


def doubling_checkpoints(d: int, m: int) -> list[int]:
    """m, 2m, 4m, ... below d: the sequential rule's default checkpoints."""
    ks = [m]
    while ks[-1] * 2 < d:
        ks.append(ks[-1] * 2)
    return ks


def exprune_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, tau: np.ndarray, perm: np.ndarray,
                      m: int, checkpoints: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Y, skipped) for float32 inputs; `skipped` is the boolean mask of predicted-negative neurons."""
    x = np.asarray(x, dtype=np.float32)[..., np.asarray(perm)]
    d = x.shape[-1]
    ks = [m] if checkpoints is None else list(checkpoints)
    flat = x.reshape(-1, d)
    scores = checkpoint_scores(flat, w, b, ks)
    bounds = tau.astype(np.float32)[:, None] * boundary_factors(d, ks)[None, :]
    skipped = np.any(scores < bounds[None], axis=-1).reshape(*x.shape[:-1], w.shape[0])
    full = x.astype(np.float64) @ w.T.astype(np.float64) + b
    return np.where(skipped, 0.0, np.maximum(full, 0.0)).astype(np.float32), skipped


def make_exprune_node(inputs: list[str], output: str, m: int, rule: str = "threshold",
                      name: str = "", checkpoints: Sequence[int] | None = None) -> onnx.NodeProto:
    """A `graphopt.ExPruneLinearRelu` node reading [X, W, B, Tau, Perm]."""
    ks = validate_checkpoints(0, m, rule, checkpoints)
    if len(inputs) != 5:
        raise ValueError("ExPruneLinearRelu reads X, W, B, Tau, Perm")
    return helper.make_node(NAME, inputs, [output], name=name or None, domain=DOMAIN, m=int(m), rule=rule,
                            checkpoints=ks)


def checkpoint_nodes() -> list[onnx.NodeProto]:
    """ks [c] (int64), and in float32 scale_f [c] = d / k, f_f [c] (the boundary factors) and mask_f [c, d]
    = (i < k), with d = W's axis-1 size (inputs of a linear op, input channels of a convolution). Reads the
    constants zero_1d, one_1d, zero_s and one_s the body defines.

    ks = `checkpoints` as written (it starts with m); a node written before the attribute existed gets its
    default [0], and then ks = [m]: ks is [m, *checkpoints] compressed by [checkpoints[0] < 1,
    *(checkpoints > 0)], so no checkpoint is probed twice."""
    return [
        constant_attr("m_scalar", "m", onnx.AttributeProto.INT),
        helper.make_node("Unsqueeze", ["m_scalar", "zero_1d"], ["m_1d"]),
        constant_attr("written", "checkpoints", onnx.AttributeProto.INTS),
        helper.make_node("Concat", ["m_1d", "written"], ["ks_all"], axis=0),
        helper.make_node("Gather", ["written", "zero_1d"], ["written_first"], axis=0),
        helper.make_node("Less", ["written_first", "one_1d"], ["m_needed"]),
        helper.make_node("Greater", ["written", "zero_1d"], ["written_valid"]),
        helper.make_node("Concat", ["m_needed", "written_valid"], ["ks_valid"], axis=0),
        helper.make_node("Compress", ["ks_all", "ks_valid"], ["ks"], axis=0),
        helper.make_node("Shape", ["W"], ["w_shape"]),
        helper.make_node("Gather", ["w_shape", "one_1d"], ["d_1d"], axis=0),
        helper.make_node("Gather", ["ks", "zero_1d"], ["k1_1d"], axis=0),
        helper.make_node("Cast", ["d_1d"], ["d_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", ["ks"], ["k_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", ["k1_1d"], ["k1_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Div", ["d_f", "k_f"], ["scale_f"]),
        helper.make_node("Sub", ["d_1d", "ks"], ["rest"]),
        helper.make_node("Sub", ["d_1d", "k1_1d"], ["rest1"]),
        helper.make_node("Cast", ["rest"], ["rest_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", ["rest1"], ["rest1_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["rest_f", "k1_f"], ["f_num"]),
        helper.make_node("Mul", ["k_f", "rest1_f"], ["f_den"]),
        helper.make_node("Div", ["f_num", "f_den"], ["f_sq"]),
        helper.make_node("Sqrt", ["f_sq"], ["f_f"]),
        helper.make_node("Squeeze", ["d_1d", "zero_1d"], ["d_scalar"]),
        helper.make_node("Range", ["zero_s", "d_scalar", "one_s"], ["positions"]),
        helper.make_node("Unsqueeze", ["ks", "one_1d"], ["ks_col"]),
        helper.make_node("Less", ["positions", "ks_col"], ["mask_b"]),
        helper.make_node("Cast", ["mask_b"], ["mask_f"], to=onnx.TensorProto.FLOAT),
    ]


def build_exprune_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.{NAME} needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = [
        helper.make_node("Constant", [], ["zero_1d"], value_ints=[0]),
        helper.make_node("Constant", [], ["one_1d"], value_ints=[1]),
        helper.make_node("Constant", [], ["zero_s"], value_int=0),
        helper.make_node("Constant", [], ["one_s"], value_int=1),
        helper.make_node("Constant", [], ["zero_f"], value_float=0.0),
        *checkpoint_nodes(),
        helper.make_node("Gather", ["X", "Perm"], ["xp"], axis=-1),
        like("mask_f", "X", "mask", opset),
        helper.make_node("Unsqueeze", ["scale_f", "one_1d"], ["scale_col_f"]),  # [c, 1]: over the neurons
        helper.make_node("Unsqueeze", ["f_f", "one_1d"], ["f_col_f"]),
        like("scale_col_f", "X", "scale", opset),
        like("f_col_f", "X", "f", opset),
        # probes [..., c, d] -> partial sums [..., c, n]
        helper.make_node("Unsqueeze", ["xp", "last2"], ["xp_c"]),
        helper.make_node("Mul", ["xp_c", "mask"], ["probes"]),
        helper.make_node("Transpose", ["W"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["probes", "w_t"], ["partial"]),
        helper.make_node("Mul", ["partial", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "B"], ["score"]),
        helper.make_node("Mul", ["f", "Tau"], ["bound"]),
        helper.make_node("Less", ["score", "bound"], ["fires"]),
        helper.make_node("Cast", ["fires"], ["fires_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["fires_f"], ["any_f"], axes=[-2], keepdims=0)
        if opset < 18 else helper.make_node("ReduceMax", ["fires_f", "last2"], ["any_f"], keepdims=0),
        helper.make_node("Cast", ["any_f"], ["skipped"], to=onnx.TensorProto.BOOL),
        helper.make_node("MatMul", ["xp", "w_t"], ["linear"]),
        helper.make_node("Add", ["linear", "B"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["active"]),
        like("zero_f", "X", "zero", opset),
        helper.make_node("Where", ["skipped", "zero", "active"], ["Y"]),
    ]
    nodes.insert(0, helper.make_node("Constant", [], ["last2"], value_ints=[-2]))
    function = helper.make_function(DOMAIN, NAME, ["X", "W", "B", "Tau", "Perm"], ["Y"], nodes,
                                    [helper.make_opsetid("", opset)], attributes=["m", "rule"],
                                    attribute_protos=[helper.make_attribute("checkpoints", [0])])
    function.doc_string = "ExPrune dynamic neuron pruning before a ReLU; see graphopt.ops.exprune."
    return function

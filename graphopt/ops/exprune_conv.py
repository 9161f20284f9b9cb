"""ExPrune Conv+ReLU as a model-local ONNX function `graphopt.ExPruneConvRelu` (domain opset 1).

Inputs X [N, C, H, W] (2-D convolution, group 1), W [M, C, kh, kw] with its input channels already
permuted so the probe channels come first, B [M], Tau [M] and Perm [C] (int64, the channel
permutation). Attributes: strides, pads ([top, left, bottom, right]) and dilations as in Conv (always
written explicitly), m, rule and checkpoints as in graphopt.ops.exprune with d = C channels. The
exchangeable terms of output position (n, j, y, x) are the C·kh·kw products W[j, c, a, b] · x'[n, c, ·, ·]
of its receptive field; the probe of length k is the first k permuted channels at every kernel tap.
With x' = X[:, Perm]:

    S_jk     = Σ_{c<k} Σ_{a,b} W[j, c, a, b] x'[n, c, y·s_h + a·d_h − p_t, x·s_w + b·d_w − p_l]
    score_jk = S_jk · (C / k) + B_j                        (the estimate of the full pre-activation)
    f_k      = sqrt((C − k) · k_1 / (k · (C − k_1)))       (relative standard error, f_{k_1} = 1)
    Y        = 0                          if score_jk < Tau_j · f_k at some checkpoint k
             = max(conv(x', W) + B_j, 0)  otherwise

per output position, in float32 (scale_k = float(C) / float(k), no fused multiply-add), exactly as the
linear op with its rows being output positions. Tau_j = -inf never fires and the op is exactly
ReLU(Conv(X, W_orig) + B).

The function body computes every checkpoint's partial sums with one Conv: X' is copied c times along a
new axis, copy i keeping channels < k_i (the rest multiplied by 0), flattened into the batch axis
([N·c, C, H, W]), convolved with W and reshaped back to [N, c, M, H', W']. It computes the full
convolution as well (the saving needs a native kernel, which this op does not have yet), so its
decisions agree with `exprune_conv_reference` up to float32 rounding of the partial sums in
onnxruntime's summation order (the reference sums in float64 and rounds once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.exprune import boundary_factors, checkpoint_nodes, probe_scale, validate_checkpoints
from graphopt.ops.functions import DOMAIN, like

NAME = "ExPruneConvRelu"
MIN_OPSET = 15  # CastLike and Shape's start/end
INPUTS = ["X", "W", "B", "Tau", "Perm"]
ATTRIBUTES = ["m", "rule", "checkpoints", "strides", "pads", "dilations"]


def output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    """Conv's output length along one spatial axis."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
           dilations: Sequence[int]) -> np.ndarray:
    """The receptive fields of x [N, C, H, W]: float64 [N, H', W', C, kh, kw] (zero padding)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h, out_w = output_size(h, kh, sh, top, bottom, dh), output_size(w, kw, sw, left, right, dw)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    cols = np.empty((n, out_h, out_w, c, kh, kw), dtype=np.float64)
    for a in range(kh):
        for b in range(kw):
            window = padded[:, :, a * dh: a * dh + sh * (out_h - 1) + 1: sh, b * dw: b * dw + sw * (out_w - 1) + 1: sw]
            cols[:, :, :, :, a, b] = window.transpose(0, 2, 3, 1)
    return cols


def receptive_fields(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                     dilations: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
    """The receptive fields of x [N, C, H, W] at output positions `rows` (indices into the flattened
    [N, H', W'] positions; None: all of them): float64 [P, C, kh, kw], gathered without forming the
    others (a 3 x 39 kernel over a 172 x 264 map makes 340 MB of fields per map)."""
    if rows is None:
        cols = im2col(x, kernel, strides, pads, dilations)
        return cols.reshape(-1, *cols.shape[3:])
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h, out_w = output_size(h, kh, sh, top, bottom, dh), output_size(w, kw, sw, left, right, dw)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    sample, position = np.divmod(np.asarray(rows, dtype=np.int64), out_h * out_w)
    y, x_at = np.divmod(position, out_w)
    fields = np.empty((len(sample), c, kh, kw), dtype=np.float64)
    for a in range(kh):
        for b in range(kw):
            fields[:, :, a, b] = padded[sample, :, y * sh + a * dh, x_at * sw + b * dw]
    return fields


def prefix_sums(cols: np.ndarray, w: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Σ over the first k channels (all taps) of every receptive field, for each k in `lengths`.

    cols [P, C, kh, kw] (float64), w [M, C, kh, kw]: float64 [P, M, len(lengths)], summed segment by
    segment between consecutive lengths (float64, so the order does not matter at float32 precision).
    """
    p, m = cols.shape[0], w.shape[0]
    w64 = w.astype(np.float64)
    sums = np.empty((p, m, len(lengths)), dtype=np.float64)
    running, start = np.zeros((p, m), dtype=np.float64), 0
    for index, k in enumerate(lengths):
        if k > start:
            running = running + cols[:, start:k].reshape(p, -1) @ w64[:, start:k].reshape(m, -1).T
        sums[:, :, index], start = running, k
    return sums


def checkpoint_scores(partials: np.ndarray, b: np.ndarray, c: int, checkpoints: Sequence[int]) -> np.ndarray:
    """score_jk [P, M, len(checkpoints)] in float32 from float64 partials [P, M, >= len(checkpoints)]."""
    return np.stack([partials[:, :, i].astype(np.float32) * probe_scale(c, k) + b.astype(np.float32)
                     for i, k in enumerate(checkpoints)], axis=-1).astype(np.float32)


def exprune_conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, tau: np.ndarray, perm: np.ndarray,
                           m: int, checkpoints: Sequence[int] | None, strides: Sequence[int],
                           pads: Sequence[int], dilations: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(Y, skipped) [N, M, H', W'] for float32 inputs; `skipped` marks the positions predicted negative."""
    permuted = np.asarray(x, dtype=np.float32)[:, np.asarray(perm)]
    c = permuted.shape[1]
    ks = [int(m)] if checkpoints is None else [int(k) for k in checkpoints]
    cols = im2col(permuted, w.shape[2:], strides, pads, dilations)
    n, out_h, out_w = cols.shape[:3]
    partials = prefix_sums(cols.reshape(n * out_h * out_w, *cols.shape[3:]), w, [*ks, c])
    scores = checkpoint_scores(partials, b, c, ks)
    bounds = tau.astype(np.float32)[:, None] * boundary_factors(c, ks)[None, :]
    skipped = np.any(scores < bounds[None], axis=-1)
    full = partials[:, :, -1] + b.astype(np.float64)
    y = np.where(skipped, 0.0, np.maximum(full, 0.0)).astype(np.float32)
    shape = (n, out_h, out_w, w.shape[0])
    return y.reshape(shape).transpose(0, 3, 1, 2), skipped.reshape(shape).transpose(0, 3, 1, 2)


def make_exprune_conv_node(inputs: list[str], output: str, m: int, strides: Sequence[int], pads: Sequence[int],
                           dilations: Sequence[int], rule: str = "threshold", name: str = "",
                           checkpoints: Sequence[int] | None = None) -> onnx.NodeProto:
    """A `graphopt.ExPruneConvRelu` node reading [X, W, B, Tau, Perm]."""
    ks = validate_checkpoints(0, m, rule, checkpoints)
    if len(inputs) != len(INPUTS):
        raise ValueError("ExPruneConvRelu reads X, W, B, Tau, Perm")
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise ValueError("ExPruneConvRelu is a 2-D convolution: 2 strides, 2 dilations, 4 pads")
    return helper.make_node(NAME, inputs, [output], name=name or None, domain=DOMAIN, m=int(m), rule=rule,
                            checkpoints=ks, strides=[int(s) for s in strides], pads=[int(p) for p in pads],
                            dilations=[int(d) for d in dilations])


def _conv(inputs: list[str], output: str) -> onnx.NodeProto:
    """A Conv whose strides, pads and dilations are the function's attributes."""
    node = helper.make_node("Conv", inputs, [output])
    for attribute in ("strides", "pads", "dilations"):
        node.attribute.append(onnx.AttributeProto(name=attribute, ref_attr_name=attribute,
                                                  type=onnx.AttributeProto.INTS))
    return node


def _ints(output: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value_ints=values)


def _decision_nodes(opset: int) -> list[onnx.NodeProto]:
    """skipped [N, M, H', W'] (bool) from the stacked probe convolution."""
    reduce = (helper.make_node("ReduceMax", ["fires_f"], ["any_f"], axes=[1], keepdims=0) if opset < 18
              else helper.make_node("ReduceMax", ["fires_f", "one_1d"], ["any_f"], keepdims=0))
    return [
        # [N, 1, C, H, W] · [1, c, C, 1, 1] -> [N·c, C, H, W]
        helper.make_node("Unsqueeze", ["mask_f", "axes_mask"], ["mask5_f"]),
        like("mask5_f", "X", "mask5", opset),
        helper.make_node("Unsqueeze", ["xp", "one_1d"], ["xp5"]),
        helper.make_node("Mul", ["xp5", "mask5"], ["probes5"]),
        helper.make_node("Shape", ["xp"], ["xp_tail"], start=1),
        helper.make_node("Concat", ["minus_one_1d", "xp_tail"], ["stacked_shape"], axis=0),
        helper.make_node("Reshape", ["probes5", "stacked_shape"], ["stacked"]),
        _conv(["stacked", "W"], "partial_flat"),
        # [N·c, M, H', W'] -> [N, c, M, H', W']
        helper.make_node("Shape", ["X"], ["n_1d"], end=1),
        helper.make_node("Shape", ["partial_flat"], ["partial_tail"], start=1),
        helper.make_node("Concat", ["n_1d", "minus_one_1d", "partial_tail"], ["partial_shape"], axis=0),
        helper.make_node("Reshape", ["partial_flat", "partial_shape"], ["partial"]),
        helper.make_node("Unsqueeze", ["scale_f", "axes_scale"], ["scale5_f"]),
        helper.make_node("Unsqueeze", ["f_f", "axes_scale"], ["f5_f"]),
        like("scale5_f", "X", "scale5", opset),
        like("f5_f", "X", "f5", opset),
        helper.make_node("Unsqueeze", ["B", "axes_neuron"], ["b5"]),
        helper.make_node("Unsqueeze", ["Tau", "axes_neuron"], ["tau5"]),
        helper.make_node("Mul", ["partial", "scale5"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b5"], ["score"]),
        helper.make_node("Mul", ["f5", "tau5"], ["bound"]),
        helper.make_node("Less", ["score", "bound"], ["fires"]),
        helper.make_node("Cast", ["fires"], ["fires_f"], to=onnx.TensorProto.FLOAT),
        reduce,
        helper.make_node("Cast", ["any_f"], ["skipped"], to=onnx.TensorProto.BOOL),
    ]


def build_exprune_conv_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.{NAME} needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = [
        _ints("zero_1d", [0]), _ints("one_1d", [1]), _ints("minus_one_1d", [-1]),
        _ints("axes_mask", [0, 3, 4]), _ints("axes_scale", [0, 2, 3, 4]), _ints("axes_neuron", [0, 1, 3, 4]),
        helper.make_node("Constant", [], ["zero_s"], value_int=0),
        helper.make_node("Constant", [], ["one_s"], value_int=1),
        helper.make_node("Constant", [], ["zero_f"], value_float=0.0),
        *checkpoint_nodes(),  # with d = C: ks, scale_f, f_f [c], mask_f [c, C]
        helper.make_node("Gather", ["X", "Perm"], ["xp"], axis=1),
        *_decision_nodes(opset),
        _conv(["xp", "W", "B"], "pre"),
        helper.make_node("Relu", ["pre"], ["active"]),
        like("zero_f", "X", "zero", opset),
        helper.make_node("Where", ["skipped", "zero", "active"], ["Y"]),
    ]
    function = helper.make_function(DOMAIN, NAME, INPUTS, ["Y"], nodes, [helper.make_opsetid("", opset)],
                                    attributes=ATTRIBUTES)
    function.doc_string = "ExPrune dynamic pruning of Conv+ReLU output positions; see graphopt.ops.exprune_conv."
    return function

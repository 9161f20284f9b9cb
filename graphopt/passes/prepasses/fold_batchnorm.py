"""Fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul that feeds it.

With s = scale / sqrt(var + eps) and t = bias - mean * s, BN(y) = s * y + t per channel (axis 1).
When y = producer(x) is read only by the BN, s scales the producer's output channels and t joins its
bias:
- Conv:          W[o] *= s[o],                 b = b * s + t
- ConvTranspose: W[:, o] *= s[o] (per group),  b = b * s + t
- Gemm:          column o of op(B) *= s[o],    C = (beta * C) * s + t, beta = 1
- MatMul (rank-2 output, constant B[K, N]): B[:, o] *= s[o], then Add(t)
Exact up to floating-point rounding: the folded arithmetic runs in float64 and weights keep their
dtype. A BN that does not follow such a producer is left in place, with the reason recorded.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register


def _affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    params = [ir.constant_array(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "parameters are not constant"
    if bn.attrs.get("training_mode", 0) or any(out.outputs for out in bn.outputs[1:]):
        return "training-mode BatchNormalization"
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, bias - mean * s


def _fold_conv(graph: gs.Graph, conv: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
    weight = ir.constant_array(conv.inputs[1])
    w = weight.astype(np.float64)
    if conv.op == "Conv":
        w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    else:  # ConvTranspose: W is [Cin, Cout/groups, k...], output channel = g * Cout/groups + j
        groups = int(conv.attrs.get("group", 1))
        per_group = w.shape[1]
        grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        w = (grouped * s.reshape(groups, 1, per_group, *([1] * (w.ndim - 2)))).reshape(w.shape)
    has_bias = len(conv.inputs) > 2 and conv.inputs[2].name  # an empty name is an omitted bias
    bias = ir.constant_array(conv.inputs[2]).astype(np.float64) if has_bias else 0.0
    ir.set_input_array(graph, conv, 1, w.astype(weight.dtype))
    new_bias = (bias * s + t).astype(weight.dtype)
    if has_bias:
        ir.set_input_array(graph, conv, 2, new_bias)
    else:
        while len(conv.inputs) > 2:
            conv.inputs.pop()
        conv.inputs.append(gs.Constant(ir.unique_name(graph, f"{conv.name or 'conv'}_bias"), new_bias))


def _fold_gemm(graph: gs.Graph, gemm: gs.Node, s: np.ndarray, t: np.ndarray) -> str | None:
    weight = ir.constant_array(gemm.inputs[1])
    if gemm.attrs.get("transB", 0):
        w = weight.astype(np.float64) * s[:, None]
    else:
        w = weight.astype(np.float64) * s[None, :]
    bias = 0.0
    if len(gemm.inputs) > 2 and gemm.inputs[2].name:
        c = ir.constant_array(gemm.inputs[2])
        # C broadcasts to [M, N]; only a scalar or a row ([N], [1, N]) is per output column ([N, 1] is not)
        if c is None or not (c.size == 1 or c.size == c.shape[-1] == s.size):
            return "Gemm bias C is not a constant of shape [N]"
        bias = float(gemm.attrs.get("beta", 1.0)) * c.astype(np.float64).reshape(-1)
    ir.set_input_array(graph, gemm, 1, w.astype(weight.dtype))
    new_bias = (bias * s + t).astype(weight.dtype)
    gemm.attrs["beta"] = 1.0
    if len(gemm.inputs) > 2 and gemm.inputs[2].name:
        ir.set_input_array(graph, gemm, 2, new_bias)
    else:
        while len(gemm.inputs) > 2:  # an empty optional C; gs lists cannot delete slices
            gemm.inputs.pop()
        gemm.inputs.append(gs.Constant(ir.unique_name(graph, f"{gemm.name or 'gemm'}_bias"), new_bias))
    return None


def _match(graph: gs.Graph, bn: gs.Node) -> gs.Node | str:
    """The producer to fold `bn` into, or why there is none."""
    x = bn.inputs[0]
    producer = ir.producer(x)
    if producer is None or producer.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return f"input is produced by {producer.op if producer else 'a graph input'}"
    if len(x.outputs) != 1 or ir.is_graph_io(graph, x):
        return f"{producer.op} output is also read elsewhere"
    if ir.constant_array(producer.inputs[1]) is None:
        return f"{producer.op} weight is not constant"
    if (producer.op in ("Conv", "ConvTranspose") and len(producer.inputs) > 2 and producer.inputs[2].name
            and ir.constant_array(producer.inputs[2]) is None):
        return f"{producer.op} bias is not constant"
    if producer.op == "MatMul":
        if x.shape is None or len(x.shape) != 2 or ir.constant_array(producer.inputs[1]).ndim != 2:
            return "MatMul output is not known to be rank 2"
    return producer


@register
class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    description = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul"
    # parameters are read only from initializers, and an Identity between producer and BN hides the producer
    requires = frozenset({"constants_normalised", "identities_removed"})
    ensures = frozenset({"batchnorm_folded"})
    preserves = all_but()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"folded": 0})
        batchnorms = [n for n in graph.nodes if n.op == "BatchNormalization"]
        if any(ir.producer(n.inputs[0]) is not None and ir.producer(n.inputs[0]).op == "MatMul" for n in batchnorms):
            ir.apply_inferred_shapes(graph, ctx.template)
        for bn in batchnorms:
            label = bn.name or bn.outputs[0].name
            affine = _affine(bn)
            producer = _match(graph, bn) if not isinstance(affine, str) else affine
            if isinstance(producer, str):
                result.skipped.append(f"{label}: BatchNormalization left in place: {producer}")
                continue
            s, t = affine
            y = bn.outputs[0]
            if producer.op in ("Conv", "ConvTranspose"):
                _fold_conv(graph, producer, s, t)
            elif producer.op == "Gemm":
                reason = _fold_gemm(graph, producer, s, t)
                if reason:
                    result.skipped.append(f"{label}: BatchNormalization left in place: {reason}")
                    continue
            else:
                weight = ir.constant_array(producer.inputs[1])
                ir.set_input_array(graph, producer, 1, (weight.astype(np.float64) * s).astype(weight.dtype))
                shift = gs.Constant(ir.unique_name(graph, f"{label}_shift"), t.astype(weight.dtype))
                x = bn.inputs[0]
                ir.detach(bn)
                graph.nodes.append(gs.Node("Add", f"{label}_shift", inputs=[x, shift], outputs=[y]))
                result.stats["folded"] += 1
                result.modified = True
                continue
            ir.detach(bn)
            producer.outputs[0] = y
            result.stats["folded"] += 1
            result.modified = True
        return result

"""TSRA (two-subspace radial activation) as a model-local ONNX function `graphopt.TSRA`.

For x with channels on axis 1, split into U = x[:, :split] and V = x[:, split:]:
    s_U = ||x_U||₂, s_V = ||x_V||₂ over the channel axis (per position for images)
    r   = s_U / (sqrt(s_U² + s_V²) + eps)
    g_U = σ(alpha_u (r − beta_u)),  g_V = σ(alpha_v (r − beta_v))
    y   = [g_U x_U, g_V x_V]
Defaults alpha_u = alpha_v = 5, beta_u = 0.5, beta_v = 0.7, eps = 1e-6. The gains depend on x only through
s_U and s_V, so y is equivariant to Q = blockdiag(Q_U, Q_V) for orthogonal Q_U (split × split) and Q_V:
TSRA(Q x) = Q TSRA(x) exactly. `tsra_reference` is the float64 numpy reference of the same formula.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, MIN_OPSET, constant_attr, like

NAME = "TSRA"
DEFAULTS = {"alpha_u": 5.0, "alpha_v": 5.0, "beta_u": 0.5, "beta_v": 0.7, "eps": 1e-6}
_FLOATS = tuple(DEFAULTS)


def tsra_reference(x: np.ndarray, split: int, alpha_u: float = 5.0, alpha_v: float = 5.0, beta_u: float = 0.5,
                   beta_v: float = 0.7, eps: float = 1e-6) -> np.ndarray:
    """TSRA of `x` (channels on axis 1) in float64."""
    x = np.asarray(x, dtype=np.float64)
    u, v = x[:, :split], x[:, split:]
    su2, sv2 = (u * u).sum(axis=1, keepdims=True), (v * v).sum(axis=1, keepdims=True)
    r = np.sqrt(su2) / (np.sqrt(su2 + sv2) + eps)
    gate_u = 1.0 / (1.0 + np.exp(-alpha_u * (r - beta_u)))
    gate_v = 1.0 / (1.0 + np.exp(-alpha_v * (r - beta_v)))
    return np.concatenate([gate_u * u, gate_v * v], axis=1)


def make_tsra_node(x: str, y: str, split: int, name: str = "", **params: float) -> onnx.NodeProto:
    """A `graphopt.TSRA` node; `params` override DEFAULTS (alpha_u, alpha_v, beta_u, beta_v, eps)."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown TSRA parameters {sorted(unknown)}")
    values = {**DEFAULTS, **params}
    return helper.make_node(NAME, [x], [y], name=name or None, domain=DOMAIN, split=int(split),
                            **{k: float(values[k]) for k in _FLOATS})


def build_tsra_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.TSRA needs opset >= {MIN_OPSET}, the model has {opset}")
    ints = onnx.AttributeProto.INT
    floats = onnx.AttributeProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["axes"], value_ints=[1]),
        helper.make_node("Constant", [], ["start"], value_ints=[0]),
        helper.make_node("Constant", [], ["end"], value_ints=[np.iinfo(np.int64).max]),
        constant_attr("split_scalar", "split", ints),
        helper.make_node("Unsqueeze", ["split_scalar", "start"], ["split_at"]),
        helper.make_node("Slice", ["X", "start", "split_at", "axes"], ["u"]),
        helper.make_node("Slice", ["X", "split_at", "end", "axes"], ["v"]),
        helper.make_node("Mul", ["u", "u"], ["u2"]),
        helper.make_node("Mul", ["v", "v"], ["v2"]),
        helper.make_node("ReduceSum", ["u2", "axes"], ["su2"], keepdims=1),
        helper.make_node("ReduceSum", ["v2", "axes"], ["sv2"], keepdims=1),
        helper.make_node("Sqrt", ["su2"], ["su"]),
        helper.make_node("Add", ["su2", "sv2"], ["s2"]),
        helper.make_node("Sqrt", ["s2"], ["s"]),
    ]
    for key in _FLOATS:
        nodes.append(constant_attr(f"{key}_f", key, floats))
        nodes.append(like(f"{key}_f", "X", f"{key}_c", opset))
    nodes += [
        helper.make_node("Add", ["s", "eps_c"], ["denominator"]),
        helper.make_node("Div", ["su", "denominator"], ["r"]),
    ]
    for part in ("u", "v"):
        nodes += [
            helper.make_node("Sub", ["r", f"beta_{part}_c"], [f"shifted_{part}"]),
            helper.make_node("Mul", [f"alpha_{part}_c", f"shifted_{part}"], [f"logit_{part}"]),
            helper.make_node("Sigmoid", [f"logit_{part}"], [f"gate_{part}"]),
            helper.make_node("Mul", [f"gate_{part}", part], [f"y_{part}"]),
        ]
    nodes.append(helper.make_node("Concat", ["y_u", "y_v"], ["Y"], axis=1))
    function = helper.make_function(DOMAIN, NAME, ["X"], ["Y"], nodes,
                                    [helper.make_opsetid("", opset)], attributes=["split", *_FLOATS])
    function.doc_string = "Two-subspace radial activation; see graphopt.ops.tsra."
    return function

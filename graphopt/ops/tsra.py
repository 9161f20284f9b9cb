"""TSRA (two-subspace radial activation) as a model-local ONNX function `graphopt.TSRA`.

For x with channels on `axis` (attribute, default 1: the channel axis of NCHW / [N, C]; -1 is the last
axis of token-major [N, T, C] activations; negative counts from the end), split into U = the first
`split` channels and V = the rest:
    s_U = ||x_U||₂, s_V = ||x_V||₂ over `axis` (per position of the other axes)
    r   = s_U / (sqrt(s_U² + s_V²) + eps)
    g_U = σ(alpha_u (r − beta_u)),  g_V = σ(alpha_v (r − beta_v))
    y   = [g_U x_U, g_V x_V]
Defaults alpha_u = alpha_v = 5, beta_u = 0.5, beta_v = 0.7, eps = 1e-6. The gains depend on x only through
s_U and s_V, so y is equivariant to Q = blockdiag(Q_U, Q_V) for orthogonal Q_U (split × split) and Q_V
acting on `axis` alone: TSRA(Q x) = Q TSRA(x) exactly. `tsra_reference` is the float64 numpy reference.
A node without `axis` splits axis 1, so models written before the attribute existed keep their meaning
(a function-attribute default, `FunctionProto.attribute_proto`; an older copy of the function without
`axis` is replaced when a node needs it, see graphopt.ops.functions).
In the body nothing needs the axis as a computed tensor, so every shape stays inferable at opset 13+:
the channel index along `axis` is a CumSum of int64 ones (exact for any size), U is the mask
index < split, s_U² + s_V² and s_U² are the last entries (Gather(·, [-1], axis)) of CumSums of x² and
of x² masked to U (multiplying by an exact 0/1 select), and y = Where(U, g_U, g_V) · x.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, MIN_OPSET, constant_attr, like

NAME = "TSRA"
DEFAULTS = {"alpha_u": 5.0, "alpha_v": 5.0, "beta_u": 0.5, "beta_v": 0.7, "eps": 1e-6}
DEFAULT_AXIS = 1
_FLOATS = tuple(DEFAULTS)


def tsra_reference(x: np.ndarray, split: int, alpha_u: float = 5.0, alpha_v: float = 5.0, beta_u: float = 0.5,
                   beta_v: float = 0.7, eps: float = 1e-6, axis: int = DEFAULT_AXIS) -> np.ndarray:
    """TSRA of `x` (channels on `axis`) in float64."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    u, v = x[..., :split], x[..., split:]
    su2, sv2 = (u * u).sum(axis=-1, keepdims=True), (v * v).sum(axis=-1, keepdims=True)
    r = np.sqrt(su2) / (np.sqrt(su2 + sv2) + eps)
    gate_u = 1.0 / (1.0 + np.exp(-alpha_u * (r - beta_u)))
    gate_v = 1.0 / (1.0 + np.exp(-alpha_v * (r - beta_v)))
    return np.moveaxis(np.concatenate([gate_u * u, gate_v * v], axis=-1), -1, axis)


def make_tsra_node(x: str, y: str, split: int, name: str = "", axis: int = DEFAULT_AXIS,
                   **params: float) -> onnx.NodeProto:
    """A `graphopt.TSRA` node; `params` override DEFAULTS (alpha_u, alpha_v, beta_u, beta_v, eps);
    `axis` is written only when it differs from the default 1."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown TSRA parameters {sorted(unknown)}")
    values = {**DEFAULTS, **params}
    extra = {} if int(axis) == DEFAULT_AXIS else {"axis": int(axis)}
    return helper.make_node(NAME, [x], [y], name=name or None, domain=DOMAIN, split=int(split),
                            **{k: float(values[k]) for k in _FLOATS}, **extra)


def _with_axis(node: onnx.NodeProto) -> onnx.NodeProto:
    """`node` with its `axis` attribute referencing the function attribute (shapes stay inferable)."""
    node.attribute.append(onnx.AttributeProto(name="axis", ref_attr_name="axis", type=onnx.AttributeProto.INT))
    return node


def _subspace_nodes(opset: int) -> list[onnx.NodeProto]:
    """in_u (x's shape: channel index along `axis` < split), total = s_U² + s_V², su2 = s_U²."""
    return [
        constant_attr("axis_scalar", "axis", onnx.AttributeProto.INT),
        constant_attr("split_scalar", "split", onnx.AttributeProto.INT),
        helper.make_node("Constant", [], ["last"], value_ints=[-1]),
        helper.make_node("Constant", [], ["zero_f"], value_float=0.0),
        like("zero_f", "X", "zero_c", opset),
        helper.make_node("Cast", ["X"], ["as_bool"], to=onnx.TensorProto.BOOL),
        helper.make_node("Xor", ["as_bool", "as_bool"], ["nowhere"]),
        helper.make_node("Not", ["nowhere"], ["everywhere"]),
        helper.make_node("Cast", ["everywhere"], ["ones"], to=onnx.TensorProto.INT64),
        helper.make_node("CumSum", ["ones", "axis_scalar"], ["position"]),  # 1..C along axis
        helper.make_node("LessOrEqual", ["position", "split_scalar"], ["in_u"]),
        helper.make_node("Mul", ["X", "X"], ["squares"]),
        helper.make_node("Where", ["in_u", "squares", "zero_c"], ["u_squares"]),
        helper.make_node("CumSum", ["squares", "axis_scalar"], ["running"]),
        helper.make_node("CumSum", ["u_squares", "axis_scalar"], ["u_running"]),
        _with_axis(helper.make_node("Gather", ["running", "last"], ["s2"])),
        _with_axis(helper.make_node("Gather", ["u_running", "last"], ["su2"])),
    ]


def build_tsra_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.TSRA needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = _subspace_nodes(opset) + [
        helper.make_node("Sqrt", ["su2"], ["su"]),
        helper.make_node("Sqrt", ["s2"], ["s"]),
    ]
    for key in _FLOATS:
        nodes.append(constant_attr(f"{key}_f", key, onnx.AttributeProto.FLOAT))
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
        ]
    nodes += [
        helper.make_node("Where", ["in_u", "gate_u", "gate_v"], ["gate"]),
        helper.make_node("Mul", ["gate", "X"], ["Y"]),
    ]
    function = helper.make_function(DOMAIN, NAME, ["X"], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                    attributes=["split", *_FLOATS],
                                    attribute_protos=[helper.make_attribute("axis", DEFAULT_AXIS)])
    function.doc_string = "Two-subspace radial activation over `axis` (default 1); see graphopt.ops.tsra."
    return function

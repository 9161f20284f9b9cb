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
The body picks, at run time, a branch for axis 1 or -1 (ReduceSums over that static axis, the U mask from
a [1, .., C, .., 1] channel index applied by broadcast products) or, for any other axis,
one that never needs the axis as a computed tensor: the channel index along `axis` is a CumSum of int64 ones (exact for any size), U is the
mask index <= split, s_U² + s_V² and s_U² are the last entries (Gather(·, [-1], axis)) of CumSums of x²
and of x² masked to U, and y = Where(U, g_U, g_V) · x. Every branch keeps every shape inferable at
opset 13+ (graphopt.ops.functions.axis_dispatch).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.ops.functions import DOMAIN, MIN_OPSET, axis_dispatch, constant_attr, like

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


def _gates(p: str, su2: str, s2: str) -> list[onnx.NodeProto]:
    """gate_u, gate_v (prefixed) from s_U² and s_U² + s_V²."""
    nodes = [
        helper.make_node("Sqrt", [su2], [f"{p}su"]),
        helper.make_node("Sqrt", [s2], [f"{p}s"]),
        helper.make_node("Add", [f"{p}s", "eps_c"], [f"{p}denominator"]),
        helper.make_node("Div", [f"{p}su", f"{p}denominator"], [f"{p}r"]),
    ]
    for part in ("u", "v"):
        nodes += [
            helper.make_node("Sub", [f"{p}r", f"beta_{part}_c"], [f"{p}shifted_{part}"]),
            helper.make_node("Mul", [f"alpha_{part}_c", f"{p}shifted_{part}"], [f"{p}logit_{part}"]),
            helper.make_node("Sigmoid", [f"{p}logit_{part}"], [f"{p}gate_{part}"]),
        ]
    return nodes


def _static_branch(p: str, axis: int, opset: int) -> tuple[list[onnx.NodeProto], str]:
    """y over a static axis: ReduceSums over that axis; the U mask is the channel index of a tensor of
    ones shaped [1, .., C, .., 1] (C entries, not x's size), so y = Where(U, g_U, g_V) · x keeps x's shape
    for shape inference. The mask enters as broadcast products (onnxruntime's Where does not broadcast fast):
    the gate g_V + (g_U − g_V)·mask is g_U on U and g_V on V, to float rounding."""
    nodes = [
        helper.make_node("Constant", [], [f"{p}axes"], value_ints=[axis]),
        helper.make_node("Shape", ["X"], [f"{p}shape"]),
        helper.make_node("Div", [f"{p}shape", f"{p}shape"], [f"{p}unit_shape"]),
        helper.make_node("Gather", [f"{p}shape", f"{p}axes"], [f"{p}channels"]),
        helper.make_node("ScatterElements", [f"{p}unit_shape", f"{p}axes", f"{p}channels"], [f"{p}mask_shape"]),
        helper.make_node("ConstantOfShape", [f"{p}mask_shape"], [f"{p}ones"],
                         value=helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1])),
        helper.make_node("CumSum", [f"{p}ones", f"{p}axes_scalar"], [f"{p}position"]),
        helper.make_node("LessOrEqual", [f"{p}position", "split_scalar"], [f"{p}in_u"]),
        helper.make_node("CastLike", [f"{p}in_u", "X"], [f"{p}mask"]) if opset >= 15
        else helper.make_node("Cast", [f"{p}in_u"], [f"{p}mask"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["X", "X"], [f"{p}squares"]),
        helper.make_node("Mul", [f"{p}squares", f"{p}mask"], [f"{p}u_squares"]),  # broadcast Mul: fast
        helper.make_node("ReduceSum", [f"{p}squares", f"{p}axes"], [f"{p}s2"], keepdims=1),
        helper.make_node("ReduceSum", [f"{p}u_squares", f"{p}axes"], [f"{p}su2"], keepdims=1),
        *_gates(p, f"{p}su2", f"{p}s2"),
        helper.make_node("Sub", [f"{p}gate_u", f"{p}gate_v"], [f"{p}gate_step"]),
        helper.make_node("Mul", [f"{p}gate_step", f"{p}mask"], [f"{p}gate_rise"]),
        helper.make_node("Add", [f"{p}gate_v", f"{p}gate_rise"], [f"{p}gate"]),  # g_U on U, g_V on V
        helper.make_node("Mul", [f"{p}gate", "X"], [f"{p}y"]),
    ]
    nodes.insert(1, helper.make_node("Constant", [], [f"{p}axes_scalar"], value_int=axis))
    return nodes, f"{p}y"


def _any_axis_branch(p: str, opset: int) -> tuple[list[onnx.NodeProto], str]:
    """y over the attribute's axis: channel index by CumSum of ones, U = index <= split, s_U² + s_V² and
    s_U² as the last entries of CumSums of x² and of x² masked to U, y = Where(U, g_U, g_V) · x."""
    nodes = [
        helper.make_node("Cast", ["X"], [f"{p}as_bool"], to=onnx.TensorProto.BOOL),
        helper.make_node("Xor", [f"{p}as_bool", f"{p}as_bool"], [f"{p}nowhere"]),
        helper.make_node("Not", [f"{p}nowhere"], [f"{p}everywhere"]),
        helper.make_node("Cast", [f"{p}everywhere"], [f"{p}ones"], to=onnx.TensorProto.INT64),
        helper.make_node("CumSum", [f"{p}ones", "axis_scalar"], [f"{p}position"]),  # 1..C along axis
        helper.make_node("LessOrEqual", [f"{p}position", "split_scalar"], [f"{p}in_u"]),
        helper.make_node("Mul", ["X", "X"], [f"{p}squares"]),
        helper.make_node("Where", [f"{p}in_u", f"{p}squares", "zero_c"], [f"{p}u_squares"]),
        helper.make_node("CumSum", [f"{p}squares", "axis_scalar"], [f"{p}running"]),
        helper.make_node("CumSum", [f"{p}u_squares", "axis_scalar"], [f"{p}u_running"]),
        _with_axis(helper.make_node("Gather", [f"{p}running", "last"], [f"{p}s2"])),
        _with_axis(helper.make_node("Gather", [f"{p}u_running", "last"], [f"{p}su2"])),
        *_gates(p, f"{p}su2", f"{p}s2"),
        helper.make_node("Where", [f"{p}in_u", f"{p}gate_u", f"{p}gate_v"], [f"{p}gate"]),
        helper.make_node("Mul", [f"{p}gate", "X"], [f"{p}y"]),
    ]
    return nodes, f"{p}y"


def build_tsra_function(opset: int) -> onnx.FunctionProto:
    """The function body (standard ops only) for a model whose default-domain opset is `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"graphopt.TSRA needs opset >= {MIN_OPSET}, the model has {opset}")
    nodes = [
        constant_attr("split_scalar", "split", onnx.AttributeProto.INT),
        helper.make_node("Constant", [], ["last"], value_ints=[-1]),
        helper.make_node("Constant", [], ["start"], value_ints=[0]),
        helper.make_node("Constant", [], ["end"], value_ints=[np.iinfo(np.int64).max]),
        helper.make_node("Unsqueeze", ["split_scalar", "start"], ["split_at"]),
        helper.make_node("Constant", [], ["zero_f"], value_float=0.0),
        like("zero_f", "X", "zero_c", opset),
    ]
    for key in _FLOATS:
        nodes.append(constant_attr(f"{key}_f", key, onnx.AttributeProto.FLOAT))
        nodes.append(like(f"{key}_f", "X", f"{key}_c", opset))
    nodes += axis_dispatch("Y", lambda p, axis: _static_branch(p, axis, opset) if axis is not None
                           else _any_axis_branch(p, opset))
    function = helper.make_function(DOMAIN, NAME, ["X"], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                    attributes=["split", *_FLOATS],
                                    attribute_protos=[helper.make_attribute("axis", DEFAULT_AXIS)])
    function.doc_string = "Two-subspace radial activation over `axis` (default 1); see graphopt.ops.tsra."
    return function

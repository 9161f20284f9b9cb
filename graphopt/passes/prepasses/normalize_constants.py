"""Turn every weight representation into initializers.

Exporters write weights as initializers, `Constant` nodes, or small constant subgraphs
(`ConstantOfShape` of a constant shape, `Identity`/`Cast` chains over constants, `CastLike` of a
constant to a tensor whose dtype is known: its second input gives only the dtype). This pass evaluates
those few op types in numpy and replaces their outputs by initializers, so later passes see one
representation. Exact: the values are bit-for-bit what the nodes produce. Outputs that are graph outputs
stay produced by their node (an initializer cannot be renamed into a graph output), and a ConstantOfShape
whose result is above constant folding's size limit (constant_fold.too_large) stays a node, and so does
an Identity whose output a control-flow body reads (it shares one constant between the bodies that read it:
graphopt.passes.exprune.dispatch).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, all_but, register
from graphopt.passes.prepasses.constant_fold import too_large

_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def _constant_value(node: gs.Node) -> np.ndarray | str:
    """The value of a `Constant` node, or a reason string when it is not a dense numeric tensor."""
    for key, dtype in _SCALAR_ATTRS.items():
        if key in node.attrs:
            return np.array(node.attrs[key], dtype=dtype)
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return np.asarray(value.values)
    return f"{node.name or node.outputs[0].name}: Constant with {sorted(node.attrs)} left as a node"


def _evaluate(node: gs.Node) -> np.ndarray | str | None:
    """Evaluate a constant-producing node in numpy; None when its inputs are not all constant."""
    if node.op == "Constant":
        return _constant_value(node)
    if node.op == "CastLike":
        value, like = ir.constant_array(node.inputs[0]), node.inputs[1].dtype
        known = isinstance(like, (type, np.dtype))  # None (not inferred) or a type numpy lacks
        return value.astype(like) if value is not None and known else None
    inputs = [ir.constant_array(t) for t in node.inputs]
    if not inputs or any(value is None for value in inputs):
        return None
    if node.op == "Identity":
        return inputs[0]
    if node.op == "Cast":
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if node.op == "ConstantOfShape":
        return _constant_of_shape(node, inputs[0])
    return None


def _constant_of_shape(node: gs.Node, dims: np.ndarray) -> np.ndarray | str:
    fill = node.attrs.get("value")
    fill_value = np.asarray(fill.values).reshape(-1)[0] if isinstance(fill, gs.Constant) else np.float32(0)
    shape = tuple(int(d) for d in dims)
    if too_large(math.prod(shape) * np.asarray(fill_value).itemsize, dims.nbytes):
        return f"{node.name or node.outputs[0].name}: ConstantOfShape to {list(shape)} is above the folding limit, " \
               "left as a node"
    return np.full(shape, fill_value, dtype=np.asarray(fill_value).dtype)


_EVALUATED = ("Constant", "Identity", "Cast", "CastLike", "ConstantOfShape")


@register
class NormalizeConstants(Pass):
    name = "normalize_constants"
    description = "Constant nodes and constant ConstantOfShape/Identity/Cast/CastLike chains become initializers"
    ensures = frozenset({"constants_normalised"})
    preserves = all_but("batchnorm_folded")  # a BatchNormalization with Constant-node parameters becomes foldable

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        outputs = {t.name for t in graph.outputs}
        captured = ir.body_reads(graph)
        for node in list(graph.nodes):  # already in topological order (ONNX requires it; the manager keeps it)
            if node.op not in _EVALUATED or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            if out.name in outputs or (node.op == "Identity" and out.name in captured):
                continue
            value = _evaluate(node)
            if value is None:
                continue
            if isinstance(value, str):
                result.skipped.append(value)
                continue
            constant = gs.Constant(out.name, np.asarray(value))
            ir.replace_uses(graph, out, constant)
            ir.detach(node)
            result.stats[f"{node.op}_folded"] = result.stats.get(f"{node.op}_folded", 0) + 1
            result.modified = True
        return result


"""graphopt.RMSNorm over the last axis written out in the standard ops onnxruntime fuses.

Channel analysis and change of basis hold an RMS norm as one `graphopt.RMSNorm` node (graphopt.ops.rms_norm),
whose divisor `channels` stays the original width once channels are removed. Its function body (a sum of
squares divided by `channels`) is correct everywhere but is not a pattern onnxruntime recognises: it runs as
six element-wise kernels where an exported RMS norm runs as one fused SimplifiedLayerNormalization. Over the last axis, of static width d, the same norm is

    x / sqrt(Σx²/C + eps) = s · x / sqrt(mean(x²) + eps·C/d),    s = sqrt(C/d),

which is Pow(x, 2) → ReduceMean(last axis) → Add(eps·C/d) → Sqrt → Div(x, ·) → Mul(s): the pattern
onnxruntime's SimplifiedLayerNormFusion turns into one kernel (with C = d, s = 1, the norm torch exports).
Where the norm's one reader is a Mul by a per-channel constant only it reads (the model's own gain), s goes
into that constant and the gain Mul is the kernel's scale, as in the exported model.
`lower_rms_norms` rewrites every graphopt.RMSNorm node of the main graph whose axis is the last one and whose
input's rank, width and float type are known, and drops the model-local function when no node calls it any
more; the others (a CNN's channel axis 1, an unknown width, a norm the model came with) keep the function.
Exact up to float rounding; graphopt's norm matching (graphopt.passes.channels.function_patterns) reads the
written-out form back as an RMS norm over d followed by a per-channel gain.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.ir.graph import infer_shapes, weightless_copy
from graphopt.ops.functions import DOMAIN
from graphopt.ops.rms_norm import DEFAULT_AXIS, NAME

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's inferred type, from a copy without the weights' data (the model itself is not changed)."""
    graph = infer_shapes(weightless_copy(model, value_info=True)).graph
    return {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}


def _static_last(kind: onnx.TypeProto | None) -> tuple[int, int, int] | None:
    """(rank, last width, element type) of a float tensor type whose rank and last width are known."""
    if kind is None or not kind.tensor_type.HasField("shape") or kind.tensor_type.elem_type not in FLOATS:
        return None
    dims = kind.tensor_type.shape.dim
    if not dims or not dims[-1].HasField("dim_value") or dims[-1].dim_value <= 0:
        return None
    return len(dims), int(dims[-1].dim_value), int(kind.tensor_type.elem_type)


def _attributes(node: onnx.NodeProto) -> dict[str, float | int]:
    found: dict[str, float | int] = {"axis": DEFAULT_AXIS}
    found.update({a.name: helper.get_attribute_value(a) for a in node.attribute})
    return found


def _gain(model: onnx.ModelProto, tensor: str, width: int, readers: dict[str, list[onnx.NodeProto]],
          initializers: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    """The initializer of the one Mul reading `tensor`, where it is a gain per channel of the last axis
    ([width] or [1, ..., width]) that nothing else reads: the norm's factor can go into it."""
    found = readers.get(tensor, [])
    if len(found) != 1 or found[0].op_type != "Mul" or tensor in {o.name for o in model.graph.output}:
        return None
    other = [name for name in found[0].input if name != tensor]
    gain = initializers.get(other[0]) if other else None
    return gain if gain is not None and len(readers.get(gain.name, [])) == 1 and _per_channel(gain, width) else None


def _per_channel(tensor: onnx.TensorProto, width: int) -> bool:
    """A float constant held in the model (not a weight held by reference) of `width` entries along the last
    axis only."""
    dims = list(tensor.dims)
    return bool(dims) and dims[-1] == width and all(d == 1 for d in dims[:-1]) and tensor.data_type in FLOATS \
        and tensor.data_location != onnx.TensorProto.EXTERNAL


def _written_out(node: onnx.NodeProto, width: int, dtype: int, opset: int, names: set[str],
                 gain: onnx.TensorProto | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The norm in standard ops; its factor sqrt(C/d) multiplies `gain` (the gain Mul after it) where given,
    else a Mul of its own."""
    attrs = _attributes(node)
    channels, eps = int(attrs["channels"]), float(attrs["eps"])
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)

    def fresh(stem: str) -> str:
        base = f"{node.name or node.output[0]}_{stem}"
        name, index = base, 0
        while name in names:
            index += 1
            name = f"{base}_{index}"
        names.add(name)
        return name

    two, shift = fresh("two"), fresh("eps")
    constants = [numpy_helper.from_array(np.array(2.0, numpy_type), two),
                 numpy_helper.from_array(np.array(eps * channels / width, numpy_type), shift)]
    squares, mean, shifted, rms = (fresh(s) for s in ("squares", "mean", "shifted", "rms"))
    if opset >= 18:
        axes = fresh("axes")
        constants.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
        reduce = helper.make_node("ReduceMean", [squares, axes], [mean], name=fresh("ReduceMean"), keepdims=1)
    else:
        reduce = helper.make_node("ReduceMean", [squares], [mean], name=fresh("ReduceMean"), axes=[-1], keepdims=1)
    source, output = node.input[0], node.output[0]
    nodes = [helper.make_node("Pow", [source, two], [squares], name=fresh("Pow")), reduce,
             helper.make_node("Add", [mean, shift], [shifted], name=fresh("Add")),
             helper.make_node("Sqrt", [shifted], [rms], name=fresh("Sqrt"))]
    factor = np.sqrt(channels / width)
    if gain is not None:  # onnxruntime takes the gain Mul as the fused kernel's scale
        values = numpy_helper.to_array(gain)
        gain.CopyFrom(numpy_helper.from_array((values * factor).astype(values.dtype), gain.name))
        return nodes + [helper.make_node("Div", [source, rms], [output], name=node.name or fresh("Div"))], constants
    scale, normed = fresh("scale"), fresh("normed")
    constants.append(numpy_helper.from_array(np.full(width, factor, numpy_type), scale))
    nodes += [helper.make_node("Div", [source, rms], [normed], name=fresh("Div")),
              helper.make_node("Mul", [normed, scale], [output], name=node.name or fresh("Mul"))]
    return nodes, constants


def rms_norm_names(model: onnx.ModelProto) -> set[str]:
    """The names of the graphopt.RMSNorm nodes of `model`'s main graph."""
    return {n.name for n in model.graph.node if _is_norm(n)}


def lower_rms_norms(model: onnx.ModelProto, keep: set[str] | frozenset[str] = frozenset()
                    ) -> tuple[onnx.ModelProto, int]:
    """`model` (changed in place and returned) with its last-axis graphopt.RMSNorm nodes written out, except
    those named in `keep` (a model's own graphopt nodes stay as they came), and how many were."""
    if not any(_is_norm(n) for n in model.graph.node):
        return model, 0
    types = _types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    names = {n.name for n in model.graph.node} | {t.name for t in model.graph.initializer} | \
        {name for n in model.graph.node for name in (*n.input, *n.output)}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in model.graph.initializer}
    kept: list[onnx.NodeProto] = []
    lowered = 0
    for node in model.graph.node:
        found = _lowerable(node, keep, types)
        if found is None:
            kept.append(node)
            continue
        nodes, constants = _written_out(node, found[1], found[2], opset, names,
                                        _gain(model, node.output[0], found[1], readers, initializers))
        kept.extend(nodes)
        model.graph.initializer.extend(constants)
        lowered += 1
    if lowered:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        _drop_unused_function(model)
    return model, lowered


def _lowerable(node: onnx.NodeProto, keep: set[str] | frozenset[str], types: dict[str, onnx.TypeProto]
               ) -> tuple[int, int, int] | None:
    """(rank, width, element type) of a graphopt.RMSNorm over the last axis of a known width, not in `keep`."""
    if not _is_norm(node) or node.name in keep:
        return None
    found = _static_last(types.get(node.input[0]))
    return found if found is not None and int(_attributes(node)["axis"]) in (-1, found[0] - 1) else None


def _is_norm(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == NAME


def _drop_unused_function(model: onnx.ModelProto) -> None:
    calls = any(_is_norm(n) for n in model.graph.node) or any(_is_norm(n) for f in model.functions for n in f.node)
    if calls:
        return
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == NAME)]
    del model.functions[:]
    model.functions.extend(kept)
    if not any(n.domain == DOMAIN for n in model.graph.node) and not any(f.domain == DOMAIN for f in model.functions):
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)

"""Graph helpers over onnx-graphsurgeon.

This module (with io.py) is the only place that knows onnx-graphsurgeon's quirks. Passes work on a
`gs.Graph` and use these helpers for anything that touches constants, producers/consumers or shapes.

Invariants:
- `export_model` keeps everything of the original model that a pass did not mean to change:
  ir_version, opset imports, producer, domain, model_version, doc strings, metadata_props and
  model-local functions. The default domain's opset rises only where a pass raised `graph.opset`.
- `set_input_array` never edits an initializer shared with another consumer: it writes a new one.
- Graph inputs and outputs keep the dims the template declares (symbolic, unnamed or fixed) unless a
  pass changed a fixed size or a rank on purpose (graphopt.ir.interface).
- Shapes of intermediate tensors are dropped on export and re-inferred by ONNX shape inference,
  so a pass that changes a channel count never leaves a stale shape behind.
"""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir import weights
from graphopt.ir.interface import keep_declared

log = logging.getLogger(__name__)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings are ours to word


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model's main graph as an editable `gs.Graph` (referenced weights as their arrays, graphopt.ir.weights)."""
    return _resolve_references(gs.import_onnx(model))


_HELD = "_graphopt_by_reference"  # set on a graph imported from a model held by reference


def _resolve_references(graph: gs.Graph) -> gs.Graph:
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, LazyValues) and weights.is_reference(lazy.tensor):
            tensor.values = weights.array_of(lazy.tensor)
            tensor.data_location = None  # exported inline or as a new reference, never as the file's
            graph.__dict__[_HELD] = True  # a pruned copy stays held by reference, however small
    return graph


@contextmanager
def _as_references(graph: gs.Graph) -> Iterator[None]:
    """While exporting a graph held by reference, its large constants stand as references to their arrays
    (gs exports a LazyValues' TensorProto as it is), so no weight is copied into the model."""
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    swapped: list[tuple[gs.Constant, object]] = []
    if graph.__dict__.get(_HELD) or weights.by_reference(sum(int(t._values.nbytes) for t in constants)):
        for constant in constants:
            values = constant._values
            if isinstance(values, np.ndarray) and values.nbytes >= weights.REFERENCE_MIN_BYTES:
                if not values.flags.c_contiguous:  # the graph keeps the contiguous copy the reference names
                    values = constant.values = np.ascontiguousarray(values)
                swapped.append((constant, values))
                constant._values = LazyValues(weights.reference_to(values, constant.name))
    try:
        yield
    finally:
        for constant, values in swapped:
            constant._values = values


def replace_graph(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Give `graph` the nodes, interface, initializers, opset and functions of `model`'s main graph, in place:
    for passes that hand the whole model to a tool that rewrites models (a quantizer). The graph keeps its
    name; `export_model` still takes the model-level fields from its template."""
    rewritten = import_graph(model)
    if rewritten.__dict__.get(_HELD):
        graph.__dict__[_HELD] = True
    graph.nodes, graph.inputs, graph.outputs = rewritten.nodes, rewritten.inputs, rewritten.outputs
    graph.opset, graph.import_domains = rewritten.opset, rewritten.import_domains
    graph.ir_version = rewritten.ir_version
    graph.functions = rewritten.functions


def export_model(graph: gs.Graph, template: onnx.ModelProto, *, infer: bool = True,
                 declared: bool = True) -> onnx.ModelProto:
    """Turn `graph` back into a model carrying `template`'s model-level fields and (with `declared`) the
    dims its graph inputs and outputs declare (graphopt.ir.interface)."""
    with _as_references(graph):
        model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]  # re-inferred below; a stale shape would contradict new weights
    _drop_captured_copies(model.graph, set())
    _hoist_shared_copies(model.graph, {t.name for t in template.graph.initializer})
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    _raised_opset(model, graph)
    known = {o.domain for o in model.opset_import}
    for node in itertools.chain(model.graph.node, *(f.node for f in model.functions)):
        if node.domain not in known and node.domain not in ("", "ai.onnx"):
            model.opset_import.append(onnx.helper.make_opsetid(node.domain, 1))
            known.add(node.domain)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.training_info[:]
    model.training_info.extend(template.training_info)
    exported_functions = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in template.functions if (f.domain, f.name) not in exported_functions)
    model.graph.doc_string = template.graph.doc_string
    _restore_annotations(model.graph, template.graph)
    if model.ir_version < 4:  # before IR 4 every initializer must also be listed as a graph input
        listed = {v.name for v in model.graph.input}
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer if t.name not in listed)
    return _inferred(model, template, infer, declared)


def like_template_value_info(model: onnx.ModelProto, template: onnx.ModelProto) -> onnx.ModelProto:
    """Intermediate shapes as `template` declared them, so that what ships optimises as the original did:
    onnxruntime's optimiser fuses more where it knows more shapes (Add + LayerNormalization into
    SkipLayerNormalization on a BERT export, 10% slower at batch 8 with the fully inferred shapes, float or
    dynamically quantized). A tensor the template declared keeps the template's declaration where it still
    holds (the same type and rank, every fixed dim the same), else takes the inferred one; tensors it did not
    declare lose theirs, except the outputs of ops outside the ONNX domain (custom ops may need them)."""
    declared = {value.name: value for value in template.graph.value_info}
    custom = {name for node in model.graph.node if node.domain not in ("", "ai.onnx") for name in node.output}
    kept = [declared[value.name] if value.name in declared and _still_holds(declared[value.name], value) else value
            for value in model.graph.value_info if value.name in declared or value.name in custom]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def _still_holds(old: onnx.ValueInfoProto, new: onnx.ValueInfoProto) -> bool:
    """Whether the declaration `old` is true of the tensor `new` describes: the same element type, and where
    `old` gives a shape, the same rank with every fixed dim equal."""
    before, after = old.type.tensor_type, new.type.tensor_type
    if not old.type.HasField("tensor_type") or before.elem_type != after.elem_type:
        return False
    if not before.HasField("shape"):
        return True
    if not after.HasField("shape") or len(before.shape.dim) != len(after.shape.dim):
        return False
    return all(not a.HasField("dim_value") or (b.HasField("dim_value") and a.dim_value == b.dim_value)
               for a, b in zip(before.shape.dim, after.shape.dim))


def at_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """`model` converted to default-domain opset `version` by ONNX's version converter; ValueError with the
    converter's reason where it cannot convert an op. Passes that need a newer opset (per-axis QDQ, model-local
    functions with CastLike) convert with it and report `opset_raised_from`."""
    import onnx.version_converter

    try:
        return onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises its own types for ops it cannot convert
        raise ValueError(str(exc)) from exc


def _raised_opset(model: onnx.ModelProto, graph: gs.Graph) -> None:
    """The default domain at `graph.opset` where a pass converted the graph to a newer opset, with the IR
    version the converted graph carries."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and graph.opset is not None and int(graph.opset) > opset.version:
            opset.version = int(graph.opset)
            model.ir_version = max(model.ir_version, int(graph.ir_version or 0))


def _inferred(model: onnx.ModelProto, template: onnx.ModelProto, infer: bool, declared: bool) -> onnx.ModelProto:
    """`model` with inferred shapes (`infer`) and `template`'s declared interface dims (`declared`)."""
    model = infer_shapes(model) if infer else model
    if declared:
        keep_declared(model, template)
    return model


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The control-flow bodies a node holds (an If's branches, a Loop's or Scan's body), in attribute order."""
    return [body for attr in node.attribute for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph`, then every control-flow body in it, nested ones included."""
    yield graph
    for node in graph.node:
        for body in subgraphs(node):
            yield from nested_graphs(body)


def _drop_captured_copies(graph: onnx.GraphProto, outer: set[str]) -> None:
    """onnx-graphsurgeon writes every constant a subgraph reads into that subgraph's initializers, even
    when an enclosing graph holds it: drop those copies (names are unique across scopes, so same name,
    same tensor) or each If branch and Loop body would carry its own copy of the outer weights."""
    visible = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for subgraph in subgraphs(node):
            own = [t for t in subgraph.initializer if t.name not in visible]
            if len(own) != len(subgraph.initializer):
                del subgraph.initializer[:]
                subgraph.initializer.extend(own)
            _drop_captured_copies(subgraph, visible)


def _hoist_shared_copies(graph: onnx.GraphProto, outer: set[str]) -> None:
    """A constant the main graph does not read but subgraphs do is written by onnx-graphsurgeon into each of
    them: where several hold it (the weights both branches of an If share) or the template held it in its main
    graph (`outer`: its initializer names), keep one copy, in the main graph, where every subgraph sees it.
    Copies whose contents differ (sibling scopes may reuse a name) stay where they are."""
    bodies = [scope for scope in nested_graphs(graph) if scope is not graph]
    shared = _shared_copies(bodies, outer)
    graph.initializer.extend(shared[name] for name in sorted(shared))
    for scope in bodies:
        own = [t for t in scope.initializer if t.name not in shared]
        if len(own) != len(scope.initializer):
            del scope.initializer[:]
            scope.initializer.extend(own)


def _shared_copies(bodies: list[onnx.GraphProto], outer: set[str]) -> dict[str, onnx.TensorProto]:
    """The body initializers to keep once in the main graph (see `_hoist_shared_copies`), by name."""
    copies: dict[str, list[onnx.TensorProto]] = {}
    for tensor in (t for scope in bodies for t in scope.initializer):
        copies.setdefault(tensor.name, []).append(tensor)
    return {name: found[0] for name, found in copies.items()
            if (len(found) > 1 or name in outer) and len({t.SerializeToString() for t in found}) == 1}


def _restore_annotations(graph: onnx.GraphProto, template: onnx.GraphProto) -> None:
    """onnx-graphsurgeon drops doc strings and metadata_props of graph inputs/outputs and of nodes:
    take them back from the template, values by name and nodes by (name, op_type)."""
    values = {v.name: v for v in itertools.chain(template.input, template.output)}
    nodes = {(n.name, n.op_type): n for n in template.node if n.name}
    pairs = [*((v, values.get(v.name)) for v in itertools.chain(graph.input, graph.output)),
             *((n, nodes.get((n.name, n.op_type))) for n in graph.node)]
    for item, original in pairs:
        if original is None:
            continue
        if original.doc_string:
            item.doc_string = original.doc_string
        if getattr(original, "metadata_props", None) and not item.metadata_props:  # onnx >= 1.16
            item.metadata_props.extend(original.metadata_props)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, filled into `model` in place (and returned); a model it cannot handle is returned
    unchanged (with a debug log). Inference runs on a weightless copy (`weightless_copy`): onnx serialises the
    model it is given, and on ResNet-50 that took most of the 0.24 s a call cost."""
    light = weightless_copy(model, value_info=True)
    fused = [node for node in model.graph.node if node.domain == "com.microsoft"
             and (node.op_type in _SAME_TYPE or node.op_type in _ATTENTION_OPS)]
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        # onnx has no shape rules for onnxruntime's fused ops: seed their outputs and infer again, as long as a
        # round seeds one (at most one round per fused op, when they follow each other along one path)
        while fused and _seed_contrib_shapes(inferred, fused):
            inferred = onnx.shape_inference.infer_shapes(inferred, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:  # e.g. an unknown op
        log.debug("shape inference skipped: %s", exc)
        return model
    for field in ("node", "output", "value_info"):  # nodes: the value_info of their subgraphs
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(getattr(inferred.graph, field))
    return model


_ATTENTION_OPS = ("Attention", "GroupQueryAttention")
# onnxruntime's fused elementwise ops and norms (com.microsoft): output index -> the input whose type it has
_SAME_TYPE = {"BiasGelu": {0: 0}, "FastGelu": {0: 0}, "Gelu": {0: 0}, "QuickGelu": {0: 0}, "BiasAdd": {0: 0},
              "SkipLayerNormalization": {0: 0, 3: 0}, "SkipSimplifiedLayerNormalization": {0: 0, 3: 0}}


def _seed_contrib_shapes(model: onnx.ModelProto, fused: list[onnx.NodeProto]) -> bool:
    """Add value_info for the outputs of the `fused` nodes (onnxruntime's shape-preserving ops, `_SAME_TYPE`)
    whose input type is known and whose output has none, so a further round of ONNX inference continues past
    them; True when any was added."""
    known = {v.name: v.type for v in itertools.chain(model.graph.input, model.graph.value_info, model.graph.output)}
    added = False
    for node in fused:
        if node.op_type in _ATTENTION_OPS:
            added = _seed_attention(model, node, known) or added
            continue
        for index, source in _SAME_TYPE[node.op_type].items():
            name = node.output[index] if index < len(node.output) else ""
            if name and name not in known and node.input[source] in known:
                model.graph.value_info.append(onnx.ValueInfoProto(name=name, type=known[node.input[source]]))
                known[name] = known[node.input[source]]
                added = True
    return added


def _value_width(model: onnx.ModelProto, node: onnx.NodeProto, known: dict[str, onnx.TypeProto]) -> int | None:
    """The width of a com.microsoft attention op's output: Attention's value width (`qkv_hidden_sizes`' third
    entry, else a third of its packed weight's columns); GroupQueryAttention's num_heads query heads (the
    query's width, or its share of a packed query/key/value); None when it is not known."""
    if node.op_type == "GroupQueryAttention":
        return _grouped_width(node, known)
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [])
    if len(sizes) == 3:
        return int(sizes[2])
    weight = next((t for t in model.graph.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
    return int(weight.dims[1]) // 3 if weight is not None and len(weight.dims) == 2 else None


def _grouped_width(node: onnx.NodeProto, known: dict[str, onnx.TypeProto]) -> int | None:
    attrs = {a.name: a.i for a in node.attribute if a.name in ("num_heads", "kv_num_heads")}
    query = known[node.input[0]].tensor_type.shape.dim[2]
    if not query.HasField("dim_value") or len(attrs) != 2:
        return None
    heads, packed = attrs["num_heads"], len(node.input) < 3 or not node.input[1]
    return query.dim_value * heads // (heads + 2 * attrs["kv_num_heads"]) if packed else query.dim_value


def _seed_attention(model: onnx.ModelProto, node: onnx.NodeProto, known: dict[str, onnx.TypeProto]) -> bool:
    """The type of a com.microsoft attention op's output 0, its input's [batch, sequence, hidden] with the output
    width (`_value_width`) as the last dimension; True when it was added."""
    name = node.output[0] if node.output else ""
    source = known.get(node.input[0]) if node.input else None
    if not name or name in known or source is None or len(source.tensor_type.shape.dim) != 3:
        return False
    width = _value_width(model, node, known)
    if width is None:
        return False
    value = onnx.ValueInfoProto(name=name, type=source)
    last = value.type.tensor_type.shape.dim[2]
    last.Clear()
    last.dim_value = int(width)
    model.graph.value_info.append(value)
    known[name] = value.type
    return True


def weightless_copy(model: onnx.ModelProto, value_info: bool = False) -> onnx.ModelProto:
    """A copy for shape inference: large floating-point initializers keep their dims but not their data
    (inference reads only their shapes; copying and scanning hundreds of MB would dominate); the graph's
    intermediate shapes are copied where `value_info`."""
    graph = onnx.GraphProto(name=model.graph.name)
    for field in ("node", "input", "output", "sparse_initializer") + (("value_info",) if value_info else ()):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        large_float = tensor.data_type in _FLOAT_TYPES and math.prod(tensor.dims) > 64
        graph.initializer.append(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                                 if large_float else tensor)
    _drop_outer_value_info(graph)
    light = onnx.helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    light.ir_version = max(model.ir_version, 4)
    return light


def _drop_outer_value_info(graph: onnx.GraphProto) -> None:
    """Remove from every control-flow body the value_info of values it reads from an outer scope: a copy of the
    outer value's type written when the body was, they would override what inference finds for the outer
    value (a batch axis fixed since, say)."""
    for node in graph.node:
        for body in subgraphs(node):
            own = {v.name for v in body.input} | {t.name for t in body.initializer}
            own |= {name for inner in body.node for name in inner.output}
            kept = [v for v in body.value_info if v.name in own]
            if len(kept) != len(body.value_info):
                del body.value_info[:]
                body.value_info.extend(kept)
            _drop_outer_value_info(body)


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def constant_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer), or None for a variable."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def constant_or_node_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for computed tensors."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = tensor.inputs[0] if tensor.inputs else None
    value = node.attrs.get("value") if node is not None and node.op == "Constant" else None
    return np.asarray(value.values) if isinstance(value, gs.Constant) else None


def per_tensor_qdq(node: gs.Node) -> bool:
    """A QuantizeLinear or DequantizeLinear with one constant scale (and zero point) for the whole tensor: it acts
    on each element alone, as any elementwise op does."""
    if node.op not in ("QuantizeLinear", "DequantizeLinear") or len(node.inputs) < 2:
        return False
    constants = [constant_or_node_value(t) for t in node.inputs[1:] if t.name]
    return all(c is not None and c.size == 1 for c in constants)


def past_qdq_pairs(graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
    """`tensor`, or where its only reader is a per-tensor QuantizeLinear read only by a per-tensor
    DequantizeLinear (an activation's quantization in a QDQ model), that pair's output, pair after pair."""
    while True:
        quantize = only_reader(graph, tensor)
        if quantize is None or quantize.op != "QuantizeLinear" or not per_tensor_qdq(quantize):
            return tensor
        dequantize = only_reader(graph, quantize.outputs[0])
        if dequantize is None or dequantize.op != "DequantizeLinear" or not per_tensor_qdq(dequantize):
            return tensor
        tensor = dequantize.outputs[0]


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_io(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in itertools.chain(graph.inputs, graph.outputs))


def only_reader(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The single node reading `tensor` (which is not a graph input or output), else None."""
    readers = consumers(tensor)
    return readers[0] if len(readers) == 1 and not is_graph_io(graph, tensor) else None


def unique_name(graph: gs.Graph, base: str) -> str:
    """`base`, or `base_N` with the smallest N that names no tensor and no node of `graph` (one helper for
    both: node names must be unique too, and a fallback base such as "exprune" can be used twice)."""
    taken = set(graph.tensors().keys()) | {node.name for node in graph.nodes}
    for index in itertools.count():
        candidate = f"{base}_{index}" if index else base
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


def set_input_array(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> gs.Constant:
    """Give `node` input `index` the constant `values`, copying the initializer if it is shared."""
    current = node.inputs[index]
    shared = isinstance(current, gs.Constant) and (
        len(current.outputs) > 1 or is_graph_io(graph, current)
    )
    if isinstance(current, gs.Constant) and not shared:
        previous = current.values
        current.values = np.asarray(values, order="C")  # contiguous; a 0-d index stays 0-d
        if isinstance(previous, np.memmap):
            weights.release(previous)  # a weight of a model held by reference, now replaced
        return current
    base = current.name if current.name else f"{node.name}_in{index}"
    replacement = gs.Constant(unique_name(graph, base), np.asarray(values, order="C"))
    node.inputs[index] = replacement
    return replacement


def private_producer(graph: gs.Graph, reader: gs.Node, index: int) -> gs.Node:
    """The node computing `reader`'s input `index`, copied first when other nodes read its output too, so that
    editing its inputs changes what `reader` reads alone (exporters share one Reshape target between layers).
    The copy goes right after the original, so the node list stays in topological order."""
    node = reader.inputs[index].inputs[0]
    out = node.outputs[0]
    if len(node.outputs) != 1 or len(out.outputs) == 1:
        return node
    target = gs.Variable(unique_name(graph, f"{out.name}_own"), dtype=out.dtype, shape=out.shape)
    copy = gs.Node(node.op, unique_name(graph, f"{node.name}_own"), attrs=dict(node.attrs), inputs=list(node.inputs),
                   outputs=[target], domain=node.domain)
    graph.nodes.insert(next(i for i, n in enumerate(graph.nodes) if n is node) + 1, copy)
    reader.inputs[index] = target
    return copy


def body_reads(graph: gs.Graph) -> set[str]:
    """Names of the outer values that control-flow bodies (If branches, Loop and Scan bodies, nested) read: what
    a body neither computes nor takes as its own input. Names, so the answer holds for a copy of the graph too."""
    names: set[str] = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            for body in attr if isinstance(attr, list) else [attr]:
                if isinstance(body, gs.Graph):
                    inner = {t.name for n in body.nodes for t in n.outputs} | {t.name for t in body.inputs}
                    names |= {t.name for n in body.nodes for t in n.inputs if t.name not in inner}
                    names |= body_reads(body)
    return names


def cleanup(graph: gs.Graph) -> gs.Graph:
    """Remove dead nodes and unused initializers (graph inputs stay), then sort topologically."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False, recurse_functions=False)
    graph.toposort(recurse_subgraphs=False, recurse_functions=False, mode="nodes")
    return graph


def apply_inferred_shapes(graph: gs.Graph, template: onnx.ModelProto) -> int:
    """Fill dtypes and shapes of `graph`'s variables from ONNX shape inference; return how many."""
    model = export_model(graph, template, declared=False)  # the passes read the inferred dims
    typed = {v.name: v for v in itertools.chain(model.graph.value_info, model.graph.output)}
    count = 0
    for name, tensor in graph.tensors().items():
        info = typed.get(name)
        if isinstance(tensor, gs.Variable) and info is not None and info.type.HasField("tensor_type"):
            tensor_type = info.type.tensor_type
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else None
            if tensor_type.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in tensor_type.shape.dim]
            count += 1
    return count


def fold_constants(graph: gs.Graph, exclude: Callable[[gs.Node], bool] | None = None) -> int:
    """Evaluate every node whose inputs are all constant, except those `exclude` names (asked in
    topological order, with inferred shapes on the tensors); return how many nodes were replaced."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # its optimiser's notes on folded subgraphs are noise here
    before = len(graph.nodes)
    graph.toposort(recurse_subgraphs=False, recurse_functions=False, mode="nodes")

    def excluded(node: gs.Node) -> bool:
        return node.op in _NONDETERMINISTIC or (exclude is not None and exclude(node))

    graph.fold_constants(recurse_subgraphs=False, flatten_subgraphs=False, recurse_functions=False, error_ok=True,
                         should_exclude_node=excluded)
    cleanup(graph)
    return max(0, before - len(graph.nodes))


# folding these would freeze one draw of a random number generator into a constant
_NONDETERMINISTIC = frozenset({"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike",
                               "Multinomial", "Bernoulli"})


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of `old` read `new` instead, including subgraphs that capture it by name."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                _replace_captured(attr, old.name, new)


def _replace_captured(subgraph: gs.Graph, name: str, new: gs.Tensor) -> None:
    for node in subgraph.nodes:
        for index, tensor in enumerate(node.inputs):
            if tensor.name == name and tensor is not new:
                node.inputs[index] = new
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                _replace_captured(attr, name, new)


def replace_output(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make `node` write `new` where it wrote `old`."""
    for index, tensor in enumerate(node.outputs):
        if tensor is old:
            node.outputs[index] = new


def detach(node: gs.Node) -> None:
    """Disconnect a node so that cleanup removes it."""
    node.inputs.clear()
    node.outputs.clear()


def supersedes(function: onnx.FunctionProto, attributes: set[str]) -> bool:
    """Whether `function` should replace a copy of itself that declares `attributes`: it declares more,
    and every attribute the copy lacks has a default in `function` (which keeps the copy's meaning for
    the nodes it served)."""
    defaults = {a.name for a in function.attribute_proto}
    missing = (set(function.attribute) | defaults) - attributes
    return bool(missing) and missing <= defaults


def add_function(graph: gs.Graph, function: onnx.FunctionProto) -> None:
    """Make model-local `function` part of `graph` (exported with it), unless a copy of that name exists
    that `function` does not supersede; the copies it supersedes are replaced."""
    same = [f for f in graph.functions if f.domain == function.domain and f.name == function.name]
    if any(not supersedes(function, set(f.attrs)) for f in same):
        return
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    for stale in same:
        graph.functions.remove(stale)
    graph.functions.append(OnnxImporter.import_function(function))

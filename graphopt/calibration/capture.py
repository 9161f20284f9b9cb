"""Exposing requested intermediate tensors as graph outputs, and planning rounds under a memory bound.

- `describe` gives each requested tensor's dtype and batch-1 shape: ONNX shape inference on the model
  with its inputs fixed to one sample's shapes (and its large weights replaced by typed inputs, so
  nothing big is copied), falling back to one onnxruntime run on one sample for what inference leaves
  open (data-dependent shapes, custom domains).
- `exposing_model` keeps only the nodes the requested tensors depend on (their ancestor cone, reads
  from inside subgraphs included) and makes those tensors the only graph outputs, typed from shape
  inference, so a round computes nothing it does not report.
- `cone_fingerprints` hashes, for every tensor, exactly what determines its values: op types, domains,
  opset versions, attributes, model-local function bodies and initializer contents of its cone, and
  the names of the graph inputs it reads; node names and intermediate tensor names do not count.
  Equal fingerprints on equal data mean equal values, which is what lets cached or saved statistics be
  reused on a model whose other layers were rewritten.
- `plan_rounds` packs tensors, in topological order, into rounds whose working set fits the budget:
  batch · Σ bytes per sample + the float64 working chunks of each worker (`round_bytes`) ≤ budget. A tensor that
  alone exceeds it gets a round with a smaller batch (at least 1, with a warning if even that exceeds
  the budget). This bounds what calibration holds; onnxruntime's own working memory for the
  uncaptured intermediates is what plain inference of the cone needs as well. A round's batch is also
  cut so that one run captures at most CAPTURE_BYTES: on ResNet-50 (36 MB captured per sample) 256 samples
  ran in 8.8 s in batches of 8 against 16.8 s in batches of 32, plain inference 8.3 s, on a 2-core Xeon VM
  (`python bench/calibration_costs.py`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import onnx

from graphopt.calibration.session import make_session
from graphopt.calibration.stats import CHUNK_ELEMENTS, KINDS, StatRequest
from graphopt.errors import OptionError
from graphopt.ir.graph import subgraphs
from graphopt.ir.shapes import with_fixed_inputs

log = logging.getLogger(__name__)

CAPTURE_BYTES = 256 << 20  # captured bytes per onnxruntime run, at most (one sample more where a sample needs it)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    sample_shape: tuple[int, ...]  # batch 1
    elem_type: int
    is_input: bool

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape[1:], dtype=np.int64)) * self.dtype.itemsize


@dataclass
class Round:
    tensors: list[str]
    batch_size: int


def _subgraph_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Names read by nodes inside `node`'s subgraphs (outer-scope reads included, over-approximated)."""
    for graph in subgraphs(node):
        for inner in graph.node:
            yield from inner.input
            yield from _subgraph_reads(inner)


def node_reads(node: onnx.NodeProto) -> list[str]:
    return [*node.input, *_subgraph_reads(node)]


def producer_index(graph: onnx.GraphProto) -> dict[str, int]:
    """Each main-graph node output's producing node, by index."""
    return {output: index for index, node in enumerate(graph.node) for output in node.output if output}


def describe(model: onnx.ModelProto, names: list[str], sample_feed: Mapping[str, np.ndarray]) -> dict[str, TensorInfo]:
    """dtype and batch-1 shape of each name; refuses weights, unknown names and non-float tensors."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = {v.name for v in graph.input if v.name not in weights}
    _check_names(graph, names, weights, inputs)
    typed = with_fixed_inputs(_skeleton(model), {k: tuple(v.shape) for k, v in sample_feed.items()})
    values = {v.name: v for v in (*typed.graph.value_info, *typed.graph.output, *typed.graph.input)}
    infos: dict[str, TensorInfo] = {}
    probe: list[str] = []
    for name in names:
        info = _inferred(values[name], name in inputs) if name in values else None
        if info is None:
            probe.append(name)
        else:
            infos[name] = info
    infos.update(_probe(model, probe, sample_feed, inputs))
    for info in infos.values():
        _check_measurable(info)
    return {name: infos[name] for name in names}


def _check_names(graph: onnx.GraphProto, names: list[str], weights: set[str], inputs: set[str]) -> None:
    produced = producer_index(graph)
    for name in names:
        if name in weights:
            raise OptionError(f"'{name}' is a weight (initializer), not an activation")
        if name not in produced and name not in inputs:
            raise OptionError(f"no tensor named '{name}' in the model's main graph")


def _inferred(value: onnx.ValueInfoProto, is_input: bool) -> TensorInfo | None:
    """The tensor's dtype and fully static shape from shape inference, or None where inference left either open."""
    tensor_type = value.type.tensor_type
    if not tensor_type.elem_type or not tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor_type.shape.dim]
    if not dims or min(dims) <= 0:
        return None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return TensorInfo(value.name, dtype, tuple(dims), tensor_type.elem_type, is_input)


def _check_measurable(info: TensorInfo) -> None:
    """Statistics need a floating-point tensor with a batch axis and a channel axis."""
    if info.dtype.kind != "f":
        raise OptionError(f"tensor '{info.name}' is {info.dtype}; statistics need a floating-point tensor")
    if len(info.sample_shape) < 2:
        raise OptionError(f"tensor '{info.name}' has shape {list(info.sample_shape)}; "
                          "statistics need a batch axis and a channel axis")


def _skeleton(model: onnx.ModelProto, keep_elements: int = 1024) -> onnx.ModelProto:
    """The model with every large initializer turned into a typed graph input: shape inference needs
    their types and shapes, not their values (small ones, such as Reshape shapes or Resize scales, stay)."""
    graph = model.graph
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    skeleton.graph.name = graph.name
    skeleton.graph.node.extend(graph.node)
    skeleton.graph.input.extend(graph.input)
    skeleton.graph.output.extend(graph.output)
    skeleton.graph.sparse_initializer.extend(graph.sparse_initializer)
    listed = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= keep_elements:
            skeleton.graph.initializer.append(tensor)
        elif tensor.name not in listed:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


def _probe(model: onnx.ModelProto, names: list[str], sample_feed: Mapping[str, np.ndarray],
           inputs: set[str]) -> dict[str, TensorInfo]:
    """dtype and shape from one onnxruntime run on one sample, for what shape inference left open."""
    if not names:
        return {}
    values = {n: np.asarray(sample_feed[n]) for n in names if n in inputs}
    computed = [n for n in names if n not in inputs]
    if computed:
        session = make_session(exposing_model(model, computed, {}))
        wanted = {i.name for i in session.get_inputs()}
        values.update(zip(computed, session.run(computed, {k: v for k, v in sample_feed.items() if k in wanted}),
                          strict=True))
    return {name: TensorInfo(name, value.dtype, tuple(value.shape),
                             onnx.helper.np_dtype_to_tensor_dtype(value.dtype), name in inputs)
            for name, value in values.items()}


def exposing_model(model: onnx.ModelProto, names: list[str], elem_types: Mapping[str, int]) -> onnx.ModelProto:
    """The ancestor cone of `names` (node outputs of the main graph) with exactly `names` as outputs."""
    return part_model(model, _cone(model.graph, names),
                      [output_value(name, elem_types.get(name, 0)) for name in names])


def part_model(model: onnx.ModelProto, nodes: set[int], outputs: list[onnx.ValueInfoProto],
               extra_inputs: list[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """The main-graph `nodes` of `model` as a model: the graph inputs, `extra_inputs` (tensors given instead
    of computed) and weights they read, and `outputs`."""
    graph = model.graph
    read = {name for index in nodes for name in node_reads(graph.node[index])}
    part = onnx.GraphProto(name=graph.name)
    part.node.extend(graph.node[index] for index in sorted(nodes))
    part.initializer.extend(t for t in graph.initializer if t.name in read)
    part.sparse_initializer.extend(s for s in graph.sparse_initializer if s.values.name in read)
    part.input.extend(v for v in (*graph.input, *extra_inputs) if v.name in read)
    part.output.extend(outputs)
    exposed = onnx.ModelProto(ir_version=model.ir_version, producer_name="graphopt-calibration")
    exposed.opset_import.extend(model.opset_import)
    exposed.functions.extend(model.functions)
    exposed.graph.CopyFrom(part)
    return exposed


def _cone(graph: onnx.GraphProto, names: list[str]) -> set[int]:
    """Indices of the nodes that `names` depend on, reads from inside subgraphs included."""
    produced = producer_index(graph)
    kept: set[int] = set()
    pending = [produced[name] for name in names]
    while pending:
        index = pending.pop()
        if index in kept:
            continue
        kept.add(index)
        pending.extend(produced[read] for read in node_reads(graph.node[index]) if read in produced)
    return kept


def output_value(name: str, elem_type: int) -> onnx.ValueInfoProto:
    """A graph output typed `elem_type` (untyped where 0: onnxruntime then takes the type it computes)."""
    return onnx.helper.make_tensor_value_info(name, elem_type, None) if elem_type else onnx.ValueInfoProto(name=name)


def _digest(*parts: bytes | str) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()


def tensor_parts(tensor: onnx.TensorProto) -> tuple[bytes, ...]:
    """What a tensor's values are made of, without its name: (dtype and dims, data)."""
    if tensor.HasField("raw_data"):
        return b"%d:%r" % (tensor.data_type, tuple(tensor.dims)), tensor.raw_data
    unnamed = onnx.TensorProto()
    unnamed.CopyFrom(tensor)
    unnamed.name = ""
    return b"serialized", unnamed.SerializeToString()


def cone_fingerprints(model: onnx.ModelProto) -> dict[str, str]:
    """For every main-graph tensor, a digest of everything its values depend on (see module docstring)."""
    graph = model.graph
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    functions = {(f.domain, f.name): _digest(f.SerializeToString()) for f in model.functions}
    prints = {t.name: _digest("initializer", *tensor_parts(t)) for t in graph.initializer}
    prints.update({s.values.name: _digest("sparse", s.SerializeToString()) for s in graph.sparse_initializer})
    for value in graph.input:
        prints.setdefault(value.name, _digest("input", value.name))
    for node in graph.node:
        domain = node.domain or "ai.onnx"
        base = _digest("node", node.op_type, domain, str(opsets.get(domain, 0)),
                       functions.get((node.domain, node.op_type), ""),
                       *(attr.SerializeToString() for attr in node.attribute),
                       *(prints.get(name, "outer:" + name) if name else "absent" for name in node_reads(node)))
        for index, output in enumerate(node.output):
            if output:
                prints[output] = _digest(base, str(index))
    return prints


def round_bytes(group: list[TensorInfo], batch: int, workers: int = 1, batches: int = 1) -> int:
    """What a round holds at once: `batches` captured batches, and per worker one chunk of rows with its
    copy, its float64 conversion and the |x| and sign temporaries (at most 25 bytes per value; see stats.py)."""
    elements = max(info.sample_bytes // info.dtype.itemsize for info in group)
    chunks = min(workers, len(group))
    return batches * batch * sum(info.sample_bytes for info in group) \
        + 25 * chunks * min(CHUNK_ELEMENTS, batch * elements)


def plan_rounds(infos: list[TensorInfo], batch_size: int, budget: int, workers: int = 1) -> list[Round]:
    """Pack tensors (topological order) into rounds that fit `budget` bytes; see the module docstring."""
    groups: list[list[TensorInfo]] = []
    for info in infos:
        if groups and round_bytes([*groups[-1], info], batch_size, workers) <= budget:
            groups[-1].append(info)
        else:
            groups.append([info])
    rounds = []
    for group in groups:
        batch = max(1, min(batch_size, CAPTURE_BYTES // max(1, sum(info.sample_bytes for info in group))))
        while batch > 1 and round_bytes(group, batch, workers) > budget:
            batch = max(1, min(batch - 1, batch * budget // round_bytes(group, batch, workers)))
        if round_bytes(group, batch, workers) > budget:
            log.warning("tensor '%s' needs %d bytes for one sample, more than the calibration memory budget "
                        "(%d bytes); running it one sample at a time", group[0].name, round_bytes(group, 1), budget)
        rounds.append(Round([info.name for info in group], batch))
    return rounds


def linear_inputs(model: onnx.ModelProto) -> list[StatRequest]:
    """Requests (all kinds) for the activation input of every Conv, Gemm and MatMul with a constant weight.

    The channel axis is the one the weight contracts: 1 for Conv and Gemm (0 under transA), the last
    axis for MatMul.
    """
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    requests: dict[str, StatRequest] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        activation, weight = node.input[0], node.input[1]
        if weight not in constants or activation in constants or activation in requests:
            continue
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        axis = -1 if node.op_type == "MatMul" else (0 if trans_a else 1)
        requests[activation] = StatRequest(activation, KINDS, axis)
    return list(requests.values())


def request_for(model: onnx.ModelProto, name: str) -> StatRequest:
    """All kinds of `name`, over the last axis when a MatMul reads it (token features), else axis 1."""
    read_by_matmul = any(node.op_type == "MatMul" and name in node.input for node in model.graph.node)
    return StatRequest(name, KINDS, -1 if read_by_matmul else 1)


def tensor_batches(model: onnx.ModelProto, data: Any, names: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of `data` (a graphopt.calibration.data.Dataset), the values of `names`: graph inputs read
    from the batch itself, every other tensor computed by running only the cone that produces it."""
    graph_inputs = {v.name for v in model.graph.input}
    computed = [n for n in names if n not in graph_inputs]
    session, feeds = None, set()
    if computed:
        infos = describe(model, computed, next(iter(data.batches(1, trimmed=False))))
        session = make_session(exposing_model(model, computed, {n: infos[n].elem_type for n in computed}))
        feeds = {i.name for i in session.get_inputs()}
    for batch in data.batches(batch_size):
        values = dict(zip(computed, session.run(computed, {k: v for k, v in batch.items() if k in feeds}))) \
            if session is not None else {}
        values.update({n: np.asarray(batch[n]) for n in names if n in graph_inputs})
        yield values

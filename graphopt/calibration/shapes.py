"""Every tensor's concrete shape for one batch-1 sample, and the cost counted on those shapes.

ONNX shape inference runs first on a copy with the inputs fixed; shapes it leaves unknown (a Reshape whose
target is computed from `Shape` at run time, for instance) come from one onnxruntime run with those tensors
exposed as outputs, on the user's first calibration sample where there is one (an input such as a sample rate
can choose the branch an If runs, and zeros may choose one the data never takes), else on zeros. Inside
If/Loop/Scan bodies inference sees only what the bodies declare, so each body's declared inputs are pinned to
the shapes of the outer values they stand for (loop-carried values at their initial shape, scanned inputs
without the scanned axis) and inference runs again, once per nesting level; onnxruntime cannot expose body
tensors, so the If branches the same input takes are spliced into a copy of the main graph and run there; what
is still unshaped (a branch not taken, a Loop or Scan body) stays unknown. The MAC and parameter formulas live
in graphopt.analysis.macs, which reads shapes and never runs a model.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.analysis.macs import CostReport, bodies, cost_from_shapes, needed_shapes
from graphopt.calibration.session import observed_shapes, observed_values
from graphopt.ir.graph import infer_shapes, nested_graphs
from graphopt.ir.shapes import input_specs, tensor_shapes, with_fixed_inputs


def batch1_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                  wanted: set[str] | None = None,
                  sample: dict[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor (or of `wanted` at least) with the inputs at `input_shapes`, those inside
    control-flow bodies included where inference can reach them; `sample` (one calibration sample) is what
    a run to observe them is fed where its shapes are `input_shapes`."""
    fixed = with_fixed_inputs(model, input_shapes)
    shapes = tensor_shapes(fixed)
    produced = {name for node in fixed.graph.node for name in node.output if name}
    missing = sorted((produced if wanted is None else wanted & produced) - set(shapes))
    if missing:
        shapes.update(_observed(model, input_shapes, missing, sample))
    if any(bodies(node) for node in fixed.graph.node):
        shapes.update(_body_shapes(fixed, shapes))
        inner = _body_outputs(fixed.graph)
        unknown = sorted((inner if wanted is None else wanted & inner) - set(shapes))
        if unknown:
            shapes.update(_taken_branch_shapes(model, _feed(model, input_shapes, sample), unknown))
    return shapes


def _feed(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
          sample: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """`sample` where its shapes are `input_shapes`, else zeros of those shapes."""
    specs = input_specs(model)
    if sample is not None and all(s.name in sample and np.shape(sample[s.name]) == tuple(input_shapes[s.name])
                                  for s in specs):
        return {s.name: sample[s.name] for s in specs}
    return {s.name: np.zeros(input_shapes[s.name], dtype=s.dtype) for s in specs}


def _observed(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], missing: list[str],
              sample: dict[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of `missing` from one run on `sample` where its shapes are `input_shapes`, else on zeros,
    or, where an op refuses zeros (onnxruntime's GroupQueryAttention reads an all-zero attention mask as no
    token at all), on ones in the integer and boolean inputs (every token counts, token id 1)."""
    specs = input_specs(model)
    feed = _feed(model, input_shapes, sample)
    try:
        return observed_shapes(model, feed, missing)
    except Exception:  # noqa: BLE001 - retried once on ones; a second failure is raised
        ones = {s.name: np.ones(input_shapes[s.name], dtype=s.dtype) for s in specs if s.dtype.kind in "iub"}
        if not ones:
            raise
        return observed_shapes(model, {**feed, **ones}, missing)


def _body_outputs(graph: onnx.GraphProto) -> set[str]:
    """Names the nodes of every body of `graph` write, nested ones included."""
    return {name for body in nested_graphs(graph) if body is not graph for node in body.node
            for name in node.output if name}


def _taken_branch_shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray],
                         names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of body tensors `names` in the If branches `feed` takes, which onnxruntime cannot expose: each If
    of the main graph is replaced by the branch its condition picks (one run per nesting level reads the
    conditions), then the flattened copy runs once with the names it holds exposed. Tensors of branches not
    taken, and of Loop and Scan bodies, stay unknown; so does everything where a run fails."""
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    del flat.graph.value_info[:]
    try:
        for _ in range(_MAX_NESTING):
            branching = {index: node.input[0] for index, node in enumerate(flat.graph.node) if node.op_type == "If"}
            if not branching:
                break
            conditions = observed_values(flat, feed, sorted(set(branching.values())))
            _splice(flat.graph, {index: bool(np.all(conditions[name])) for index, name in branching.items()})
        present = {name for node in flat.graph.node for name in node.output}
        held = [name for name in names if name in present]
        return observed_shapes(flat, feed, held) if held else {}
    except Exception:  # noqa: BLE001 - shapes are best effort: what no run gives stays unknown
        return {}


_MAX_NESTING = 8


def _splice(graph: onnx.GraphProto, taken: dict[int, bool]) -> None:
    """Replace each If node of `graph` in `taken` (by position: its condition's value) by the nodes of that
    branch, its initializers moved into `graph`, and an Identity from each branch output to the If's output."""
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if index not in taken:
            nodes.append(node)
            continue
        branch = bodies(node)["then_branch" if taken[index] else "else_branch"]
        nodes.extend(branch.node)
        graph.initializer.extend(branch.initializer)
        nodes.extend(onnx.helper.make_node("Identity", [inner.name], [outer])
                     for inner, outer in zip(branch.output, node.output) if outer)
    copied = [onnx.NodeProto() for _ in nodes]
    for target, node in zip(copied, nodes):
        target.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copied)


def _static(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in tensor_type.shape.dim)
    return dims if all(d > 0 for d in dims) else None


def _inner_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Static shapes declared or inferred inside every body of `graph`, nested ones included."""
    found: dict[str, tuple[int, ...]] = {}
    for node in graph.node:
        for body in bodies(node).values():
            for value in (*body.input, *body.value_info, *body.output):
                shape = _static(value)
                if shape is not None:
                    found[value.name] = shape
            found.update({t.name: tuple(t.dims) for t in body.initializer})
            found.update(_inner_shapes(body))
    return found


def _outer_shapes(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, ...] | None]:
    """For each declared input of `node`'s body (Loop, Scan), the shape of the outer value it stands for."""
    if node.op_type == "Loop":
        return [(), (), *(shapes.get(name) for name in node.input[2:])]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    scanned = int(attrs.get("num_scan_inputs", 0))
    states = [shapes.get(name) for name in node.input[:len(node.input) - scanned]]
    axes = list(attrs.get("scan_input_axes", [0] * scanned))
    sliced = []
    for name, axis in zip(node.input[len(node.input) - scanned:], axes):
        shape = shapes.get(name)
        sliced.append(None if not shape else shape[:axis % len(shape)] + shape[axis % len(shape) + 1:])
    return [*states, *sliced]


def _pin(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> bool:
    """Set `value`'s unknown dims from `shape`; whether anything changed (known dims are never touched)."""
    tensor_type = value.type.tensor_type
    dims = tensor_type.shape.dim
    if (tensor_type.HasField("shape") and len(dims) != len(shape)) or any(size <= 0 for size in shape):
        return False
    if not tensor_type.HasField("shape"):
        tensor_type.shape.SetInParent()
        dims.extend(onnx.TensorShapeProto.Dimension() for _ in shape)
    changed = False
    for dim, size in zip(dims, shape):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            dim.Clear()
            dim.dim_value = size
            changed = True
    return changed


def _pin_body_inputs(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]], scan: bool) -> bool:
    changed = False
    for node in graph.node:
        for body in bodies(node).values():
            if node.op_type == "Loop" or (node.op_type == "Scan" and scan):
                for value, shape in zip(body.input, _outer_shapes(node, shapes)):
                    if shape is not None and value.type.HasField("tensor_type"):
                        changed = _pin(value, shape) or changed
            changed = _pin_body_inputs(body, shapes, scan) or changed
    return changed


def _body_shapes(fixed: onnx.ModelProto, known: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes inside control-flow bodies; `fixed` (a weightless copy) has its body inputs pinned."""
    scan = next((o.version for o in fixed.opset_import if o.domain in ("", "ai.onnx")), 0) >= 9
    shapes = {**known, **_inner_shapes(fixed.graph)}
    while _pin_body_inputs(fixed.graph, shapes, scan):  # each round reaches one nesting level deeper
        fixed = infer_shapes(fixed)
        shapes.update(_inner_shapes(fixed.graph))
    return shapes


def count_cost(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
               shapes: dict[str, tuple[int, ...]] | None = None,
               sample: dict[str, np.ndarray] | None = None) -> CostReport:
    """MACs and parameters per sample (graphopt.analysis.macs says what is counted); `shapes` (tensor
    shapes at `input_shapes`) saves a shape inference when known; `sample` as for `batch1_shapes`."""
    if shapes is None:
        shapes = batch1_shapes(model, input_shapes, needed_shapes(model, input_shapes), sample)
    return cost_from_shapes(model, shapes)

"""Numerical evaluation of small regions of standard ops, for recognising decomposed activations
(graphopt.passes.channels.function_patterns).

`region` collects the nodes between anchor tensors and a source (only elementwise ops, Slice/Split and
reductions, constants read from the graph, at most MAX_REGION nodes); `evaluate` runs them in float64 on
probe inputs; `probe` makes seeded inputs whose norms span 1e-4..1e2 and whose subspace ratios span (0, 1).
Evaluation declines (None) anything it cannot compute exactly as onnxruntime would.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir

_ELEMENTWISE = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide, "Pow": np.power,
                "Max": np.maximum, "Min": np.minimum}
_UNARY = {"Sqrt": np.sqrt, "Reciprocal": lambda v: 1.0 / v, "Neg": np.negative, "Exp": np.exp, "Abs": np.abs,
          "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)), "Identity": lambda v: v, "Cast": lambda v: v}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL2"}
_ALLOWED = set(_ELEMENTWISE) | set(_UNARY) | _REDUCE | {"Slice", "Split"}
MAX_REGION = 64
MAX_PROBE_RANK = 8  # the 192 probe rows tile two positions on up to 6 non-batch, non-channel axes
TOLERANCE = 1e-7


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    source = ir.producer(tensor)
    if source is not None and source.op == "Constant" and "value" in source.attrs:
        return np.asarray(source.attrs["value"].values)
    return None


def region(targets: list[gs.Tensor], source: gs.Tensor) -> list[gs.Node] | None:
    """Nodes computing `targets` from `source` and constants only, in topological order; None if the
    targets read anything else or use an op outside the evaluator's set."""
    found: dict[int, gs.Node] = {}
    order: list[gs.Node] = []
    stack = [t for t in targets if t is not source]
    visiting: set[int] = set()

    def visit(tensor: gs.Tensor) -> bool:
        if tensor is source or constant_value(tensor) is not None or not tensor.name:
            return True
        node = ir.producer(tensor)
        if node is None or node.op not in _ALLOWED or node.op == "Constant":
            return False
        if id(node) in found:
            return True
        if id(node) in visiting or len(found) >= MAX_REGION:
            return False
        visiting.add(id(node))
        if not all(visit(t) for t in node.inputs):
            return False
        found[id(node)] = node
        order.append(node)
        return True

    return order if all(visit(t) for t in stack) else None


def _reduce(node: gs.Node, values: np.ndarray, axes_input: np.ndarray | None) -> np.ndarray:
    axes = node.attrs.get("axes")
    axes = tuple(int(a) for a in (axes if axes is not None else (axes_input if axes_input is not None else [])))
    axes = axes or tuple(range(values.ndim))
    keep = bool(node.attrs.get("keepdims", 1))
    if node.op == "ReduceSum":
        return values.sum(axis=axes, keepdims=keep)
    if node.op == "ReduceMean":
        return values.mean(axis=axes, keepdims=keep)
    squares = (values * values).sum(axis=axes, keepdims=keep)
    return squares if node.op == "ReduceSumSquare" else np.sqrt(squares)


def _slice(values: np.ndarray, bounds: list[np.ndarray | None]) -> np.ndarray:
    starts, ends = bounds[0], bounds[1]
    axes = bounds[2] if len(bounds) > 2 and bounds[2] is not None else np.arange(starts.size)
    steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else np.ones(starts.size, dtype=np.int64)
    index = [slice(None)] * values.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(min(end, np.iinfo(np.int64).max // 2)), int(step))
    return values[tuple(index)]


def evaluate(nodes: list[gs.Node], source: gs.Tensor, probe: np.ndarray) -> dict[str, np.ndarray] | None:
    """Values of every tensor of `nodes` in float64 with `source` = `probe`; None on an unsupported form."""
    values: dict[str, np.ndarray] = {source.name: probe}
    with np.errstate(all="ignore"):
        for node in nodes:
            outputs = _apply(node, [_read(values, t) for t in node.inputs])
            if outputs is None:
                return None
            for tensor, value in zip(node.outputs, outputs):
                value = np.asarray(value)
                values[tensor.name] = np.asarray(value, dtype=np.float64) if value.dtype.kind == "f" else value
    return values


def _read(values: dict[str, np.ndarray], tensor: gs.Tensor) -> np.ndarray | None:
    """A computed value, else a constant (floats in float64), else None."""
    if not tensor.name:
        return None
    if tensor.name in values:
        return values[tensor.name]
    constant = constant_value(tensor)
    return None if constant is None else constant.astype(np.float64) if constant.dtype.kind == "f" else constant


def _apply(node: gs.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """The node's output values from its input values; None where an input it needs is unknown."""
    if inputs[0] is None or (node.op in _ELEMENTWISE and inputs[1] is None):
        return None
    if node.op in _ELEMENTWISE:
        return [_ELEMENTWISE[node.op](inputs[0], inputs[1])]
    if node.op in _UNARY:
        return [_UNARY[node.op](inputs[0])]
    if node.op in _REDUCE:
        return [_reduce(node, inputs[0], inputs[1] if len(inputs) > 1 else None)]
    if node.op == "Slice":
        return None if any(v is None for v in inputs[1:3]) else [_slice(inputs[0], inputs[1:])]
    return _split(node, inputs[0], inputs[1] if len(inputs) > 1 else None)


def _split(node: gs.Node, values: np.ndarray, sizes_input: np.ndarray | None) -> list[np.ndarray]:
    axis = int(node.attrs.get("axis", 0))
    sizes = sizes_input if sizes_input is not None else node.attrs.get("split")
    if sizes is None:
        return np.array_split(values, len(node.outputs), axis=axis)
    return np.split(values, np.cumsum(np.asarray(sizes))[:-1], axis=axis)


def eps_candidates(nodes: list[gs.Node]) -> list[float]:
    found = {0.0}
    for node in nodes:
        if node.op in ("Add", "Max"):
            for tensor in node.inputs:
                constant = constant_value(tensor)
                if constant is not None and constant.size == 1 and constant.dtype.kind == "f":
                    found.add(float(constant.reshape(-1)[0]))
    return sorted(v for v in found if 0.0 <= v < 1e-1)


def probe_rows(channels: int, rank: int, split: int | None, seed: int = 0) -> np.ndarray:
    """Seeded inputs [P, C, 1, ...]: norms log-uniform in 1e-4..1e2, subspace ratios spanning (0, 1)."""
    rng = np.random.default_rng(seed)
    count = 192
    rows = rng.standard_normal((count, channels))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    if split is not None and 0 < split < channels:
        angle = rng.uniform(0.02, np.pi / 2 - 0.02, count)
        u = rows[:, :split] / np.linalg.norm(rows[:, :split], axis=1, keepdims=True)
        v = rows[:, split:] / np.linalg.norm(rows[:, split:], axis=1, keepdims=True)
        rows = np.concatenate([u * np.cos(angle)[:, None], v * np.sin(angle)[:, None]], axis=1)
    rows *= 10.0 ** rng.uniform(-4, 2, count)[:, None]
    return rows.reshape(count, channels, *([1] * (rank - 2)))

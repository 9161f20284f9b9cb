"""ExPrune on linear+ReLU layers: matching and calibration scoring (graphopt.ops.exprune).

Matches Gemm (transA = 0, constant B, optional constant C broadcast to [n]) and MatMul (constant [d, n]
weight, optional Add of a constant [n] bias) whose only reader is a Relu, in float32.

`LinearScoring` prepares one layer for one probe length from sampled input rows (rows x d):
- probe order: input dims ranked by E[x_i²] · ||W[:, i]||² (the expected energy of term i), largest
  first; W's columns are permuted into that order, the op gathers X by it;
- m = round(probe · d), 1 <= m < d; checkpoints [m] (threshold rule) or m, 2m, 4m, ... (sequential);
- the scores of every row at every checkpoint, from which `calibrate(fnr)` sets the thresholds
  (graphopt.passes.exprune.calib) at any false-negative rate without recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.ops.exprune import NAME, boundary_factors, checkpoint_scores, doubling_checkpoints
from graphopt.passes.exprune.timing import TIMING_ROWS
from graphopt.passes.exprune.calib import (Calibrated, ChainLayer, Curve, outcome, probe_length, swap_in,
                                           weight_refusal)


@dataclass
class LinearLayer(ChainLayer):
    """Gemm/MatMul(+Add)+Relu; `weight` is [n, d], neuron-major."""

    @property
    def terms(self) -> int:
        """Input size d: the exchangeable terms of one neuron."""
        return self.weight.shape[1]

    def rows_per_call(self) -> int | None:
        """The fewest rows a call sends through the layer: its leading dimensions (a symbolic batch axis at 1, a
        static one as it is, positions or tokens), None when another dimension is symbolic."""
        shape = list(self.source.shape or [])
        lead = shape[:-1]
        if lead and not isinstance(lead[0], int):
            lead[0] = 1
        return int(np.prod(lead)) if all(isinstance(s, int) for s in lead) else None

    def macs_per_sample(self) -> float:
        shape = self.source.shape or []
        positions = np.prod([s for s in shape[1:-1] if isinstance(s, int)]) if len(shape) > 2 else 1
        return float(self.weight.size * positions)


def _vector(values: np.ndarray | None, n: int) -> np.ndarray | None:
    """`values` broadcast to [n] (a per-neuron bias), or None when it is not one."""
    if values is None or values.size not in (1, n) or (values.ndim and values.shape[-1] not in (1, n)):
        return None
    return np.broadcast_to(values.reshape(-1), (n,)).astype(np.float32)


def _linear(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(weight [n, d], bias [n]) of a Gemm/MatMul with a constant weight, or why not."""
    weight = ir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return weight_refusal(node.inputs[1], "weight is not a constant matrix")
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} (the op is float32)"
    inputs_axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
    if weight.shape[inputs_axis] < 2:
        return "fewer than 2 inputs: nothing to probe"
    if node.op == "MatMul":
        return np.ascontiguousarray(weight.T), np.zeros(weight.shape[1], dtype=np.float32)
    if node.attrs.get("transA", 0):
        return "Gemm with transA"
    neuron_major = weight if node.attrs.get("transB", 0) else weight.T
    neuron_major = (neuron_major * np.float32(node.attrs.get("alpha", 1.0))).astype(np.float32)
    n = neuron_major.shape[0]
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return np.ascontiguousarray(neuron_major), np.zeros(n, dtype=np.float32)
    bias = _vector(ir.constant_array(node.inputs[2]), n)
    if bias is None:
        return "Gemm bias is not a constant per-neuron vector"
    return np.ascontiguousarray(neuron_major), bias * np.float32(node.attrs.get("beta", 1.0))


def match_linear(graph: gs.Graph, node: gs.Node) -> LinearLayer | str:
    found = _linear(node)
    if isinstance(found, str):
        return found
    weight, bias = found
    nodes, tail = [node], node.outputs[0]
    reader = ir.only_reader(graph, tail)
    if node.op == "MatMul" and reader is not None and reader.op == "Add":
        other = next((t for t in reader.inputs if t is not tail), None)
        added = _vector(ir.constant_array(other), weight.shape[0]) if other is not None else None
        if added is None:
            return "Add after MatMul is not a constant per-neuron bias"
        bias = bias + added
        nodes.append(reader)
        tail = reader.outputs[0]
        reader = ir.only_reader(graph, tail)
    if reader is None or reader.op != "Relu":
        return "output is not read by a Relu alone"
    nodes.append(reader)
    return LinearLayer(nodes, node.inputs[0], reader.outputs[0], weight, bias)


class LinearScoring:
    """Scores of sampled rows (rows x d) for one layer, one probe length and one rule."""

    def __init__(self, rows: np.ndarray, layer: LinearLayer, probe: float, rule: str) -> None:
        weight = layer.weight.astype(np.float64)
        d = layer.terms
        energy = np.mean(rows * rows, axis=0) * np.sum(weight ** 2, axis=0)
        self.layer, self.rule = layer, rule
        self.perm = np.argsort(-energy, kind="stable").astype(np.int64)
        self.m = probe_length(probe, d)
        self.checkpoints = [self.m] if rule == "threshold" else doubling_checkpoints(d, self.m)
        self.factors = boundary_factors(d, self.checkpoints)
        self.scores = self.score(rows)
        self.positive = (rows @ weight.T + layer.bias) > 0
        self.macs_per_sample = layer.macs_per_sample()
        self.sample = np.asarray(rows[:TIMING_ROWS], dtype=np.float32)  # to time the layer on

    def score(self, rows: np.ndarray) -> np.ndarray:
        return checkpoint_scores(rows[:, self.perm], self.layer.weight[:, self.perm], self.layer.bias,
                                 self.checkpoints)

    @cached_property
    def curve(self) -> Curve:
        return Curve(self.scores, self.factors, self.positive, self.layer.terms, self.checkpoints, self.perm, self.m)

    def calibrate(self, fnr: float) -> Calibrated:
        return self.curve(fnr)

    def measure(self, rows: np.ndarray, tau: np.ndarray) -> tuple[float, float, float]:
        """(skip rate, false-negative rate, MACs skipped) of thresholds `tau` on other rows."""
        positive = (rows @ self.layer.weight.T.astype(np.float64) + self.layer.bias) > 0
        return outcome(self.score(rows), self.factors, tau, positive, self.layer.terms, self.checkpoints)


def replace_linear(graph: gs.Graph, layer: LinearLayer, found: Calibrated, rule: str) -> gs.Node:
    return swap_in(graph, layer, found, NAME, {"m": found.m, "rule": rule, "checkpoints": list(found.checkpoints)})

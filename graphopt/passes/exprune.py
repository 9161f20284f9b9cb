"""ExPrune: per-input dynamic neuron pruning of linear+ReLU layers (graphopt.ops.exprune).

Matches Gemm (transA = 0, constant B, optional constant C broadcast to [n]) and MatMul (constant [d, n]
weight, optional Add of a constant [n] bias) whose only reader is a Relu, in float32. Per layer:

- probe order: input dims ranked by E[x_i²] · ||W[:, i]||² on sampled calibration rows (the expected
  energy of term i), largest first; W's columns are permuted into that order, the op gathers X by it;
- m = round(exprune_probe · d) (at least 1);
- thresholds: on the sampled rows, neuron j's truly positive rows (pre-activation > 0) have scores
  s = partial · d/m + b_j; τ_j is the (k+1)-th smallest of them with k = floor(exprune_fnr · #positive),
  so at most a fraction exprune_fnr of the positive rows is predicted negative (the false-negative rate
  on calibration data, measured and reported); τ_j sits 1e-4 · max|s| below that score, so that float32
  rounding of the partial sum by another summation order cannot skip the row it was chosen to keep. A neuron never positive there gets τ_j = max s, so
  new inputs that score above everything seen are still computed.

Approximate: an output differs from ReLU(Wx + b) only where a positive neuron was predicted negative,
and then by exactly its value. Layers are calibrated on the original model's activations (not
sequentially). Calibration memory is bounded by `exprune_rows` rows per layer input
(graphopt.calibration.sample). Reports per layer m, the skip rate and the fraction of the layer's MACs
skipped on the sampled rows, i.e. skip · (d − m) / d.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import DataError, OptionError
from graphopt.ir import graph as ir
from graphopt.ops.exprune import MIN_OPSET, NAME, build_exprune_function, probe_scale
from graphopt.ops.functions import DOMAIN
from graphopt.passes.base import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@dataclass
class Layer:
    """One linear+ReLU chain: `nodes` are replaced by one op reading `source`, writing `output`."""

    nodes: list[gs.Node]
    source: gs.Tensor
    output: gs.Tensor
    weight: np.ndarray  # [n, d], neuron-major, float32
    bias: np.ndarray  # [n], float32

    @property
    def name(self) -> str:
        return self.nodes[0].name


def _only_reader(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    readers = ir.consumers(tensor)
    return readers[0] if len(readers) == 1 and not ir.is_graph_io(graph, tensor) else None


def _vector(values: np.ndarray | None, n: int) -> np.ndarray | None:
    """`values` broadcast to [n] (a per-neuron bias), or None when it is not one."""
    if values is None or values.size not in (1, n) or (values.ndim and values.shape[-1] not in (1, n)):
        return None
    return np.broadcast_to(values.reshape(-1), (n,)).astype(np.float32)


def _linear(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(weight [n, d], bias [n]) of a Gemm/MatMul with a constant weight, or why not."""
    weight = ir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return "weight is not a constant matrix"
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} (the op is float32)"
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


def _match(graph: gs.Graph, node: gs.Node) -> Layer | str:
    found = _linear(node)
    if isinstance(found, str):
        return found
    weight, bias = found
    nodes, tail = [node], node.outputs[0]
    reader = _only_reader(graph, tail)
    if node.op == "MatMul" and reader is not None and reader.op == "Add":
        other = next((t for t in reader.inputs if t is not tail), None)
        added = _vector(ir.constant_array(other), weight.shape[0]) if other is not None else None
        if added is None:
            return "Add after MatMul is not a constant per-neuron bias"
        bias = bias + added
        nodes.append(reader)
        tail = reader.outputs[0]
        reader = _only_reader(graph, tail)
    if reader is None or reader.op != "Relu":
        return "output is not read by a Relu alone"
    nodes.append(reader)
    return Layer(nodes, node.inputs[0], reader.outputs[0], weight, bias)


@dataclass
class Calibrated:
    perm: np.ndarray
    m: int
    tau: np.ndarray
    skip_rate: float
    fnr: float
    macs_skipped: float  # fraction of the layer's MACs


def calibrate_layer(rows: np.ndarray, weight: np.ndarray, bias: np.ndarray, probe: float, fnr: float) -> Calibrated:
    """Probe order, m and thresholds for one layer from sampled input rows (rows x d)."""
    n, d = weight.shape
    energy = np.mean(rows * rows, axis=0) * np.sum(weight.astype(np.float64) ** 2, axis=0)
    perm = np.argsort(-energy, kind="stable").astype(np.int64)
    m = int(min(d, max(1, round(probe * d))))
    permuted, w = rows[:, perm], weight[:, perm].astype(np.float64)
    partial = (permuted[:, :m] @ w[:, :m].T).astype(np.float32)
    score = partial * probe_scale(d, m) + bias
    positive = (rows @ weight.T.astype(np.float64) + bias) > 0
    tau = np.empty(n, dtype=np.float32)
    for j in range(n):
        scores = np.sort(score[positive[:, j], j])
        if scores.size == 0:
            tau[j] = score[:, j].max() if score.shape[0] else -np.inf
        else:  # a margin below the score kept, so onnxruntime's rounding of the partial sum cannot skip it
            kept = scores[int(np.floor(fnr * scores.size))]
            tau[j] = kept - 1e-4 * max(abs(float(kept)), float(np.abs(scores).max()), 1e-30)
    skipped = score < tau
    false_negatives = int(np.sum(skipped & positive))
    skip_rate = float(skipped.mean()) if skipped.size else 0.0
    return Calibrated(perm, m, tau, skip_rate, false_negatives / max(1, int(positive.sum())),
                      skip_rate * (d - m) / d)


def _replace(graph: gs.Graph, layer: Layer, found: Calibrated) -> None:
    base = layer.name or "exprune"
    constants = [gs.Constant(ir.unique_name(graph, f"{base}_{suffix}"), np.ascontiguousarray(values))
                 for suffix, values in (("w", layer.weight[:, found.perm]), ("b", layer.bias),
                                        ("tau", found.tau), ("perm", found.perm))]
    for node in layer.nodes:
        ir.detach(node)
    graph.nodes.append(gs.Node(NAME, ir.unique_name(graph, f"{base}_exprune"),
                               attrs={"m": found.m, "rule": "threshold", "checkpoints": [found.m]},
                               inputs=[layer.source, *constants], outputs=[layer.output], domain=DOMAIN))


@register
class ExPrune(Pass):
    name = "exprune"
    kind = "method"
    description = "ExPrune: linear+ReLU neurons predicted negative from a calibrated partial sum are skipped"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        probe, fnr = float(ctx.option("exprune_probe", 0.25)), float(ctx.option("exprune_fnr", 0.01))
        if not 0.0 < probe <= 1.0:
            raise OptionError(f"--exprune-probe must be in (0, 1], got {probe}")
        if not 0.0 <= fnr < 1.0:
            raise OptionError(f"--exprune-fnr must be in [0, 1), got {fnr}")
        result = PassResult(modified=False)
        layers = []
        for node in list(graph.nodes):
            if node.op in ("Gemm", "MatMul"):
                found = _match(graph, node)
                if isinstance(found, str):
                    result.skipped.append(f"{node.name}: {found}")
                else:
                    layers.append(found)
        if layers and graph.opset < MIN_OPSET:
            result.skipped.extend(f"{layer.name}: model opset {graph.opset} < {MIN_OPSET}" for layer in layers)
            layers = []
        if not layers:
            return result
        if ctx.data is None:
            raise DataError("--method exprune calibrates thresholds on data: give --calib DATA.npz")
        from graphopt.calibration.sample import sample_rows

        samples = sample_rows(ir.export_model(graph, ctx.template), ctx.data,
                              {layer.source.name: -1 for layer in layers},
                              max_rows=int(ctx.option("exprune_rows", 4096)),
                              batch_size=int(ctx.option("batch_size", 32)), seed=int(ctx.option("seed", 0)))
        total_macs = skipped_macs = 0.0
        for layer in layers:
            found = calibrate_layer(samples[layer.source.name], layer.weight, layer.bias, probe, fnr)
            _replace(graph, layer, found)
            macs = float(layer.weight.size)
            total_macs, skipped_macs = total_macs + macs, skipped_macs + macs * found.macs_skipped
            result.stats.update({f"{layer.name}.m": found.m, f"{layer.name}.skip_rate": found.skip_rate,
                                 f"{layer.name}.fnr": found.fnr, f"{layer.name}.macs_skipped": found.macs_skipped})
            log.info("exprune %s: m=%d/%d skip %.1f%% fnr %.3f, %.1f%% of its MACs skipped", layer.name, found.m,
                     layer.weight.shape[1], 100 * found.skip_rate, found.fnr, 100 * found.macs_skipped)
        ir.add_function(graph, build_exprune_function(graph.opset))
        ir.cleanup(graph)
        result.modified = True
        result.stats.update({"layers": len(layers), "macs_skipped_fraction": skipped_macs / total_macs})
        return result

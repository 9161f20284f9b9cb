"""What the ExPrune linear and convolution layers share: the layer record and its replacement by an op
(`ChainLayer`, `swap_in`), and per-neuron thresholds from calibration scores.

For one layer, `scores` [r, n, c] holds score_jk (graphopt.ops.exprune) of every sampled row (an input
row of a linear layer, an output position of a convolution) at every checkpoint k, and `positive`
[r, n] whether the full pre-activation is > 0. A row is skipped iff score_jk < Tau_j · f_k at some k;
f_k > 0, so that is min_k score_jk / f_k < Tau_j: the thresholds are order statistics of that ratio.

- τ_j is the (q+1)-th smallest ratio over neuron j's positive rows, q = floor(fnr · #positive), so at
  most a fraction fnr of them is predicted negative (the false-negative rate on the sampled rows);
  τ_j sits 1e-4 · max|ratio| below it so that float32 rounding of the partial sums in another
  summation order (onnxruntime, the native kernel) cannot skip the row it was chosen to keep;
- a neuron never positive on the sample gets τ_j = the largest ratio seen (only as confident as the
  calibration data allows: a new input scoring above everything seen is still computed);
- the work saved by a skipped row is the terms after the first checkpoint that fires: (d − k) / d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir

MARGIN = 1e-4


def weight_refusal(tensor: gs.Tensor, plain: str) -> str:
    """Why a layer whose weight `tensor` is not a constant of the right rank is not replaced: `plain`, or for the
    DequantizeLinear of a QDQ model's integers, that the ops compute in float32."""
    producer = ir.producer(tensor)
    if producer is not None and producer.op == "DequantizeLinear":
        return "weight is quantized (QDQ): the ExPrune ops compute in float32; run exprune before quantizing"
    return plain


@dataclass
class ChainLayer:
    """A linear or convolution layer followed by its Relu: `nodes` are replaced by one ExPrune op reading
    `source` and writing `output`."""

    nodes: list[gs.Node]
    source: gs.Tensor
    output: gs.Tensor
    weight: np.ndarray  # float32, output units first
    bias: np.ndarray  # [units], float32

    @property
    def name(self) -> str:
        return self.nodes[0].name


def layer_arrays(layer: ChainLayer, found: Calibrated) -> dict[str, np.ndarray]:
    """The op's constant inputs after x, in order: W permuted on its input axis 1, B, Tau, Perm."""
    return {"W": layer.weight[:, found.perm], "B": layer.bias, "Tau": found.tau, "Perm": found.perm}


def swap_in(graph: gs.Graph, layer: ChainLayer, found: Calibrated, op: str, attrs: dict) -> gs.Node:
    """Replace the layer's nodes by one graphopt `op` node reading [source, W permuted on its input axis 1,
    B, Tau, Perm] with `attrs` (new initializers named after the layer)."""
    from graphopt.ops.functions import DOMAIN

    base = layer.name or "exprune"
    constants = [gs.Constant(ir.unique_name(graph, f"{base}_{name.lower()}"), np.ascontiguousarray(values))
                 for name, values in layer_arrays(layer, found).items()]
    for node in layer.nodes:
        ir.detach(node)
    node = gs.Node(op, ir.unique_name(graph, f"{base}_exprune"), attrs=attrs, inputs=[layer.source, *constants],
                   outputs=[layer.output], domain=DOMAIN)
    graph.nodes.append(node)
    return node


@dataclass
class Calibrated:
    perm: np.ndarray
    m: int
    checkpoints: list[int]
    tau: np.ndarray
    skip_rate: float      # fraction of (row, neuron) pairs predicted negative
    fnr: float            # fraction of positive (row, neuron) pairs predicted negative
    macs_skipped: float   # fraction of the layer's MACs not computed

    @property
    def rule(self) -> str:
        """The op's rule: a sequential rule with one checkpoint decides as the threshold rule does."""
        return "threshold" if len(self.checkpoints) == 1 else "sequential"


def probe_length(probe: float, d: int) -> int:
    """m = round(probe · d), clamped to [1, d − 1]."""
    return int(min(d - 1, max(1, round(probe * d))))


def ratios(scores: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """min_k score_jk / f_k: [r, n]."""
    return np.min(scores / factors.astype(np.float32), axis=-1)


class Thresholds:
    """τ [n] (float32) from the ratios [r, n] and positive mask [r, n], as the module docstring says, at any
    false-negative rate: each neuron's positive ratios are sorted once (a layer's search asks for many rates)."""

    def __init__(self, ratio: np.ndarray, positive: np.ndarray) -> None:
        self.kept = [np.sort(ratio[positive[:, j], j]) for j in range(ratio.shape[1])]
        self.unseen = [float(ratio[:, j].max()) if ratio.shape[0] else -np.inf for j in range(ratio.shape[1])]
        self.scale = [max(float(np.abs(kept).max()), 1e-30) if kept.size else 0.0 for kept in self.kept]

    def __call__(self, fnr: float) -> np.ndarray:
        tau = np.empty(len(self.kept), dtype=np.float32)
        for j, kept_scores in enumerate(self.kept):
            if kept_scores.size == 0:
                tau[j] = self.unseen[j]
                continue
            kept = kept_scores[int(np.floor(fnr * kept_scores.size))]
            tau[j] = kept - MARGIN * self.scale[j]  # |kept| is at most the largest |ratio| kept
        return tau


class Curve:
    """A layer's calibration at any false-negative rate from its scores [r, n, c] (module docstring),
    computed once per rate asked: the thresholds and what they skip on these rows."""

    def __init__(self, scores: np.ndarray, factors: np.ndarray, positive: np.ndarray, d: int,
                 checkpoints: list[int], perm: np.ndarray, m: int) -> None:
        self.scores, self.factors, self.positive, self.d = scores, factors, positive, d
        self.checkpoints, self.perm, self.m = checkpoints, perm, m
        self.thresholds = Thresholds(ratios(scores, factors), positive)
        self.found: dict[float, Calibrated] = {}

    def __call__(self, fnr: float) -> Calibrated:
        if fnr not in self.found:
            tau = self.thresholds(fnr)
            skip, false_negative, saved = outcome(self.scores, self.factors, tau, self.positive, self.d,
                                                  self.checkpoints)
            self.found[fnr] = Calibrated(self.perm, self.m, self.checkpoints, tau, skip, false_negative, saved)
        return self.found[fnr]


def outcome(scores: np.ndarray, factors: np.ndarray, tau: np.ndarray, positive: np.ndarray, d: int,
            checkpoints: list[int]) -> tuple[float, float, float]:
    """(skip rate, false-negative rate, fraction of MACs skipped) of thresholds `tau` on these rows.

    Checkpoint by checkpoint: a (row, neuron) pair that fires first at checkpoint k saves (d - k) / d."""
    bounds = tau[:, None] * factors[None, :]                            # [n, c]
    skipped = np.zeros(scores.shape[:2], dtype=bool)
    saved = 0.0
    for index, k in enumerate(checkpoints):
        fires = scores[:, :, index] < bounds[:, index]
        saved += np.count_nonzero(fires & ~skipped) * (d - k) / d
        skipped |= fires
    positives = int(positive.sum())
    return (float(skipped.mean()) if skipped.size else 0.0,
            int(np.count_nonzero(skipped & positive)) / max(1, positives),
            float(saved / skipped.size) if skipped.size else 0.0)

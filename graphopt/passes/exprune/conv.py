"""ExPrune for Conv+ReLU: matching, calibration and replacement by graphopt.ExPruneConvRelu.

Matches a 2-D Conv (group 1, constant float32 weight [M, C, kh, kw], optional constant bias [M]; BatchNorm
is folded into Conv by the pre-passes) whose only reader is a Relu. auto_pad VALID becomes pads 0;
SAME_UPPER / SAME_LOWER become explicit pads where the input's spatial size is known, and are declined
otherwise. The exchangeable terms of one output position are its C·kh·kw input-channel × kernel-tap
products; rows of the shared threshold calibration (graphopt.passes.exprune.calib) are output positions.

Per layer, from sampled input feature maps [r, C, H, W] (`ConvScoring`, the counterpart of
graphopt.passes.exprune.linear.LinearScoring; `ConvScoring.calibrate` calibrates it at one rate):
- probe order: channels ranked by E[x_c²] · ||W[:, c]||² (mean over samples and positions; the sum over
  output channels and taps), largest first; W's input channels are permuted into that order;
- m = round(probe · C), clamped to [1, C − 1]; checkpoints [m] (threshold rule) or m, 2m, 4m, ... < C
  (sequential rule, graphopt.ops.exprune.doubling_checkpoints);
- score_jk of every output position of every sampled map (float64 partial sums rounded to float32, as
  the reference), and τ_j from those through graphopt.passes.exprune.calib: at most a fraction fnr of each output
  channel's positive positions (pre-activation > 0) is predicted negative on the sampled maps.

Approximate: an output differs from ReLU(conv + b) only at a positive position predicted negative, and
then by exactly its value. Layers are calibrated on the original model's activations (not sequentially).
MACs of a layer: M·C·kh·kw·H'·W' (padding taps counted); a position skipped at checkpoint k saves the
fraction (C − k) / C of its MACs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.ops.exprune import RULES, boundary_factors, doubling_checkpoints
from graphopt.ops.exprune_conv import (MIN_OPSET, NAME, build_exprune_conv_function, checkpoint_scores,
                                       output_size, prefix_sums, receptive_fields)
from graphopt.passes.exprune.calib import (Calibrated, ChainLayer, Curve, outcome, probe_length, swap_in,
                                           weight_refusal)

log = logging.getLogger(__name__)

CHUNK_VALUES = 1 << 24  # float64 receptive-field values held at once during calibration (128 MiB)
TIMING_MAPS = 8  # sampled input maps kept, to time the layer on the one with the median skip count


@dataclass
class ConvLayer(ChainLayer):
    """Conv+Relu; `weight` is [M, C, kh, kw]."""

    strides: list[int]
    pads: list[int]  # [top, left, bottom, right]
    dilations: list[int]

    @property
    def terms(self) -> int:
        """Input channels C: the probe unit (each brings kh·kw exchangeable terms per position)."""
        return self.weight.shape[1]

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        kh, kw = self.weight.shape[2:]
        return (output_size(height, kh, self.strides[0], self.pads[0], self.pads[2], self.dilations[0]),
                output_size(width, kw, self.strides[1], self.pads[1], self.pads[3], self.dilations[1]))

    def macs(self, height: int, width: int) -> int:
        """M·C·kh·kw·H'·W' per sample for an input of spatial size height × width."""
        out_h, out_w = self.output_hw(height, width)
        return int(self.weight.size) * out_h * out_w

    def macs_per_sample(self) -> float:
        """`macs` at the input's static spatial size; ValueError where the graph leaves it open."""
        shape = self.source.shape
        if shape is None or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape[2:]):
            raise ValueError(f"{self.name}: input spatial size unknown (use ConvScoring.macs_per_sample)")
        return float(self.macs(shape[2], shape[3]))


def _same_pads(node: gs.Node, kernel: tuple[int, int], strides: list[int], dilations: list[int]) -> list[int] | str:
    """Explicit pads for auto_pad SAME_UPPER / SAME_LOWER, from the input's static spatial size."""
    shape = node.inputs[0].shape
    if shape is None or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape[2:]):
        return f"auto_pad {node.attrs['auto_pad']} with an input of unknown spatial size"
    begins, ends = [], []
    for size, k, s, d in zip(shape[2:], kernel, strides, dilations):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin = small if node.attrs["auto_pad"] == "SAME_UPPER" else large
        begins.append(begin)
        ends.append(total - begin)
    return [*begins, *ends]


def _geometry(node: gs.Node, kernel: tuple[int, int]) -> tuple[list[int], list[int], list[int]] | str:
    """(strides, pads, dilations) of a 2-D Conv, explicit, or why not."""
    strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
    declared = node.attrs.get("kernel_shape")
    if declared is not None and tuple(int(k) for k in declared) != kernel:
        return f"kernel_shape {list(declared)} differs from the weight's {list(kernel)}"
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads: list[int] | str = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(node, kernel, strides, dilations)
    else:
        return f"auto_pad {auto_pad}"
    if isinstance(pads, str):
        return pads
    return strides, pads, dilations


def match_conv(graph: gs.Graph, node: gs.Node) -> ConvLayer | str:
    """The Conv+Relu chain starting at Conv `node`, or why it is not one the op can replace."""
    if graph.opset < MIN_OPSET:
        return f"model opset {graph.opset} < {MIN_OPSET}"
    weight = ir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 4:
        return weight_refusal(node.inputs[1], "weight is not a constant 2-D convolution kernel")
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} (the op is float32)"
    if int(node.attrs.get("group", 1)) != 1:
        return f"group {node.attrs['group']} (the op is a dense convolution)"
    m_out, channels = weight.shape[:2]
    if channels < 2:
        return "one input channel: nothing to probe"
    bias = np.zeros(m_out, dtype=np.float32)
    if len(node.inputs) > 2 and node.inputs[2].name != "":
        values = ir.constant_array(node.inputs[2])
        if values is None or values.size != m_out:
            return "bias is not a constant per-channel vector"
        bias = values.reshape(-1).astype(np.float32)
    geometry = _geometry(node, (int(weight.shape[2]), int(weight.shape[3])))
    if isinstance(geometry, str):
        return geometry
    reader = ir.only_reader(graph, node.outputs[0])
    if reader is None or reader.op != "Relu":
        return "output is not read by a Relu alone"
    strides, pads, dilations = geometry
    return ConvLayer([node, reader], node.inputs[0], reader.outputs[0], weight, bias, strides, pads, dilations)


class ConvScoring:
    """Scores of every output position of sampled input maps [r, C, H, W] for one layer, probe and rule.

    Mirrors graphopt.passes.exprune.linear.LinearScoring: the scores are computed once, `calibrate(fnr)`
    sets thresholds at any false-negative rate from them, `measure` evaluates thresholds on other maps.
    `max_positions` bounds memory (P · M · c float32 scores): each chunk of maps keeps a seeded uniform
    subset of its output positions, the same fraction in every chunk.
    """

    def __init__(self, maps: np.ndarray, layer: ConvLayer, probe: float, rule: str, *,
                 max_positions: int | None = None, seed: int = 0) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown ExPrune rule '{rule}' (implemented: {', '.join(RULES)})")
        channels = layer.terms
        if maps.ndim != 4 or maps.shape[1] != channels or maps.shape[0] == 0:
            raise ValueError(f"{layer.name}: expected sampled maps [r, {channels}, H, W], got {list(maps.shape)}")
        energy = (np.mean(np.square(maps, dtype=np.float64), axis=(0, 2, 3))
                  * np.sum(np.square(layer.weight, dtype=np.float64), axis=(0, 2, 3)))
        self.layer, self.rule = layer, rule
        self.perm = np.argsort(-energy, kind="stable").astype(np.int64)
        self.m = probe_length(probe, channels)
        self.checkpoints = [self.m] if rule == "threshold" else doubling_checkpoints(channels, self.m)
        self.factors = boundary_factors(channels, self.checkpoints)
        self.macs_per_sample = float(layer.macs(*maps.shape[2:]))
        self.scores, self.positive = self.score(maps, max_positions, seed)
        self.sample = np.asarray(maps[:TIMING_MAPS], dtype=np.float32)  # to time the layer on

    def score(self, maps: np.ndarray, max_positions: int | None = None,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(score [P, M, c] float32, positive [P, M]) of the output positions of `maps`, in chunks."""
        layer = self.layer
        weight = layer.weight[:, self.perm]
        channels = layer.terms
        positions = int(np.prod(layer.output_hw(*maps.shape[2:])))
        step = max(1, CHUNK_VALUES // max(1, positions * weight[0].size))
        keep = 1.0 if max_positions is None else min(1.0, max_positions / (positions * maps.shape[0]))
        rng = np.random.default_rng(seed)
        scores, positive = [], []
        for start in range(0, maps.shape[0], step):
            chunk = maps[start:start + step][:, self.perm]
            total = chunk.shape[0] * positions
            rows = None if keep >= 1.0 else np.sort(rng.choice(total, max(1, round(keep * total)), replace=False))
            cols = receptive_fields(chunk, weight.shape[2:], layer.strides, layer.pads, layer.dilations, rows)
            partials = prefix_sums(cols, weight, [*self.checkpoints, channels])
            scores.append(checkpoint_scores(partials, layer.bias, channels, self.checkpoints))
            positive.append(partials[:, :, -1] + layer.bias.astype(np.float64) > 0)
        return np.concatenate(scores), np.concatenate(positive)

    @cached_property
    def curve(self) -> Curve:
        return Curve(self.scores, self.factors, self.positive, self.layer.terms, self.checkpoints, self.perm, self.m)

    def calibrate(self, fnr: float) -> Calibrated:
        found = self.curve(fnr)
        skip, saved = found.skip_rate, found.macs_skipped
        log.debug("exprune conv %s: m=%d/%d checkpoints %s fnr %g: skip %.1f%%, %.1f%% of MACs", self.layer.name,
                  self.m, self.layer.terms, self.checkpoints, fnr, 100 * skip, 100 * saved)
        return found

    def measure(self, maps: np.ndarray, tau: np.ndarray) -> tuple[float, float, float]:
        """(skip rate, false-negative rate, MACs skipped) of thresholds `tau` on other maps."""
        scores, positive = self.score(maps)
        return outcome(scores, self.factors, tau, positive, self.layer.terms, self.checkpoints)


def replace_conv(graph: gs.Graph, layer: ConvLayer, calibrated: Calibrated, rule: str | None = None) -> gs.Node:
    """Swap the layer's Conv+Relu for one ExPruneConvRelu node (and install the op's function).

    Without `rule`, the rule attribute is "threshold" for a single checkpoint and "sequential"
    otherwise (a sequential rule with one checkpoint decides as the threshold rule does).
    """
    rule = rule or ("threshold" if len(calibrated.checkpoints) == 1 else "sequential")
    attrs = {"m": int(calibrated.m), "rule": rule, "checkpoints": [int(k) for k in calibrated.checkpoints],
             "strides": list(layer.strides), "pads": list(layer.pads), "dilations": list(layer.dilations)}
    node = swap_in(graph, layer, calibrated, NAME, attrs)
    ir.add_function(graph, build_exprune_conv_function(graph.opset))
    return node

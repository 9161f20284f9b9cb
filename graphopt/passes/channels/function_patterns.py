"""Recognise decomposed TSRA and weightless RMS normalisation and replace them with graphopt functions.

Exporters write these activations as chains of standard ops whose exact form varies (Pow or Mul for a
square, Div(1, ·) or Reciprocal, ReduceMean or ReduceSum, constants shared or not). Matching is
therefore semantic, not syntactic:
- anchors: an RMS norm ends in y = x·d or x/d where d is computed from x alone (normalising over axis
  1, or over the last axis of a token-major [N, T, C] tensor: tried in that order); a TSRA ends in
  Concat([g_U·x_U, g_V·x_V]) on axis 1 or the last axis, with x_U, x_V sliced from x on that axis
  (tiling it in order, checked by evaluating the slices on the channel index) and the gains computed
  from x alone;
- the region between the anchor and x (only elementwise ops, Slice/Split and reductions, constants
  read from the graph) is evaluated in float64 on seeded probe inputs whose norms span 1e-4..1e2 and
  whose subspace ratios span (0, 1) (probes put two positions on every non-batch axis but the
  candidate one, so a reduction over more than the candidate axis is told apart);
- the parameters are read off the probe: eps is chosen among the scalar constants the region adds
  (or 0), TSRA's alpha and beta by a least-squares fit of logit(g) against r; the match is accepted
  only if the formula with those parameters reproduces the region to 1e-7 on every probe.
A match is replaced by one graphopt.RMSNorm / graphopt.TSRA node (axis 1 or -1; graphopt.ops) and the
region is left to dead-code cleanup. Replacing is exact up to float rounding of the reassociated arithmetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.ops.functions import DOMAIN, MIN_OPSET
from graphopt.ops.rms_norm import build_rms_norm_function
from graphopt.ops.tsra import build_tsra_function
from graphopt.passes.channels.function_region import (MAX_PROBE_RANK, TOLERANCE, constant_value, eps_candidates, evaluate,
                                        probe_rows, region)

log = logging.getLogger(__name__)

@dataclass
class RmsMatch:
    node: gs.Node
    source: gs.Tensor
    channels: int
    eps: float
    axis: int                 # 1, or -1 for the last axis of a token-major tensor


@dataclass
class TsraMatch:
    node: gs.Node
    source: gs.Tensor
    split: int
    params: dict[str, float]
    axis: int = 1             # 1, or -1 for the last axis of a token-major tensor


def _rms_candidates(source: gs.Tensor) -> list[tuple[int, int, int]]:
    """(axis as written, channels, rank) to try: axis 1, then the last axis of a rank >= 3 tensor."""
    shape = source.shape
    if shape is None or not 2 <= len(shape) <= MAX_PROBE_RANK:
        return []
    found = [(axis, dim) for axis, dim in ((1, shape[1]), (-1, shape[-1])) if isinstance(dim, int) and dim > 0]
    return [(axis, dim, len(shape)) for axis, dim in found if axis == 1 or len(shape) >= 3]


def _layout_probe(channels: int, rank: int, axis: int, split: int | None = None) -> np.ndarray:
    """The probe rows with `channels` on `axis` (1 or -1) and two positions on every other non-batch
    axis, so a reduction over more than the candidate axis changes the factor's shape."""
    grid = probe_rows(channels, 2, split).reshape(-1, *(2,) * (rank - 2), channels)
    return grid if axis == -1 else np.moveaxis(grid, -1, 1)


def match_rms(node: gs.Node) -> RmsMatch | None:
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2 or node.domain not in ("", None):
        return None
    pairs = [(node.inputs[0], node.inputs[1])] + ([(node.inputs[1], node.inputs[0])] if node.op == "Mul" else [])
    for source, scale in pairs:
        if scale is source or constant_value(scale) is not None or constant_value(source) is not None:
            continue
        nodes = region([scale], source) if _rms_candidates(source) else None
        if not nodes:
            continue
        for axis, channels, rank in _rms_candidates(source):
            eps = _rms_eps(node, nodes, source, scale, _layout_probe(channels, rank, axis), axis)
            if eps is not None:
                return RmsMatch(node, source, channels, eps, axis)
    return None


def _rms_eps(node: gs.Node, nodes: list[gs.Node], source: gs.Tensor, scale: gs.Tensor, probe: np.ndarray,
             axis: int) -> float | None:
    """The eps for which the region makes node = x / sqrt(mean(x², axis) + eps) on the probe, or None."""
    values = evaluate(nodes, source, probe)
    if values is None or scale.name not in values:
        return None
    factor = values[scale.name] if node.op == "Mul" else 1.0 / values[scale.name]
    mean_square = (probe * probe).mean(axis=axis, keepdims=True)
    if factor.shape != mean_square.shape:
        return None
    for eps in eps_candidates(nodes):
        expected = 1.0 / np.sqrt(mean_square + eps)
        if np.all(np.abs(factor - expected) <= TOLERANCE * np.abs(expected)):
            return eps
    return None


def _concat_axis(node: gs.Node, source: gs.Tensor) -> int | None:
    """The axis as a graphopt node writes it (1, or -1 for the last axis of a rank >= 3 tensor) that a
    TSRA anchor concatenates `source`'s pieces on, or None."""
    shape = source.shape
    if shape is None or not 2 <= len(shape) <= MAX_PROBE_RANK:
        return None
    rank, axis = len(shape), int(node.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    if axis == 1:
        return 1
    return -1 if axis == rank - 1 else None


def _pieces(node: gs.Node) -> tuple[gs.Tensor, list[tuple[gs.Tensor, gs.Tensor]]] | None:
    """For Concat of two products gain·piece with pieces sliced from one tensor: (x, [(gain, piece)])."""
    if len(node.inputs) != 2:
        return None
    parts, source = [], None
    for tensor in node.inputs:
        mul = ir.producer(tensor)
        if mul is None or mul.op != "Mul" or len(mul.inputs) != 2:
            return None
        for gain, piece in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            cut = ir.producer(piece)
            if cut is not None and cut.op in ("Slice", "Split") and (source is None or cut.inputs[0] is source):
                source = cut.inputs[0]
                parts.append((gain, piece))
                break
        else:
            return None
    return source, parts


def _split_of(parts: list[tuple[gs.Tensor, gs.Tensor]], source: gs.Tensor, channels: int, rank: int,
              axis: int) -> int:
    """Where the two pieces cut `source`'s `axis` when they tile it in order (U then V), else 0."""
    index = np.moveaxis(np.arange(channels, dtype=np.float64).reshape(*(1,) * (rank - 1), channels), -1, axis)
    pieces = evaluate(region([p for _, p in parts], source) or [], source, index)
    if pieces is None:
        return 0
    got = [pieces[p.name].reshape(-1) for _, p in parts if p.name in pieces]
    split = got[0].size if len(got) == 2 else 0
    tiled = 0 < split < channels and np.array_equal(np.concatenate(got), np.arange(channels))
    return split if tiled else 0


def match_tsra(node: gs.Node) -> TsraMatch | None:
    if node.op != "Concat":
        return None
    layout = _tsra_layout(node)
    if layout is None:
        return None
    source, parts, axis, split = layout
    channels, rank = source.shape[axis], len(source.shape)
    nodes = region([g for g, _ in parts], source)
    if not nodes:
        return None
    probe = _layout_probe(channels, rank, axis, split)
    values = evaluate(nodes, source, probe)
    if values is None or any(g.name not in values for g, _ in parts):
        return None
    rows = np.moveaxis(probe, axis, -1)
    gains = _gain_rows([values[g.name] for g, _ in parts], axis, rank, (*rows.shape[:-1], 1))
    if gains is None:
        return None
    match = _fit_tsra(node, source, split, rows.reshape(-1, channels), gains, eps_candidates(nodes))
    if match is not None:
        match.axis = axis
    return match


def _tsra_layout(node: gs.Node) -> tuple[gs.Tensor, list[tuple[gs.Tensor, gs.Tensor]], int, int] | None:
    """(x, [(gain, piece)], axis, split) for a Concat of gain·piece products whose pieces tile x in
    order on axis 1 or the last axis; None otherwise."""
    found = _pieces(node)
    if found is None:
        return None
    source, parts = found
    axis = _concat_axis(node, source)
    channels = None if axis is None else source.shape[axis]
    if not isinstance(channels, int) or channels <= 0:
        return None
    split = _split_of(parts, source, channels, len(source.shape), axis)
    return (source, parts, axis, split) if split else None


def _gain_rows(values: list[np.ndarray], axis: int, rank: int, reduced: tuple[int, ...]) -> list[np.ndarray] | None:
    """Each gain as one value per probe row; None for a gain reduced over more than `axis` (its shape is wrong)."""
    gains = []
    for value in values:
        moved = np.moveaxis(value, axis, -1) if value.ndim == rank else None
        if moved is None or any(d not in (1, r) for d, r in zip(moved.shape, reduced)):
            return None
        gains.append(np.broadcast_to(moved, reduced).reshape(-1))
    return gains


def _fit_tsra(node: gs.Node, source: gs.Tensor, split: int, rows: np.ndarray, gains: list[np.ndarray],
              candidates: list[float]) -> TsraMatch | None:
    su = np.linalg.norm(rows[:, :split], axis=1)
    total = np.sqrt(su ** 2 + np.linalg.norm(rows[:, split:], axis=1) ** 2)
    for eps in candidates:
        ratio = su / (total + eps)
        params: dict[str, float] = {"eps": eps}
        for part, gain in zip(("u", "v"), gains):
            usable = (gain > 1e-9) & (gain < 1 - 1e-9)
            if usable.sum() < 8:
                return None
            logit = np.log(gain[usable] / (1.0 - gain[usable]))
            slope, intercept = np.linalg.lstsq(np.stack([ratio[usable], np.ones(usable.sum())], axis=1),
                                               logit, rcond=None)[0]
            if abs(slope) < 1e-12:
                break
            alpha, beta = float(np.float32(slope)), float(np.float32(-intercept / slope))
            if np.max(np.abs(1.0 / (1.0 + np.exp(-alpha * (ratio - beta))) - gain)) > 1e-6:
                break
            params[f"alpha_{part}"], params[f"beta_{part}"] = alpha, beta
        else:
            return TsraMatch(node, source, split, params)
    return None


def rms_norm_node(graph: gs.Graph, name: str, source: gs.Tensor, output: gs.Tensor, channels: int, eps: float,
                  axis: int) -> gs.Node:
    """A graphopt.RMSNorm node reading `source` and writing `output` (the caller adds it to the graph and makes
    sure the function is in the model: `ir.add_function(graph, build_rms_norm_function(graph.opset))`)."""
    from graphopt.ops.rms_norm import make_rms_norm_node

    proto = make_rms_norm_node("x", "y", channels, eps, axis=axis)
    attrs = {a.name: (a.i if a.type == a.INT else a.f) for a in proto.attribute}
    return gs.Node(proto.op_type, ir.unique_name(graph, name), attrs=attrs, inputs=[source], outputs=[output],
                   domain=DOMAIN)


def canonicalise(graph: gs.Graph) -> tuple[int, int]:
    """Replace every recognised RMS norm and TSRA by a graphopt function node; returns their counts. Below
    opset MIN_OPSET (whose ops the functions' bodies are written in) nothing is replaced: the decomposed
    norms stay, and the channel analysis treats them as the normalisations over channels they are."""
    from graphopt.ops.tsra import make_tsra_node

    if graph.opset < MIN_OPSET:
        log.info("RMS norms and TSRA activations left decomposed: the model's opset %d is below the %d that "
                 "graphopt's function ops need", graph.opset, MIN_OPSET)
        return 0, 0
    counts = [0, 0]
    for kind, matcher in ((0, match_rms), (1, match_tsra)):
        for node in list(graph.nodes):
            if not node.outputs or not node.inputs:
                continue
            match = matcher(node)
            if match is None:
                continue
            output = node.outputs[0]
            ir.detach(node)
            if kind == 0:
                graph.nodes.append(rms_norm_node(graph, f"{node.name}_rms", match.source, output, match.channels,
                                                 match.eps, match.axis))
            else:
                proto = make_tsra_node("x", "y", match.split, axis=match.axis, **match.params)
                attrs = {a.name: (a.i if a.type == a.INT else a.f) for a in proto.attribute}
                graph.nodes.append(gs.Node(proto.op_type, ir.unique_name(graph, f"{node.name}_tsra"), attrs=attrs,
                                           inputs=[match.source], outputs=[output], domain=DOMAIN))
            counts[kind] += 1
    if counts[0]:
        ir.add_function(graph, build_rms_norm_function(graph.opset))
    if counts[1]:
        ir.add_function(graph, build_tsra_function(graph.opset))
    if any(counts):
        ir.cleanup(graph)
        log.info("cob: %d RMS norms and %d TSRA activations recognised", counts[0], counts[1])
    return counts[0], counts[1]

"""SNP's cut: the least-squares reconstruction of the pruned units folded into every consumer's weights, then
the physical removal (graphopt.passes.channels); or, with the original model as the target, the self fit only
where no refit applies and then the refit of every consumer whose input changed (graphopt.passes.snp.correct).
Per consumer, with P the pruned and K the kept positions of its input, (C, c₀) is the least-squares fit
x_P ≈ C x_K + c₀ on the consumer's statistics (graphopt.passes.snp.maths.reconstruction); W[:, K] += W[:, P] C
and c₀ reaches the bias through the consumer shifts (see graphopt.passes.snp.prune for exactness)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Site
from graphopt.calibration.blas import single_threaded_blas
from graphopt.calibration.stats import TensorStats
from graphopt.ir import graph as ir
from graphopt.passes.base import PassContext
from graphopt.passes.channels.consumer_shift import (Shifts, add_shift, apply_with_shifts, bias_costs_a_node,
                                                     consumer_shift)
from graphopt.passes.channels.engine import kept_positions
from graphopt.passes.channels.reduction import linear_sites
from graphopt.passes.snp.correct import correct, targets
from graphopt.passes.snp.maths import consumer_reconstruction, from_input_rows, input_rows
from graphopt.passes.snp.padding import inside_fraction, read_moments


def _fold(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], tensor_stats: TensorStats,
          shifts: Shifts) -> bool:
    """Fold the least-squares reconstruction of the pruned positions into one consumer's weights. A grouped
    Conv gets one fit per group, on that group's block of its input, folded into that group's outputs."""
    features = a.size(site.state) * site.state.factor
    keep_pos = kept_positions(a.atoms, site.state, kept)
    pruned_pos = np.setdiff1d(np.arange(features), keep_pos)
    if pruned_pos.size == 0:
        return False
    cov, mean = read_moments(tensor_stats, inside_fraction(a, site))
    weight = np.asarray(site.node.inputs[site.index].values)
    rows = input_rows(weight, site.axis)
    # a bias-free MatMul (one group): its fit may go without a constant term, which would cost an Add
    bias_free = rows[:, pruned_pos] if bias_costs_a_node(graph, site.node) else None
    shifts_by_group = []
    # group k (one group unless grouped: a Conv, outputs on axis 0) reads block k of the input through its
    # own output rows; np.split gives views, so the fold writes into `rows`
    frozen = _frozen_rows(site, weight.shape)
    before = rows[frozen].copy()
    for k, (outputs, block) in enumerate(zip(np.split(weight, site.groups), np.split(rows, site.groups))):
        coupling, constant = consumer_reconstruction(cov, mean, keep_pos + k * features, pruned_pos + k * features,
                                                     bias_free)
        values = np.zeros(features)
        values[pruned_pos] = constant
        shifts_by_group.append(consumer_shift(site, values, outputs))
        block[:, keep_pos] += block[:, pruned_pos] @ coupling
    rows[frozen] = before
    shift = np.concatenate(shifts_by_group)
    shift[frozen] = 0.0
    add_shift(shifts, site.node, shift, recurrent=site.role == "recurrent")
    ir.set_input_array(graph, site.node, site.index, from_input_rows(rows, weight, site.axis))
    return True


def _frozen_rows(site: Site, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of a consumer's weight (as `input_rows` lays them out) the reconstruction must leave alone: a GRU's
    hidden gate reads its units back as r ⊙ h unless linear_before_reset (torch's export: r ⊙ (H·Rᵀ + Rb), linear
    in h), and the reset gates of removed units go with them, so there R's rows of that gate keep their kept
    columns as they were (its other gates, and LSTM's and RNN's, are linear in h)."""
    if site.role != "recurrent" or site.node.op != "GRU" or site.node.attrs.get("linear_before_reset", 0):
        return np.zeros(0, dtype=np.int64)
    directions, units = shape[0], shape[1] // 3
    return np.concatenate([d * 3 * units + np.arange(2 * units, 3 * units) for d in range(directions)])


def prune_reconstructed(graph: gs.Graph, analysis: Analysis, sites: list[Site], stats: dict[str, TensorStats],
                        kept: dict[int, np.ndarray], reconstruct: bool) -> int:
    """Fold reconstructions into every consumer, then cut; returns how many consumers were folded."""
    shifts: Shifts = {}
    if reconstruct:  # a reduction over channels that lose units becomes the weighted sum the fit folds into
        sites = linear_sites(graph, analysis, sites, set(kept))
    folded = sum(_fold(graph, s, analysis, kept, stats[s.reads.name], shifts) for s in sites) \
        if reconstruct else 0
    apply_with_shifts(graph, analysis, kept, shifts)
    return folded


def prune_error_corrected(graph: gs.Graph, ctx: PassContext, analysis: Analysis, sites: list[Site],
                          stats: dict[str, TensorStats], kept: dict[int, np.ndarray]) -> tuple[int, int]:
    """Cut with the weight consumers left as they are (reductions get the self fit), then refit every
    consumer whose input changed to the original model (graphopt.passes.snp.correct); returns
    (consumers given the self fit, consumers refitted)."""
    reference = ir.export_model(graph, ctx.template)
    found = targets(analysis, sites, kept, stats)
    with single_threaded_blas():  # a recurrent read keeps the self fit beside its layer's refitted input weights
        folded = prune_reconstructed(graph, analysis, [s for s in sites if s.node.name not in found
                                                       or s.role == "recurrent"], stats, kept, True)
    ir.cleanup(graph)
    return folded, correct(graph, ctx, reference, found)


def reconstruct_target(ctx: PassContext, reconstruct: bool = True, sequential: bool = False) -> str:
    """--reconstruct-target (snp and cob): as given, else "original" where the run has calibration data (it runs
    the pruned model beside the original on it) and cuts in one shot with reconstruction, else "self"."""
    given = ctx.option("reconstruct_target")
    if given is not None:
        return str(given)
    return "original" if ctx.data is not None and reconstruct and not sequential else "self"

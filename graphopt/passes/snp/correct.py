"""Error-correcting reconstruction: the pruned model's consumers refitted to reproduce the ORIGINAL model.

Let x be the original model's input to a linear consumer (Conv, Gemm, MatMul with a constant weight; F
features per read) and y the pruned model's input to the same consumer (its kept features, computed by
the pruned model with every consumer upstream already refitted). On paired calibration reads
(graphopt.calibration.paired, both models on the same samples) the least-squares estimate
x ≈ M y + m₀ has M = (Σ_xy + λM₀)(Σ_yy + λI)⁻¹ and m₀ = μ_x − M μ_y (graphopt.passes.snp.maths), and
the consumer gets W' = W M at every kernel tap and bias b + W m₀ (summed over taps), W being the
original weights over the output channels the consumer keeps. The ridge λ pulls M towards the one-shot
self reconstruction M₀ (identity on the kept features, the fit C of graphopt.passes.snp.maths on the
pruned ones, from the original model's statistics) rather than towards 0, so directions of y that the
calibration rows do not excite (fewer rows than features, as in a Gemm after pooling) keep the one-shot
map instead of being dropped. For Gemm and MatMul this is the least-squares fit of the original
pre-activation W x + b from y; for Conv it fits the input map read by read (the patch-level fit would
need moments of F·k² features). It is exact wherever x is affine in y (planted duplicates and constant
units pruned upstream exactly keep y = x_K), and where nothing upstream changed (y = x_K) it is the
one-shot self reconstruction.

The self modes (one-shot and `sequential`) fit x_P from x_K of the model they measure; this fits the
original from the pruned model, so each consumer also corrects what pruning upstream changed, including
consumers whose own input kept every channel. Zero-padded Conv reads use the padded moments
(graphopt.passes.snp.padding). Consumers are refitted stage by stage in topological order: a wave is
every pending consumer whose input depends on no pending consumer, measured in one paired calibration
run; a consumer whose input is computed exactly as in the original (same cone fingerprint) keeps its
weights. Each wave resumes both models from the tensors the previous wave computed (their frontier,
graphopt.calibration.staged), so L waves cost about one run of each model over the data instead of L²/2
layer evaluations (MiniLM at 0.7 of the MACs, 11 waves over 1000 x 128 tokens: 124.8 s against 257.8 s end
to end, `bench/refit_cost.py`);
the frontier stays in memory up to half the calibration memory bound and on disk beyond it, up to twice the
bound; past that the waves run from the inputs.
A consumer whose paired rows number fewer than `MIN_ROWS_PER_FEATURE` per feature keeps the self fit.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Site
from graphopt.calibration.capture import cone_fingerprints
from graphopt.calibration.paired import PairedStats, PairRequest
from graphopt.calibration.blas import single_threaded_blas
from graphopt.calibration.stats import TensorStats
from graphopt.ir import graph as ir
from graphopt.passes.base import PassContext
from graphopt.passes.channels.consumer_shift import add_bias, bias_costs_a_node, consumer_shift, output_axis
from graphopt.passes.channels.engine import kept_positions
from graphopt.passes.snp.maths import (bare_fit, constant_pays, consumer_reconstruction, cross_reconstruction,
                                       from_input_rows, input_rows, reconstruction, without_intercept)
from graphopt.passes.snp.padding import inside_fraction, paired_read_moments, read_moments

log = logging.getLogger(__name__)

# a consumer is refitted only from at least this many paired rows per input feature: with fewer, the fit
# reproduces the calibration rows and generalises worse than the self fit (a Gemm after global pooling
# reads one row per sample)
MIN_ROWS_PER_FEATURE = 8


@dataclass
class Target:
    """A consumer to refit: its site (a live node of the graph being pruned), its original weights over
    the output channels it keeps, its input in the original model (name and statistics), the input
    features it keeps (ascending: the pruned model's features in order) and its inside fraction."""

    site: Site
    weight: np.ndarray
    reference_input: str
    reference_stats: TensorStats
    kept_inputs: np.ndarray
    inside: float

    @functools.cached_property
    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(Σ, μ) of the consumer's reads in the original model (padding.read_moments), formed once."""
        return read_moments(self.reference_stats, self.inside)

    def prior(self, intercept: bool = True) -> np.ndarray:
        """M₀, features x kept features: the one-shot self reconstruction of the input from its kept features
        (without `intercept`, on second moments with no constant term)."""
        cov, mean = self.moments if intercept else without_intercept(*self.moments)
        return self._from_kept(lambda pruned: reconstruction(cov, mean, self.kept_inputs, pruned))[0]

    def self_fit(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(M₀, m₀): the one-shot self reconstruction x ≈ M₀ x_K + m₀ on the original model's statistics; with
        `rows`, the weights of a bias-free consumer over all its input features, maths.consumer_reconstruction
        may fit it without the constant term."""
        return self._from_kept(lambda pruned: consumer_reconstruction(
            *self.moments, self.kept_inputs, pruned, rows[:, pruned] if rows is not None else None))

    def _from_kept(self, fit: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(M₀, m₀) over every input feature: the identity on the kept ones, `fit(pruned)` on the pruned ones."""
        features = self.reference_stats.channels
        prior, constant = np.zeros((features, self.kept_inputs.size)), np.zeros(features)
        prior[self.kept_inputs, np.arange(self.kept_inputs.size)] = 1.0
        pruned = np.setdiff1d(np.arange(features), self.kept_inputs)
        if pruned.size:
            prior[pruned], constant[pruned] = fit(pruned)
        return prior, constant


def targets(analysis: Analysis, sites: list[Site], kept: dict[int, np.ndarray],
            stats: dict[str, TensorStats]) -> dict[str, Target]:
    """The weight consumers among `sites` (`stats`: the original model's statistics of their inputs),
    captured before the cut, by node name."""
    out_states = {s.node.name: s.state for s in analysis.sites if s.kind == "weight" and s.role == "producer"}
    found: dict[str, Target] = {}
    for site in sites:
        if site.kind != "weight" or site.role in ("grouped", "recurrent") or site.node.name in found:
            continue  # a grouped Conv keeps the self fit, group by group (graphopt.passes.snp.fold), and so does
            # the recurrent read of an LSTM/GRU/RNN
        weight = np.array(site.node.inputs[site.index].values)
        state = out_states.get(site.node.name)
        if state is not None:
            weight = np.take(weight, kept_positions(analysis.atoms, state, kept), axis=output_axis(site.node))
        name = site.node.inputs[0].name
        found[site.node.name] = Target(site, weight, name, stats[name], kept_positions(analysis.atoms, site.state, kept),
                                       inside_fraction(analysis, site))
    return found


def _upstream(found: dict[str, Target]) -> dict[str, set[str]]:
    """Per target, the other targets its input depends on (main graph)."""
    by_node = {id(t.site.node): name for name, t in found.items()}
    upstream: dict[str, set[str]] = {}
    for name, target in found.items():
        seen: set[int] = set()
        pending: list[gs.Tensor] = [target.site.node.inputs[0]]
        reached: set[str] = set()
        while pending:
            for node in pending.pop().inputs:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if id(node) in by_node:
                    reached.add(by_node[id(node)])
                pending.extend(t for t in node.inputs if isinstance(t, gs.Variable))
        upstream[name] = reached
    return upstream


def _paired_fit(target: Target, moments: tuple[np.ndarray, ...], rows: np.ndarray, free: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """(M, m₀) of the refit on paired `moments` (Σ_xy, Σ_yy, μ_x, μ_y); for a bias-free consumer (`free`) the fit
    without a constant term (m₀ = 0) where it leaves at most INTERCEPT_SLACK more error (maths.constant_pays;
    E[x_j²] from the original model's statistics of x)."""
    cross, cov, reference_mean, mean = moments
    with_prior = target.kept_inputs.size == cov.shape[0]
    if free:
        second_cross = cross + np.outer(reference_mean, mean)
        coupling, spare = bare_fit(second_cross, cov + np.outer(mean, mean), mean,
                                   target.prior(False) if with_prior else None)
        variance = np.diagonal(target.moments[0])
        if not constant_pays(rows, reference_mean, variance + reference_mean ** 2, coupling, second_cross, mean,
                             spare):
            return coupling, np.zeros_like(reference_mean)
    return cross_reconstruction(*moments, target.prior() if with_prior else None)


def _refit(graph: gs.Graph, target: Target, paired: PairedStats) -> bool:
    """Refit `target` on `paired`; False when the paired rows are too few for the features they fit
    (`MIN_ROWS_PER_FEATURE`): the consumer then gets the one-shot self reconstruction instead."""
    refit = paired.count >= MIN_ROWS_PER_FEATURE * max(paired.channels, 1)
    site = target.site
    rows = input_rows(target.weight, site.axis)
    free = bias_costs_a_node(graph, site.node)  # a constant term would cost an Add of its own
    if refit or target.kept_inputs.size != paired.channels:
        coupling, constant = _paired_fit(target, paired_read_moments(paired, target.inside), rows, free)
        refit = True
    else:
        coupling, constant = target.self_fit(rows if free else None)
    refitted = rows @ coupling
    ir.set_input_array(graph, site.node, site.index, from_input_rows(refitted, target.weight, site.axis))
    shift = consumer_shift(site, constant, target.weight)
    if np.any(shift):
        add_bias(graph, site.node, shift)
    return refit


def correct(graph: gs.Graph, ctx: PassContext, reference: onnx.ModelProto, found: dict[str, Target]) -> int:
    """Refit every target whose input differs from the original's, wave by wave; returns how many."""
    upstream = _upstream(found)
    reference_cones = cone_fingerprints(reference)
    pending, corrected, waves = dict(found), 0, 0
    stages = ctx.staged_runs()
    stages.reference.know(reference, reference_cones)
    while pending:
        model = ir.export_model(graph, ctx.template)
        cones = cone_fingerprints(model)
        stages.model.know(model, cones)
        wave = [name for name in pending if not upstream[name] & pending.keys()] or list(pending)
        requests: dict[str, PairRequest] = {}
        for name in wave:
            target = pending.pop(name)
            current = target.site.node.inputs[0].name
            if cones.get(current) != reference_cones.get(target.reference_input):
                requests[name] = PairRequest(target.reference_input, current, target.site.state.axis)
        if not requests:
            continue
        paired = ctx.paired_statistics(list(requests.values()), reference, model, stages)
        waves += 1
        with single_threaded_blas():
            refitted = [name for name, request in requests.items() if _refit(graph, found[name], paired[request])]
        corrected += len(refitted)
        for name in requests.keys() - set(refitted):
            log.info("error correction: %s keeps the self fit (%d paired rows for %d features)", name,
                     paired[requests[name]].count, paired[requests[name]].channels)
    log.info("error correction: %d consumers refitted to the original model in %d waves", corrected, waves)
    return corrected

"""SNP: subspace node pruning with least-squares reconstruction folded into the consumers.

For every channel group (graphopt.analysis.groups) the statistics come from the tensors at which
channel-mixing consumers (Conv, Gemm, MatMul with a constant weight, ReduceSum/ReduceMean over the
channel axis) read the group, after any per-channel ops; graphopt.passes.snp.plan orders each group's
units and decides how many stay (one global retained-variance cut, `keep_variance`, a MAC target,
`target_macs`, or a latency target, `target_latency`, under per-layer latency tables). A reduction over
channels that lose units gets its row of weights written as a Mul in front of the sum
(graphopt.passes.channels.reduction), and its reconstruction folds into that row.

Reconstruction is per consumer, on the whole tensor it reads (all groups at once): with P the pruned
and K the kept positions, W[:, K] += W[:, P] C at every kernel tap and the consumer's bias gains
W[:, P] c₀ (summed over taps). Exact when pruned units are affine in kept ones, otherwise the
least-squares optimum for that consumer. A zero-padded Conv reads zeros at the border, where the bias
still adds c₀: the fit is over its reads, padding included (graphopt.passes.snp.padding), so units that
are linear in the kept ones stay exact, while a constant unit is not redundant to it (removing one
leaves a border error). ConvTranspose consumers and bilinear reads (q·kᵀ) are pruned without
reconstruction. Groups no linear consumer reads are left alone, with the reason recorded.

`reconstruct_target` says what the reconstruction reproduces. "original" cuts the model as planned and then
refits every Conv/Gemm/MatMul consumer, in topological order, to reproduce the original model's
pre-activation from the pruned model's input (graphopt.passes.snp.correct), so each layer also corrects
what pruning upstream changed; reductions over channels keep the self fit. "self" fits, in each consumer,
the pruned units from the kept ones on the statistics of the model it measures. Both are exact where
pruned units are affine in kept ones. "original" is the default when the run has calibration data (it runs
the pruned model beside the original on it) and cuts in one shot with reconstruction; "self" otherwise.
On PP-OCRv4's pretrained recogniser (`bench/ocr.py`) "original" with the output ordering kept 99.4% and
98.7% character accuracy at 0.6 and 0.5 of the MACs (dense 99.8%) where "self" with variance ordering kept
75.5% and 13.3%, at about twice the time (56-59 s against 25-27 s); on PP-OCRv4's detector it lowered the
maps' error at both targets measured. Where it loses: a ResNet-50 with seeded weights calibrated on 64
Gaussian samples (held-out rel_l2 0.51 against 0.32, `bench/reconstruct_target.py`) and, slightly, the
MiniLM sentence encoder (cosine 0.954 against 0.956 at 0.7; with the output ordering 0.958), where it also
costs three times the self fit's time (130.7 s against 45.8 s, `bench/refit_cost.py`). Layers read with too few rows per feature
keep the self fit (without that rule the refit reproduced the calibration outputs almost exactly; see
graphopt.passes.snp.correct).

`criterion` orders each group's units: "output" (the default) by the error the consumers see, trace(W_P S
W_Pᵀ) with S the Schur complement, chosen greedily; "variance" by the paper's unnormalised ZCA (unique
variance).

With `sequential` (a self target), the counts are decided once on the original model, then groups are
pruned one at a time in graph order, each ordered and reconstructed on statistics of the model with the
earlier groups already pruned (as SparseGPT and SliceGPT do), so later layers see the errors of earlier
ones, but each still reconstructs its own activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Group, Site
from graphopt.analysis.state import group_key
from graphopt.calibration.blas import blas_for, single_threaded_blas
from graphopt.calibration.stats import TensorStats
from graphopt.errors import OptionError
from graphopt.ir import graph as ir
from graphopt.passes.base import CHANGES_CHANNELS, READS_WEIGHTS, Pass, PassContext, PassResult, register
from graphopt.passes.channels.alignment import (coarsest_meeting, cost_ratio, multiple_stats, pass_multiples, runs_of,
                                                sizes_of)
from graphopt.passes.channels.latency import Budget, budget_restore_stats
from graphopt.passes.channels.magnitude import analyse
from graphopt.passes.methods import (SNP_MAX_FEATURES, KeepVariance, Method, Reconstruction, Rounding, StatisticsOptions, option,
                                      register_method)
from graphopt.passes.heads.qk_plan import QKPlan, apply_qk
from graphopt.passes.heads.select import HeadPlan, apply_heads
from graphopt.passes.snp.fold import prune_error_corrected, prune_reconstructed, reconstruct_target
from graphopt.passes.snp.measure import QK_DIMS, consumer_statistics, costs, linear_consumers, measure
from graphopt.passes.snp.plan import (Ordering, counts, fill, history_entry, orderings, unit_counts,
                                      variance_for_target)
from graphopt.passes.snp.sensitivity import PROBE_SAMPLES, damage_counts, damage_for_target, scales, sensitivities

log = logging.getLogger(__name__)


def _cut(graph: gs.Graph, ctx: PassContext, measured: tuple[Analysis, list[Site], dict[str, TensorStats]],
         ranked: dict[int, Ordering], cut: dict[int, int], target: str, reconstruct: bool) -> tuple[int, int]:
    """Cut every group to its count with the reconstruction `target` asks for; (consumers folded, refitted)."""
    analysis, sites, stats = measured
    kept = {root: np.sort(ranked[root].order[:count]) for root, count in cut.items()}
    if target == "original" and cut:
        return prune_error_corrected(graph, ctx, analysis, sites, stats, kept)
    with blas_for(max((ranked[root].order.size for root in cut), default=0)):
        return prune_reconstructed(graph, analysis, sites, stats, kept, reconstruct), 0


def _key(analysis: Analysis, group: Group) -> tuple[tuple[str, int, int], ...]:
    """Names a group across re-analyses of an edited graph: its producer weights and its piece of them (the two
    halves a TSRA splits a stream into share their producers; every group keeps a channel)."""
    return group_key(analysis.atoms, group)


def _checked_options(ctx: PassContext) -> tuple[float | None, str]:
    """(--keep-variance, --criterion), after checking that exactly one budget is given."""
    keep = ctx.option("keep_variance")
    if sum(ctx.option(name) is not None for name in ("target_macs", "target_latency", "keep_variance")) != 1:
        raise OptionError("--method snp needs exactly one of --target-macs, --target-latency or --keep-variance")
    if keep is not None and not 0.0 < float(keep) <= 1.0:
        raise OptionError(f"--keep-variance must be in (0, 1], got {keep}")
    criterion = ctx.option("criterion", "output")
    if criterion not in ("variance", "output"):
        raise OptionError(f"--criterion must be variance or output, got {criterion}")
    return keep, criterion


def _plan(ranked: dict[int, Ordering], budget: Budget | None, keep: float | None,
          round_to: dict[int, int], scale: dict[int, float] | None = None) -> tuple[float, dict[int, int]]:
    """The cut and the units each group keeps: at `keep`, else the most variance the budget (MACs or predicted
    latency) allows; with `scale` (sensitivities), the least weighted lost variance: the cut is then the
    damage threshold τ of graphopt.passes.snp.sensitivity."""
    if budget is None:
        return float(keep), counts(ranked, float(keep), round_to)
    if scale is not None:
        tau = damage_for_target(ranked, scale, budget.model, budget.target, round_to)
        start = damage_counts(ranked, scale, tau, round_to)
        return tau, fill(start, ranked, budget.model, budget.target, round_to, scale=scale)
    variance = variance_for_target(ranked, budget.model, budget.target, round_to)
    return variance, fill(counts(ranked, variance, round_to), ranked, budget.model, budget.target, round_to)


def _decision(budget: Budget | None, keep: float | None, variance: float,
              tau: float | None = None) -> dict[str, float]:
    """The budget that decided the cut, as the history records it (`tau`: the damage threshold of a
    sensitivity budget; the retained-variance cut is then the uniform plan's, before probing)."""
    given = {"keep_variance": float(keep)} if budget is None else {budget.kind: budget.target}
    return {**given, "retained_variance_cut": variance, **({"damage_cut": tau} if tau is not None else {})}


def _history(by: str, groups: list[Group], ranked: dict[int, Ordering], cut: dict[int, int], criterion: str,
             decision: dict[str, float], probed: dict[int, dict[str, float]] | None = None) -> list[dict]:
    by_root = {g.root: g for g in groups}
    return [history_entry(by, by_root[root], ranked[root], count, criterion, **decision,
                          **({"probe": probed[root]} if probed and root in probed else {}))
            for root, count in sorted(cut.items())]


def _head_stats(heads: HeadPlan, chosen: dict[int, int]) -> dict[str, int]:
    if not heads.orderings:
        return {}
    return {"head_blocks": len(heads.orderings),
            "heads_removed": sum((o.order.size - chosen.get(r, o.order.size)) * heads.blocks[r].groups
                                 for r, o in heads.orderings.items())}


def _qk_stats(qk: QKPlan, chosen: dict[int, int]) -> dict[str, int]:
    """q/k blocks planned, and per-head q/k dims removed summed over blocks (each head of a block loses as many)."""
    if not qk.orderings:
        return {}
    return {"qk_blocks": len(qk.orderings),
            "qk_dims_removed": sum(o.order.size - chosen.get(r, o.order.size) for r, o in qk.orderings.items())}


@register
class SubspaceNodePruning(Pass):
    name = "snp"
    kind = "method"
    through_quantized = True
    description = "subspace node pruning: LDL ordering on calibration statistics, least-squares reconstruction"
    requires = READS_WEIGHTS
    preserves = CHANGES_CHANNELS

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        keep, criterion = _checked_options(ctx)
        reconstruct = bool(ctx.option("reconstruct", True))
        sequential = bool(ctx.option("sequential", False))
        target = reconstruct_target(ctx, reconstruct, sequential)  # checked by `SnpOptions`
        max_features = int(ctx.option("snp_max_features", SNP_MAX_FEATURES))
        result = PassResult(modified=False)
        m = measure(graph, ctx, result, criterion, max_features)
        analysis, prunable, ranked, stats = m.analysis, m.prunable, m.ranked, m.stats
        round_to = {**pass_multiples(ctx.option("round_to"), [g for g in prunable if g.root in ranked],
                                     ctx.option("device")), **m.qk.multiples()}
        cost, budget = costs(graph, ctx, m, round_to, keep is None)
        blocks = round_to  # before any relaxation
        (variance, chosen), round_to = coarsest_meeting(
            ctx.option("round_to") if budget is not None else None, round_to,
            lambda step: _plan(ranked, budget, keep, step),
            lambda planned: cost_ratio(budget.model, planned[1]), budget.target if budget else 1.0,
            sizes_of(prunable), runs_of(prunable))
        planning, folding = (analysis, prunable, ranked), (stats, max_features, reconstruct)
        probed, tau, chosen, round_to = self._by_sensitivity(graph, ctx, planning, folding, (budget, keep, blocks),
                                                             (chosen, round_to))
        cut = {root: count for root, count in chosen.items() if count < ranked[root].order.size and root >= 0}
        decision = _decision(budget, keep, variance, tau)
        corrected = 0
        if sequential:
            folded = self._sequential(graph, ctx, analysis, cut, criterion, max_features, reconstruct,
                                      (decision, result.history))
        else:
            result.history = _history(self.name, m.groups, ranked, cut, criterion, decision, probed)
            folded, corrected = _cut(graph, ctx, (analysis, m.sites, stats), ranked, cut, target, reconstruct)
        folded_heads, head_history = apply_heads(graph, m.heads, chosen, stats, analysis.shapes, reconstruct, decision)
        qk_history = apply_qk(graph, m.qk, chosen, m.heads, stats, analysis.shapes, decision)
        result.history.extend(head_history + qk_history)
        result.modified = bool(cut) or bool(head_history) or bool(qk_history)
        result.stats = {
            "groups": len(m.groups), "prunable_groups": len(prunable), "groups_pruned": len(cut),
            "channels_removed": sum(ranked[r].order.size - c for r, c in chosen.items() if r >= 0),
            **_head_stats(m.heads, chosen), **_qk_stats(m.qk, chosen),
            "consumers_reconstructed": int(folded + folded_heads + corrected),
            "consumers_error_corrected": int(corrected), "retained_variance_cut": variance,
            "estimated_macs_ratio": cost_ratio(cost, chosen) / ctx.macs_scale,
            **(budget.stats(chosen) if budget is not None else {}), **multiple_stats(round_to, blocks),
            **budget_restore_stats(budget, chosen, unit_counts(ranked), round_to, ctx.macs_scale),
            **({"groups_probed": len(probed)} if probed else {}),
        }
        return result

    def _by_sensitivity(self, graph: gs.Graph, ctx: PassContext,
                        planning: tuple[Analysis, list[Group], dict[int, Ordering]],
                        folding: tuple[dict[str, TensorStats], int, bool], budgeting: tuple[Budget | None, float | None, Any],
                        uniform: tuple[dict[int, int], Any]) -> tuple[dict[int, dict[str, float]], float | None,
                                                                      dict[int, int], Any]:
        """With `--budget-by sensitivity` and a target: (probes, damage threshold, counts, rounding) of the
        sensitivity-weighted plan; otherwise the `uniform` plan's counts and rounding, unprobed."""
        budget, keep, blocks = budgeting
        ranked = planning[2]
        if ctx.option("probe_key") is not None and (ctx.option("metric") is None
                                                    or ctx.option("budget_by") != "sensitivity"):
            raise OptionError("--probe-key names the key of --metric that --budget-by sensitivity's probes weigh: "
                              "give it with both")
        if budget is None or ctx.option("budget_by") != "sensitivity" or not ranked:
            return {}, None, *uniform
        probed = self._probe(graph, ctx, planning, uniform[0], folding)
        scale = scales(probed, ranked)
        (tau, chosen), round_to = coarsest_meeting(
            ctx.option("round_to"), blocks, lambda step: _plan(ranked, budget, keep, step, scale),
            lambda planned: cost_ratio(budget.model, planned[1]), budget.target, sizes_of(planning[1]),
            runs_of(planning[1]))
        return probed, tau, chosen, round_to

    def _probe(self, graph: gs.Graph, ctx: PassContext, planning: tuple[Analysis, list[Group], dict[int, Ordering]],
               planned: dict[int, int], folding: tuple[dict[str, TensorStats], int, bool]) -> dict[int, dict[str, float]]:
        """Each prunable group's sensitivity (graphopt.passes.snp.sensitivity): the group alone cut and
        reconstructed on a fresh copy of the graph, the output error measured on a few calibration samples."""
        analysis, prunable, ranked = planning
        stats, max_features, reconstruct = folding
        reference = ir.export_model(graph, ctx.template)
        probe = ctx.output_probe(reference, int(ctx.option("probe_samples", PROBE_SAMPLES)), ctx.option("probe_key"))
        keys = {group.root: _key(analysis, group) for group in prunable if group.root in ranked}

        def error_of_cut(root: int, count: int) -> dict[str, float]:
            trial = ir.import_graph(reference)
            fresh, _ = analyse(trial, ctx)
            group = next(g for g in fresh.groups() if g.prunable and _key(fresh, g) == keys[root])
            sites = linear_consumers(fresh, max_features, None)
            with single_threaded_blas():
                prune_reconstructed(trial, fresh, sites, stats, {group.root: np.sort(ranked[root].order[:count])},
                                    reconstruct)
            ir.cleanup(trial)
            return probe.measure(ir.export_model(trial, ctx.template))

        return sensitivities({root: ranked[root] for root in keys}, planned, error_of_cut, ctx.progress,
                             runs_of(prunable))

    def _sequential(self, graph: gs.Graph, ctx: PassContext, first: Analysis, cut: dict[int, int],
                    criterion: str, max_features: int, reconstruct: bool,
                    recording: tuple[dict[str, float], list[dict]]) -> int:
        """Prune group by group in graph order, re-measuring statistics on the partly pruned graph;
        each cut goes to the history (`recording`: the budget decision and the list to append to) under
        the group as first analysed (the channels of a group keep their numbering until it is cut)."""
        decision, history = recording
        position = {node.name: index for index, node in enumerate(graph.nodes)}
        by_root = {g.root: g for g in first.groups()}
        plan = sorted(((_key(first, by_root[root]), root, count) for root, count in cut.items()),
                      key=lambda item: (min(position[name] for name, _, _ in item[0]), item[0]))
        folded = 0
        for key, root, count in plan:
            analysis, _ = analyse(graph, ctx)
            group = next(g for g in analysis.groups() if g.prunable and _key(analysis, g) == key)
            sites = [s for s in linear_consumers(analysis, max_features, None)
                     if any(analysis.atoms.find(leaf) == group.root for leaf in analysis.atoms.leaves(s.state.atoms))]
            stats = consumer_statistics(ctx, graph, sites)
            with single_threaded_blas():
                ranked = orderings(analysis, [group], sites, stats, criterion, PassResult(modified=False))
                history.append(history_entry(self.name, by_root[root], ranked[group.root], count, criterion,
                                             **decision))
                kept = {group.root: np.sort(ranked[group.root].order[:count])}
                folded += prune_reconstructed(graph, analysis, sites, stats, kept, reconstruct)
            ir.cleanup(graph)
        return folded


@dataclass
class SnpOptions(Rounding, KeepVariance, Reconstruction, StatisticsOptions):
    criterion: str = option("output", choices=("variance", "output"),
                            help="snp unit ordering: output (default): the consumers' output error; variance: the "
                                 "paper's unnormalised ZCA")
    budget_by: str = option("variance", choices=("variance", "sensitivity"),
                            help="snp with a MAC or latency target: variance (default) keeps the same share of "
                                 "every group's unique variance; sensitivity first probes each group's effect on "
                                 "the model's output (one cut and run per group, needs --calib) and cuts least "
                                 "where the output is most sensitive")
    probe_samples: int = option(PROBE_SAMPLES, cli=False, help="calibration samples each sensitivity probe runs")
    probe_key: str | None = option(None, metavar="KEY",
                                   help="with --budget-by sensitivity and --metric: the metric's key the probes weigh, "
                                        "as the change from the original's value (default: its only key; without "
                                        "--metric the probes weigh the outputs' relative squared error)")
    heads: bool = option(True, flag="--no-heads",
                         help="snp: keep every attention head (by default whole heads compete with channels in the "
                              "budget, ranked by the output projection's error, their loss reconstructed into it)")
    qk_dims: bool = option(QK_DIMS, help="snp: q/k dims inside attention heads compete in the budget too: each head's "
                                        "q·kᵀ becomes its best rank-r approximation on the calibration moments, "
                                        "folded into the q and k projections (off by default)")
    sequential: bool = option(False, help="snp: prune group by group, re-measuring statistics on the partly "
                                          "pruned model")
    reconstruct: bool = option(True, flag="--no-reconstruct",
                               help="snp: prune in the SNP order without folding the least-squares reconstruction")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reconstruct_target == "original" and (self.sequential or not self.reconstruct):
            raise OptionError("--reconstruct-target original refits every consumer stage by stage itself: it does "
                              f"not combine with {'--sequential' if self.sequential else '--no-reconstruct'}")


SNP = register_method(Method(SubspaceNodePruning.name, SubspaceNodePruning.description, needs_data=True,
                             passes=(SubspaceNodePruning.name,), options=SnpOptions))

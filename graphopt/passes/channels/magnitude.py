"""Magnitude and random structured pruning to a MAC or latency target.

Importance of channel i of a group (magnitude): the L1 (or L2) norm of every producer weight slice
that writes channel i, summed over all producers coupled in the group (residual streams, head-split
projections, ...). Random: seeded uniform scores. Both need no calibration data. The global budget
(graphopt.passes.channels.budget) picks per-group counts under the MACs, or under the latency predicted
by per-layer tables (graphopt.passes.channels.latency); the engine (graphopt.passes.channels.engine)
rewrites the graph. Channels whose producers are all zero score 0 and go first: removing them is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Group, find_groups, layers_in_bodies, name_nodes
from graphopt.calibration.shapes import batch1_shapes, count_cost
from graphopt.errors import OptionError
from graphopt.ir import graph as ir
from graphopt.passes.channels.function_patterns import canonicalise
from graphopt.passes.base import (CHANGES_CHANNELS, READS_FOLDED_WEIGHTS, READS_WEIGHTS, Pass, PassContext,
                                  PassResult, register)
from graphopt.passes.channels.alignment import (coarsest_meeting, cost_ratio, multiple_stats, pass_multiples, runs_of,
                                                sizes_of)
from graphopt.passes.channels.budget import MacModel, choose_counts, minimum_counts, run_means, top_indices
from graphopt.passes.channels.engine import apply_kept, removal
from graphopt.passes.channels.latency import Budget, budget_restore_stats, channel_budget
from graphopt.passes.methods import Method, Rounding, Seeded, option, register_method

log = logging.getLogger(__name__)


def analyse(graph: gs.Graph, ctx: PassContext) -> tuple[Analysis, dict[str, int]]:
    """Channel groups of `graph` and per-node batch-1 MACs (node names are made unique first).

    Decomposed RMS norms and TSRA activations are first replaced by graphopt's function ops (an exact
    rewrite, checked numerically when matched), so that their channels can be analysed at all.
    """
    if any(canonicalise(graph)):
        ir.cleanup(graph)
    name_nodes(graph)  # MACs are keyed by node name, sites by node: both need the same unique names
    model = ir.export_model(graph, ctx.template, infer=False)  # batch1_shapes infers, with inputs fixed
    shapes = batch1_shapes(model, ctx.input_shapes, sample=ctx.sample)
    return find_groups(graph, shapes), count_cost(model, ctx.input_shapes, shapes).per_node


def split_groups(analysis: Analysis, result: PassResult) -> tuple[list[Group], list[Group]]:
    """All groups and the prunable ones; each blocked group's reason goes to `result.skipped`, and so does
    each control-flow node whose bodies hold layers (channel pruning reads the main graph only)."""
    groups = analysis.groups()
    result.skipped.extend(f"group {g.root} ({g.size} channels): {g.describe()['reason']}"
                          for g in groups if not g.prunable)
    result.skipped.extend(layers_in_bodies(analysis.graph))
    return groups, [g for g in groups if g.prunable]


def magnitude_scores(analysis: Analysis, groups: list[Group], norm: str) -> dict[int, np.ndarray]:
    atoms = analysis.atoms
    scores = {g.root: np.zeros(g.size) for g in groups}
    for site in analysis.sites:
        if site.role != "producer":
            continue
        weight = np.asarray(site.node.inputs[site.index].values)
        rows = np.moveaxis(weight, site.axis, 0).reshape(weight.shape[site.axis], -1)
        if norm == "l1":  # accumulate in float64 without a float64 copy of the weight
            per_row = np.abs(rows).sum(axis=1, dtype=np.float64)
        else:
            per_row = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        offset = 0
        for leaf in atoms.leaves(site.state.atoms):
            size = atoms.sizes[leaf]
            root = atoms.find(leaf)
            if root in scores:
                scores[root] += per_row[offset:offset + size]
            offset += size
    return scores


def budget_history(by: str, groups: list[Group], kept: dict[int, np.ndarray], scores: dict[int, np.ndarray],
                   criterion: str, budget: Budget) -> list[dict]:
    """History of a global-budget cut: every group kept its highest scores, so each removed score is at
    most `lowest_kept_score`; groups compare by score / `group_mean_score` (graphopt.passes.channels.budget)."""
    return [removal(g, by, kept[g.root], criterion, scores[g.root], **{budget.kind: budget.target},
                    lowest_kept_score=float(np.min(scores[g.root][kept[g.root]])),
                    group_mean_score=float(np.mean(scores[g.root])))
            for g in groups if g.root in kept]


class _ChannelPruning(Pass):
    kind = "method"
    through_quantized = True
    # weights are seen only as initializers; RMSNorm/TSRA are matched on inferred shapes
    requires = READS_WEIGHTS
    preserves = CHANGES_CHANNELS

    def scores(self, analysis: Analysis, groups: list[Group], ctx: PassContext) -> dict[int, np.ndarray]:
        raise NotImplementedError

    def criterion(self, ctx: PassContext) -> str:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        target = ctx.option("target_macs")
        if target is None and ctx.option("target_latency") is None:
            raise OptionError(f"--method {self.name} needs --target-macs or --target-latency")
        analysis, per_node = analyse(graph, ctx)
        result = PassResult(modified=False)
        groups, prunable = split_groups(analysis, result)
        round_to = pass_multiples(ctx.option("round_to"), prunable, ctx.option("device"))
        mac_model = MacModel(analysis, per_node, {g.root for g in prunable})
        runs = runs_of(prunable)
        scores = {root: run_means(s, runs.get(root, 1)) for root, s in self.scores(analysis, prunable, ctx).items()}
        budget = channel_budget(graph, ctx, analysis, mac_model, round_to)
        blocks = round_to  # before any relaxation
        counts, round_to = coarsest_meeting(
            ctx.option("round_to"), round_to, lambda step: choose_counts(scores, budget.model, budget.target, step),
            lambda chosen: cost_ratio(budget.model, chosen), budget.target, sizes_of(prunable), runs)
        kept = {g.root: top_indices(scores[g.root], counts[g.root]) for g in prunable if counts[g.root] < g.size}
        result.history = budget_history(self.name, prunable, kept, scores, self.criterion(ctx), budget)
        apply_kept(graph, analysis, kept)
        removed = sum(g.size - counts[g.root] for g in prunable)
        result.modified = bool(kept)
        result.stats = {
            "groups": len(groups), "prunable_groups": len(prunable), "groups_pruned": len(kept),
            "channels_prunable": sum(g.size for g in prunable), "channels_removed": removed,
            **({"target_macs": target} if target is not None else {}), "estimated_macs_ratio": mac_model.ratio(counts),
            # the lowest ratio these groups can reach: above the target, the target is out of reach
            "min_macs_ratio": mac_model.ratio(minimum_counts(scores, round_to)), **budget.stats(counts),
            **multiple_stats(round_to, blocks),
            **budget_restore_stats(budget, counts, {root: s.size for root, s in scores.items()}, round_to,
                                   ctx.macs_scale),
        }
        return result


@register
class MagnitudePruning(_ChannelPruning):
    name = "magnitude"
    description = "structured pruning by producer weight norms (L1 or L2), global MAC budget"
    # norms judge a channel only once BatchNorm's per-channel scale is folded into its producer
    requires = READS_FOLDED_WEIGHTS

    def criterion(self, ctx: PassContext) -> str:
        return f"{ctx.option('norm', 'l1')}_norm"

    def scores(self, analysis: Analysis, groups: list[Group], ctx: PassContext) -> dict[int, np.ndarray]:
        norm = ctx.option("norm", "l1")
        if norm not in ("l1", "l2"):
            raise OptionError(f"--norm must be l1 or l2, got {norm}")
        return magnitude_scores(analysis, groups, norm)


@register
class RandomPruning(_ChannelPruning):
    name = "random"
    description = "structured pruning with seeded random importance, global MAC budget"

    def criterion(self, ctx: PassContext) -> str:
        return "random"

    def scores(self, analysis: Analysis, groups: list[Group], ctx: PassContext) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(int(ctx.option("seed", 0)))
        return {g.root: rng.random(g.size) for g in sorted(groups, key=lambda g: g.root)}


@dataclass
class MagnitudeOptions(Rounding):
    norm: str = option("l1", choices=("l1", "l2"), help="magnitude importance norm")


@dataclass
class RandomOptions(Rounding, Seeded):
    """Rounding and the seed of the scores."""


MAGNITUDE = register_method(Method(MagnitudePruning.name, MagnitudePruning.description, needs_data=False,
                                   passes=(MagnitudePruning.name,), options=MagnitudeOptions))
RANDOM = register_method(Method(RandomPruning.name, RandomPruning.description, needs_data=False,
                                passes=(RandomPruning.name,), options=RandomOptions))

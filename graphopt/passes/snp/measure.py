"""What SNP plans from: the channel groups and head blocks of a graph, their consumers' statistics (one
calibration run for both), each group's unit ordering, and the cost model its budget is spent in.

Channel groups inside a head block (per-head q/k and value channels) are left to the head planning
(graphopt.passes.heads.select) when heads are pruned, and the q/k channels to the q/k planning
(graphopt.passes.heads.qk_plan) when q/k dims are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Group, Site
from graphopt.calibration.blas import blas_for
from graphopt.calibration.stats import StatRequest, TensorStats
from graphopt.passes.base import PassContext, PassResult
from graphopt.passes.channels.budget import CostModel, MacModel
from graphopt.passes.channels.latency import Budget, LatencyModel, channel_budget
from graphopt.passes.channels.magnitude import analyse, split_groups
from graphopt.passes.heads.latency import priced_heads
from graphopt.passes.heads.qk_plan import QKPlan, plan_qk, qk_blocks, qk_requests
from graphopt.passes.heads.select import HeadPlan, head_requests, inside_blocks, plan_heads, usable_blocks
from graphopt.passes.snp.plan import Ordering, orderings

QK_DIMS = False  # SnpOptions.qk_dims's default (MiniLM: cosine up, top-10 overlap down at 0.7 of MACs)


def linear_consumers(analysis: Analysis, max_features: int, result: PassResult | None) -> list[Site]:
    usable = []
    for site in analysis.sites:
        if site.kind not in ("weight", "reduce") or site.role not in ("consumer", "grouped", "recurrent"):
            continue
        features = analysis.size(site.state) * site.state.factor * site.groups
        if site.node.op == "ConvTranspose" or features > max_features:
            if result is not None:
                result.skipped.append(f"{site.node.name}: no reconstruction ({site.node.op}, {features} input features)")
        else:
            usable.append(site)
    return usable


def consumer_statistics(ctx: PassContext, graph: gs.Graph, sites: list[Site],
                        extra: list[StatRequest] = ()) -> dict[str, TensorStats]:
    requests = {s.reads.name: StatRequest(s.reads.name, frozenset({"mean", "gram"}), s.state.axis) for s in sites}
    requests.update({r.tensor: r for r in extra if r.tensor not in requests})
    return ctx.statistics(list(requests.values()), model=graph) if requests else {}


@dataclass
class Measured:
    analysis: Analysis
    per_node: dict[str, int]
    groups: list[Group]
    prunable: list[Group]      # channel groups SNP may cut (not those inside head blocks)
    sites: list[Site]
    stats: dict[str, TensorStats]
    ranked: dict[int, Ordering]  # channel groups and (negative roots) head blocks and q/k dims
    heads: HeadPlan
    qk: QKPlan = field(default_factory=QKPlan)


def measure(graph: gs.Graph, ctx: PassContext, result: PassResult, criterion: str, max_features: int) -> Measured:
    """Analyse `graph`, gather the statistics every consumer (and every head block) needs, and order the units."""
    analysis, per_node = analyse(graph, ctx)
    groups, prunable = split_groups(analysis, result)
    with_heads, with_qk = bool(ctx.option("heads", True)), bool(ctx.option("qk_dims", QK_DIMS))
    found = usable_blocks(graph, analysis.shapes, result) if with_heads or with_qk else []
    blocks = found if with_heads else []
    qks = qk_blocks(found, analysis.shapes, result) if with_qk else []
    inside = inside_blocks(analysis, prunable, blocks + [qk.projections() for qk in qks])
    prunable = [g for g in prunable if g.root not in inside]
    sites = linear_consumers(analysis, max_features, result)
    stats = consumer_statistics(ctx, graph, sites, head_requests(blocks, analysis.shapes) +
                                qk_requests(qks, analysis.shapes))
    with blas_for(max((g.size for g in prunable), default=0)):  # threads pay on wide groups only
        ranked = orderings(analysis, prunable, sites, stats, criterion, result)
    heads = plan_heads(blocks, stats, result)
    qk = plan_qk(qks, stats, heads, -1 - len(found), result)
    return Measured(analysis, per_node, groups, prunable, sites, stats,
                    {**ranked, **heads.orderings, **qk.orderings}, heads, qk)


def costs(graph: gs.Graph, ctx: PassContext, m: Measured, round_to: dict[int, int],
          with_target: bool) -> tuple[CostModel, Budget | None]:
    """(the MAC model with heads, the budget of a MAC or latency target or None)."""
    macs = MacModel(m.analysis, m.per_node, {root for root in m.ranked if root >= 0})
    cost = m.qk.cost_model(m.heads.cost_model(macs, m.per_node, macs.total), m.per_node, macs.total)
    budget = channel_budget(graph, ctx, m.analysis, cost, round_to) if with_target else None
    if budget is not None and budget.model is not cost:
        if m.heads.orderings and isinstance(budget.model, LatencyModel):
            with_heads, info = priced_heads(ctx, m.heads, m.per_node, macs.total, budget.model, m.analysis.shapes)
            budget.info.update(info)
        else:
            with_heads = m.heads.cost_model(budget.model, m.per_node, macs.total)
        budget.model = m.qk.cost_model(with_heads, m.per_node, macs.total)
    return cost, budget

"""SNP: subspace node pruning with least-squares reconstruction folded into the consumers.

For every channel group (graphopt.analysis.groups) the statistics come from the tensors at which
channel-mixing consumers (Conv, Gemm, MatMul with a constant weight) read the group, after any
per-channel ops. A group's covariance sums, over those tensors and over each place the group occurs in
them (heads, flattened blocks), the covariance of its units; graphopt.passes.snp_math orders the units
(unnormalised ZCA, or the consumers' output error with `criterion="output"`) and gives the LDLᵀ
variances D. Budget: one global cut V on cumulative retained variance sum(D[:k]) / sum(D) applies to
every group (`keep_variance`; a tail adding less than 1e-6 of the variance counts as redundant, so
V = 1 removes exactly the units that are affine in the others), or V is searched so MACs meet
`target_macs`, after which the budget left over goes, unit by unit, to the groups whose next units
add the largest variance fraction.

Reconstruction is per consumer, on the whole tensor it reads (all groups at once): with P the pruned
and K the kept positions, W[:, K] += W[:, P] C at every kernel tap and the consumer's bias gains
W[:, P] c₀ (summed over taps). Exact when pruned units are affine in kept ones, otherwise the
least-squares optimum for that consumer; for Conv the constant term is also added where zero padding
means the pruned units were 0, so border outputs carry a small extra error. ConvTranspose consumers
and bilinear reads (q·kᵀ) are pruned without reconstruction. Groups no linear consumer reads are left
alone, with the reason recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.groups import Analysis, Group, Site
from graphopt.calibration.stats import StatRequest, TensorStats
from graphopt.errors import OptionError
from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.prune_budget import MacModel
from graphopt.passes.prune_engine import apply_kept, kept_positions
from graphopt.passes.prune_magnitude import analyse
from graphopt.passes.snp_math import ldl_diagonal, output_order, reconstruction, zca_order

log = logging.getLogger(__name__)

REDUNDANT = 1e-6  # a tail adding less than this fraction of a group's unique variance is redundant


@dataclass
class _Ordering:
    order: np.ndarray       # unit indices, most important first
    fraction: np.ndarray    # D in that order, normalised to sum 1


def _occurrences(a: Analysis, state: ChannelState, root: int) -> list[np.ndarray]:
    """Feature positions of group `root` along `state`'s axis, one array per occurrence."""
    found, offset = [], 0
    for leaf in a.atoms.leaves(state.atoms):
        size = a.atoms.sizes[leaf]
        if a.atoms.find(leaf) == root:
            channels = offset + np.arange(size)
            found.extend(channels * state.factor + k for k in range(state.factor))
        offset += size
    return found


def _readout(site: Site) -> np.ndarray:
    """WᵀW over the consumer's outputs and taps, features x features."""
    weight = np.asarray(site.node.inputs[site.index].values, dtype=np.float64)
    rows = np.moveaxis(weight, site.axis, -1).reshape(-1, weight.shape[site.axis])
    return rows.T @ rows


def _orderings(a: Analysis, groups: list[Group], consumers: list[Site], stats: dict[str, TensorStats],
               criterion: str, result: PassResult) -> dict[int, _Ordering]:
    orderings = {}
    for group in groups:
        cov, readout = np.zeros((group.size, group.size)), np.zeros((group.size, group.size))
        for site in consumers:
            tensor_stats = stats.get(site.node.inputs[0].name)
            if tensor_stats is None:
                continue
            full_cov = tensor_stats.covariance()
            full_readout = _readout(site) if criterion == "output" else None
            for positions in _occurrences(a, site.state, group.root):
                cov += full_cov[np.ix_(positions, positions)]
                if full_readout is not None:
                    readout += full_readout[np.ix_(positions, positions)]
        if not cov.any():
            result.skipped.append(f"group {group.root} ({group.size} channels): no linear consumer with statistics")
            continue
        order = output_order(cov, readout) if criterion == "output" else zca_order(cov)
        added = ldl_diagonal(cov, order)
        orderings[group.root] = _Ordering(order, added / max(float(added.sum()), 1e-300))
    return orderings


def _counts(orderings: dict[int, _Ordering], keep: float, round_to: int) -> dict[int, int]:
    counts = {}
    for root, ordering in orderings.items():
        cumulative = np.cumsum(ordering.fraction)
        count = int(np.searchsorted(cumulative, keep - REDUNDANT)) + 1
        count = min(max(count, 1), ordering.order.size)
        if round_to > 1:
            count = min(ordering.order.size, -(-count // round_to) * round_to)
        counts[root] = count
    return counts


def _variance_for_target(orderings: dict[int, _Ordering], model: MacModel, target: float, round_to: int) -> float:
    """The largest global retained-variance cut whose MACs stay within the target."""
    budget = target * model.total
    if model.macs(_counts(orderings, 0.0, round_to)) > budget:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if model.macs(_counts(orderings, middle, round_to)) <= budget:
            low = middle
        else:
            high = middle
    return low


def _fill(counts: dict[int, int], orderings: dict[int, _Ordering], model: MacModel, target: float,
          round_to: int, limit: int = 4096) -> dict[int, int]:
    """Spend what the variance cut left of the MAC budget: add, one step at a time, the next unit
    (or `round_to` units) of the group whose next units add the most variance, while MACs fit."""
    budget = target * model.total
    counts = dict(counts)
    for _ in range(limit):
        best, best_gain = None, 0.0
        for root, ordering in orderings.items():
            count = counts[root]
            step = min(round_to, ordering.order.size - count)
            if step <= 0:
                continue
            gain = float(ordering.fraction[count:count + step].sum())
            if gain > best_gain and model.macs({**counts, root: count + step}) <= budget:
                best, best_gain = root, gain
        if best is None:
            break
        counts[best] = min(orderings[best].order.size, counts[best] + max(round_to, 1))
    return counts


def _fold(graph: gs.Graph, site: Site, a: Analysis, kept: dict[int, np.ndarray], tensor_stats: TensorStats,
          pending: list[tuple[gs.Node, np.ndarray]]) -> bool:
    """Fold the least-squares reconstruction of the pruned positions into one consumer's weights."""
    features = a.size(site.state) * site.state.factor
    keep_pos = kept_positions(a.atoms, site.state, kept)
    pruned_pos = np.setdiff1d(np.arange(features), keep_pos)
    if pruned_pos.size == 0:
        return False
    coupling, constant = reconstruction(tensor_stats.covariance(), tensor_stats.mean, keep_pos, pruned_pos)
    weight = np.asarray(site.node.inputs[site.index].values)
    moved = np.moveaxis(weight.astype(np.float64), site.axis, -1)
    lost = moved[..., pruned_pos]
    moved[..., keep_pos] += lost @ coupling
    ir.set_input_array(graph, site.node, site.index, np.moveaxis(moved, -1, site.axis).astype(weight.dtype))
    out_axis = _output_axis(site)
    shift = lost @ constant  # weight shape without the input axis
    out_in_shift = out_axis - (1 if out_axis > site.axis else 0)
    per_output = np.moveaxis(shift, out_in_shift, 0).reshape(shift.shape[out_in_shift], -1).sum(axis=1)
    if np.any(per_output):
        pending.append((site.node, per_output))
    return True


def _output_axis(site: Site) -> int:
    node = site.node
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1 if node.op == "MatMul" else 0


def _add_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> None:
    """Add a per-output-channel shift to a consumer's bias (creating the bias where there is none)."""
    weight = np.asarray(node.inputs[1].values)
    if node.op in ("Conv", "Gemm"):
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        bias = ir.constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None and bias.size == shift.size and scale != 0.0:
            new_bias = bias.astype(np.float64) + shift.reshape(bias.shape) / scale
            ir.set_input_array(graph, node, 2, new_bias.astype(bias.dtype))
            return
        if len(node.inputs) < 3 or not node.inputs[2].name:
            constant = gs.Constant(ir.unique_name(graph, f"{node.name}_bias"), shift.astype(weight.dtype))
            del node.inputs[2:]
            node.inputs.append(constant)
            if node.op == "Gemm":
                node.attrs["beta"] = 1.0
            return
    out = node.outputs[0]
    inner = gs.Variable(ir.unique_name(graph, f"{out.name}_unbiased"), dtype=out.dtype)
    ir.replace_output(node, out, inner)
    shape = (shift.size,) + (1,) * (weight.ndim - 2) if node.op == "Conv" else (shift.size,)
    offset = gs.Constant(ir.unique_name(graph, f"{node.name}_shift"), shift.astype(weight.dtype).reshape(shape))
    graph.nodes.append(gs.Node("Add", ir.unique_name(graph, f"{node.name}_shift"), inputs=[inner, offset], outputs=[out]))


@register
class SubspaceNodePruning(Pass):
    name = "snp"
    kind = "method"
    description = "subspace node pruning: LDL ordering on calibration statistics, least-squares reconstruction"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        target, keep = ctx.option("target_macs"), ctx.option("keep_variance")
        if (target is None) == (keep is None):
            raise OptionError("--method snp needs exactly one of --target-macs or --keep-variance")
        if keep is not None and not 0.0 < float(keep) <= 1.0:
            raise OptionError(f"--keep-variance must be in (0, 1], got {keep}")
        criterion = ctx.option("criterion", "variance")
        if criterion not in ("variance", "output"):
            raise OptionError(f"--criterion must be variance or output, got {criterion}")
        round_to = int(ctx.option("round_to", 1))
        max_features = int(ctx.option("snp_max_features", 4096))
        analysis, per_node = analyse(graph, ctx)
        groups = analysis.groups()
        prunable = [g for g in groups if g.prunable]
        result = PassResult(modified=False)
        result.skipped.extend(f"group {g.root} ({g.size} channels): {g.describe()['reason']}"
                              for g in groups if not g.prunable)
        consumers = [s for s in analysis.sites if s.kind == "weight" and s.role == "consumer"]
        usable = []
        for site in consumers:
            features = analysis.size(site.state) * site.state.factor
            if site.node.op == "ConvTranspose" or features > max_features:
                result.skipped.append(f"{site.node.name}: no reconstruction ({site.node.op}, {features} input features)")
            else:
                usable.append(site)
        requests = {s.node.inputs[0].name: StatRequest(s.node.inputs[0].name, frozenset({"mean", "gram"}),
                                                       s.state.axis) for s in usable}
        stats = ctx.statistics(list(requests.values()), model=graph) if requests else {}
        orderings = _orderings(analysis, prunable, usable, stats, criterion, result)
        mac_model = MacModel(analysis, per_node, set(orderings))
        variance = float(keep) if keep is not None else _variance_for_target(orderings, mac_model, float(target), round_to)
        counts = _counts(orderings, variance, round_to)
        if target is not None:
            counts = _fill(counts, orderings, mac_model, float(target), round_to)
        kept = {root: np.sort(orderings[root].order[:count]) for root, count in counts.items()
                if count < orderings[root].order.size}
        pending: list[tuple[gs.Node, np.ndarray]] = []
        folded = 0
        if ctx.option("reconstruct", True):
            folded = sum(_fold(graph, s, analysis, kept, stats[s.node.inputs[0].name], pending) for s in usable)
        out_states = {s.node.name: s.state for s in analysis.sites if s.kind == "weight" and s.role == "producer"}
        apply_kept(graph, analysis, kept)
        for node, shift in pending:
            state = out_states.get(node.name)
            _add_bias(graph, node, shift[kept_positions(analysis.atoms, state, kept)] if state is not None else shift)
        result.modified = bool(kept)
        result.stats = {
            "groups": len(groups), "prunable_groups": len(prunable), "groups_pruned": len(kept),
            "channels_removed": sum(orderings[r].order.size - c for r, c in counts.items()),
            "consumers_reconstructed": int(folded), "retained_variance_cut": variance,
            "estimated_macs_ratio": mac_model.macs(counts) / mac_model.total if mac_model.total else 1.0,
        }
        return result

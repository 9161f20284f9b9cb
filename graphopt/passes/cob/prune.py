"""CoB: change-of-basis pruning (Ning and Rangaraju, arXiv 2511.16061) on TSRA / RMS-norm networks.

1. onnxruntime's fused (skip) norms are split into the residual Add and the norm (graphopt.passes.cob.unfuse).
   Decomposed TSRA and weightless RMS norms are replaced by graphopt function ops
   (graphopt.passes.channels.function_patterns); a pre-norm LayerNorm stream is centred in its writers and
   its LayerNorms become RMS norms with a gain and a shift (graphopt.passes.cob.centre); exact up to float
   rounding. A weighted norm's gain (and shift) is folded into its linear readers (graphopt.passes.cob.gains),
   so the norm alone stays in the group.
2. Legal groups writers -> equivariant ops -> linear consumers are found (graphopt.passes.cob.chains),
   channels on axis 1 or last (token-major), per head through attention (graphopt.passes.cob.heads);
   a residual stream is one group: every writer into its Add joins shares one rotation, folded into all
   of them and into every reader. Illegal ones are reported with the offending op.
3. Per chain and per subspace (TSRA splits, attention heads), a rotation from calibration data is
   folded into the weights (graphopt.passes.cob.rotation): PCA of the Gram of the tensors the consumers
   read (for heads: the merged, token-mixed values that the output projection reads), or L1-PCA
   on a bounded row sample (graphopt.calibration.sample). Rotation alone is exact: the model computes
   the same function (to float rounding of the rotated weights).
4. With a budget, the trailing rotated coordinates of every subspace are dropped through the channel
   group engine (the TSRA rule keeps the split consistent; attention heads are one group, so every
   head keeps the same count, ranked by energy summed over heads): `keep_variance` keeps in every subspace
   the shortest prefix holding that fraction of its energy (1.0 drops exactly the zero-energy tail, with
   no output change); `target_macs` bisects one global energy cut for a MAC target and fills what is
   left of the budget (`target_latency`: the same under predicted latency, graphopt.passes.channels.latency); `zscore` Z keeps the coordinates whose RMS amplitude has z-score >= Z within
   their subspace. Pruning is approximate: the error is the energy dropped, as seen by the consumers,
   less what SNP's least-squares reconstruction of the dropped coordinates from the kept ones, folded into
   the consumers, recovers (`cob_reconstruct`, the default; graphopt.passes.snp).
Without a budget only steps 1-3 run. In a pipeline where SNP runs later (`--method cob,snp`), CoB only
rotates and SNP spends the one budget (MACs, latency or retained variance) across its own groups and the
rotated ones: ranked by SNP's scores on the rotated coordinates and cut with its least-squares
reconstruction, so a rotated residual stream competes with FFN units and heads for the same budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, Group, Site, layers_left_alone
from graphopt.calibration.shapes import count_cost
from graphopt.calibration.blas import single_threaded_blas
from graphopt.calibration.stats import StatRequest, TensorStats
from graphopt.errors import DataError, OptionError
from graphopt.ir import graph as ir
from graphopt.passes.base import CHANGES_CHANNELS, READS_FOLDED_WEIGHTS, Pass, PassContext, PassResult, register
from graphopt.passes.cob.centre import centre_layer_norms
from graphopt.passes.cob.chains import Chain, Writer, find_chains
from graphopt.passes.cob.gains import fold_gains
from graphopt.passes.channels.function_patterns import canonicalise
from graphopt.passes.cob.l1pca import l1pca_basis
from graphopt.passes.cob.postnorm import open_post_norms
from graphopt.passes.cob.rotation import fold, pca_basis
from graphopt.passes.cob.unfuse import unfuse_norms
from graphopt.passes.channels.alignment import coarsest_meeting, cost_ratio, multiple_stats, pass_multiples
from graphopt.passes.channels.budget import CostModel, MacModel
from graphopt.passes.channels.latency import budget_restore_stats, channel_budget
from graphopt.passes.channels.engine import apply_kept, removal
from graphopt.passes.channels.magnitude import analyse
from graphopt.passes.methods import (SNP_MAX_FEATURES, KeepVariance, Method, Reconstruction, Rounding, Seeded,
                                      StatisticsOptions, option, register_method)
from graphopt.passes.snp.measure import consumer_statistics, linear_consumers
from graphopt.passes.snp.fold import prune_error_corrected, prune_reconstructed, reconstruct_target
from graphopt.passes.snp.plan import Ordering, counts, fill, unit_counts, variance_for_target

log = logging.getLogger(__name__)
TARGETS = ("target_macs", "target_latency")  # budgets of a graphopt.passes.channels.latency.Budget
SHARED_BUDGETS = (*TARGETS, "keep_variance")
SHARES_BUDGET = ("snp",)  # a later method that cuts under the run's budget: cob then only rotates


def block_diag(blocks: list[np.ndarray]) -> np.ndarray:
    size = sum(b.shape[0] for b in blocks)
    out, offset = np.zeros((size, size)), 0
    for block in blocks:
        out[offset:offset + block.shape[0], offset:offset + block.shape[0]] = block
        offset += block.shape[0]
    return out


def _budget(ctx: PassContext) -> tuple[str | None, float | None]:
    given = {key: ctx.option(key) for key in ("target_macs", "target_latency", "keep_variance", "zscore")}
    given = {key: float(value) for key, value in given.items() if value is not None}
    if len(given) > 1:
        raise OptionError("--method cob takes at most one of --target-macs, --target-latency, --keep-variance, "
                          "--zscore")
    if "keep_variance" in given and not 0.0 < given["keep_variance"] <= 1.0:
        raise OptionError(f"--keep-variance must be in (0, 1], got {given['keep_variance']}")
    return next(iter(given.items()), (None, None))


def _rotations(ctx: PassContext, graph: gs.Graph, chains: list[Chain], method: str
               ) -> tuple[list[tuple[np.ndarray, list[np.ndarray]]], dict[str, TensorStats]]:
    """Per chain: Q (blockdiag over its subspaces) and the energies of each subspace's rotated coordinates;
    and the statistics of the tensors the chains read, before the rotations."""
    reads = {name: axis for chain in chains for name, axis in chain.reads.items()}
    stats = ctx.statistics([StatRequest(n, frozenset({"mean", "gram"}), a) for n, a in reads.items()], model=graph)
    samples: dict[str, np.ndarray] = {}
    if method == "l1pca":
        if ctx.data is None:
            raise DataError("--rotation l1pca needs the activations themselves: give --calib DATA.npz")
        from graphopt.calibration.distributed import gather_rows

        samples = gather_rows(ctx.cluster, ir.export_model(graph, ctx.template), ctx.data, reads,
                              max_rows=int(ctx.option("l1pca_rows", 4096)),
                              batch_size=int(ctx.option("batch_size", 32)), seed=int(ctx.option("seed", 0)))
    found = []
    for chain in chains:
        gram = sum(stats[name].gram() for name in chain.reads)
        blocks, energies = [], []
        for low, high in chain.subspaces:
            block = gram[low:high, low:high]
            if method == "l1pca":
                rows = np.concatenate([samples[name][:, low:high] for name in chain.reads])
                rotation, energy = l1pca_basis(rows, block, int(ctx.option("l1pca_iterations", 30)),
                                               int(ctx.option("seed", 0)))
            else:
                rotation, energy = pca_basis(block)
            blocks.append(rotation)
            energies.append(energy)
        found.append((block_diag(blocks), energies))
    return found, stats


def _know_rotated(ctx: PassContext, graph: gs.Graph, chains: list[Chain],
                  rotations: list[tuple[np.ndarray, list[np.ndarray]]], stats: dict[str, TensorStats]) -> None:
    """Without calibration data (statistics from a file), give the context the rotated statistics of every
    tensor a rotated chain reads (exact: x' = Q x), so that the reconstruction after the cut reads them instead
    of asking for statistics the file cannot have. With data the rotated graph is measured."""
    if ctx.data is not None:
        return
    known = {name: stats[name].rotated(rotation) for chain, (rotation, _) in zip(chains, rotations)
             for name in chain.reads}  # an identity too: a rotation upstream changed the tensor's cone, not its values
    if known:
        ctx.know_statistics(graph, known)


def _producer_site(analysis: Analysis, writer: Writer) -> Site | None:
    """The site where a writer of the chain writes its output channels (its weight)."""
    return next((s for s in analysis.sites if s.kind == "weight" and s.role == "producer" and s.node is writer.node
                 and s.index == writer.index), None)


def _covering_group(analysis: Analysis, groups: dict[int, Group], site: Site, low: int, high: int) -> Group | str:
    """The group whose one atom spans the producer's channels [low, high), or why there is none."""
    leaves = analysis.atoms.leaves(site.state.atoms)
    bounds = np.cumsum([0] + [analysis.atoms.sizes[leaf] for leaf in leaves])
    covering = [leaf for leaf, start, stop in zip(leaves, bounds, bounds[1:]) if low <= start and stop <= high]
    if len(covering) != 1 or analysis.atoms.sizes[covering[0]] != high - low:
        return f"subspace [{low}, {high}) is not one channel group"
    return groups[analysis.atoms.find(covering[0])]


def _writers_site(analysis: Analysis, chain: Chain) -> Site | str:
    """The first writer's producer site, when every writer's output channels share its channel groups."""
    sites = [_producer_site(analysis, writer) for writer in chain.writers]
    if any(site is None for site in sites):
        return "a writer has no channel group"
    roots = [{analysis.atoms.find(leaf) for leaf in analysis.atoms.leaves(site.state.atoms)} for site in sites]
    if any(other != roots[0] for other in roots[1:]):
        return "the writers' channels are not one channel group"
    return sites[0]


def _subspace_groups(analysis: Analysis, chain: Chain) -> dict[int, int] | str:
    """Group root of each subspace (by index), or why the chain's groups cannot be pruned."""
    site = _writers_site(analysis, chain)
    if isinstance(site, str):
        return site
    groups = {g.root: g for g in analysis.groups()}
    tied = chain.heads > 1  # heads share one group: the same coordinates are kept in every head
    found: dict[int, int] = {}
    for index, (low, high) in enumerate(chain.subspaces):
        group = _covering_group(analysis, groups, site, low, high)
        if isinstance(group, str):
            return group
        if not group.prunable or (group.root in found.values() and not tied):
            return f"subspace [{low}, {high}): {group.describe()['reason'] or 'coupled with another subspace'}"
        found[index] = group.root
    if tied and len(set(found.values())) != 1:
        return "attention heads are not coupled into one group"
    return found


def _zscore_kept(energy: np.ndarray, cutoff: float) -> np.ndarray:
    amplitude = np.sqrt(np.maximum(energy, 0.0))
    spread = float(amplitude.std())
    if spread == 0.0:
        return np.arange(amplitude.size)
    kept = np.flatnonzero((amplitude - amplitude.mean()) / spread >= cutoff)
    return kept if kept.size else np.array([int(np.argmax(amplitude))])


def _group_energies(analysis: Analysis, chains: list[Chain], energies: list[list[np.ndarray]],
                    result: PassResult) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per group: the energy of each rotated coordinate, and how many times the group's channels occur in
    its producer (heads: coordinate j's energy summed over the heads); chains that cannot be pruned are
    recorded in `result.skipped`."""
    energy_of: dict[int, np.ndarray] = {}
    copies: dict[int, int] = {}
    for chain, chain_energies in zip(chains, energies):
        roots = _subspace_groups(analysis, chain)
        if isinstance(roots, str):
            result.skipped.append(f"{chain.producer.name}: not pruned, {roots}")
            continue
        for index, root in roots.items():
            energy_of[root] = energy_of.get(root, 0.0) + np.maximum(chain_energies[index], 0.0)
            copies[root] = copies.get(root, 0) + 1
    return energy_of, copies


def _kept(kind: str, value: float, energy_of: dict[int, np.ndarray], orderings: dict[int, Ordering],
          model: CostModel, round_to: dict[int, int]) -> tuple[dict[int, np.ndarray], dict[str, float]]:
    """Kept rotated coordinates per group under the budget `kind` = `value`, and that decision."""
    if kind == "zscore":
        return {root: _zscore_kept(energy, value) for root, energy in energy_of.items()}, {kind: value}
    keep = value if kind == "keep_variance" else variance_for_target(orderings, model, value, round_to)
    chosen = counts(orderings, keep, round_to)
    if kind in TARGETS:
        chosen = fill(chosen, orderings, model, value, round_to)
    return {root: np.arange(count) for root, count in chosen.items()}, {kind: value, "retained_variance_cut": keep}


def _cut(graph: gs.Graph, ctx: PassContext, analysis: Analysis, kept: dict[int, np.ndarray],
         result: PassResult) -> dict[str, int]:
    """Drop the trailing coordinates `kept` leaves out, with SNP's reconstruction unless --no-cob-reconstruct:
    refitted to the original model (graphopt.passes.snp.correct) where the run has calibration data, else
    each reader's own fit; returns how many consumers were folded and refitted."""
    if not ctx.option("cob_reconstruct", True):
        apply_kept(graph, analysis, kept)
        return {}
    sites = linear_consumers(analysis, int(ctx.option("snp_max_features", SNP_MAX_FEATURES)), result)
    if reconstruct_target(ctx) == "original":  # every consumer: downstream ones see the cut's error too
        folded, corrected = prune_error_corrected(graph, ctx, analysis, sites, consumer_statistics(ctx, graph, sites),
                                                  kept)
        return {"consumers_reconstructed": folded + corrected, "consumers_error_corrected": corrected}
    sites = [site for site in sites
             if any(analysis.atoms.find(leaf) in kept for leaf in analysis.atoms.leaves(site.state.atoms))]
    with single_threaded_blas():
        folded = prune_reconstructed(graph, analysis, sites, consumer_statistics(ctx, graph, sites), kept, True)
    return {"consumers_reconstructed": folded}


def _history(analysis: Analysis, kept: dict[int, np.ndarray], orderings: dict[int, Ordering],
             copies: dict[int, int], decision: dict[str, float]) -> list[dict]:
    """One entry per cut group; indices are rotated coordinates (the basis this pass folded in), scores
    each coordinate's share of its subspace's energy (summed over heads)."""
    groups = {g.root: g for g in analysis.groups()}
    return [removal(groups[root], "cob", indices, "rotated_energy", orderings[root].fraction, basis="rotated",
                    retained=float(orderings[root].fraction[indices].sum()), **decision,
                    **({"heads": copies[root]} if copies[root] > 1 else {}))
            for root, indices in sorted(kept.items())]


def _prune(graph: gs.Graph, ctx: PassContext, chains: list[Chain], energies: list[list[np.ndarray]],
           kind: str, value: float, result: PassResult) -> tuple[int, float, dict[str, float]]:
    """Drop trailing rotated coordinates; returns (channels removed, estimated MAC ratio, latency budget stats)."""
    analysis, per_node = analyse(graph, ctx)
    energy_of, copies = _group_energies(analysis, chains, energies, result)
    orderings = {root: Ordering(np.arange(energy.size), energy / max(float(energy.sum()), 1e-300))
                 for root, energy in energy_of.items()}
    model = MacModel(analysis, per_node, set(orderings))
    round_to = pass_multiples(ctx.option("round_to"), [g for g in analysis.groups() if g.root in orderings],
                              ctx.option("device"))
    budget = channel_budget(graph, ctx, analysis, model, round_to) if kind in TARGETS else None
    cost = budget.model if budget else model
    blocks = round_to  # before any relaxation
    sizes = unit_counts(orderings)
    value = _graph_fraction(ctx, kind, value)
    (kept, decision), round_to = coarsest_meeting(
        ctx.option("round_to") if kind in TARGETS else None, round_to,
        lambda step: _kept(kind, value, energy_of, orderings, cost, step),
        lambda planned: cost_ratio(cost, {root: idx.size for root, idx in planned[0].items()}), value, sizes)
    kept = {root: indices for root, indices in kept.items() if indices.size < orderings[root].order.size}
    result.history = _history(analysis, kept, orderings, copies, decision)
    folded = _cut(graph, ctx, analysis, kept, result)
    removed = sum((sizes[root] - indices.size) * copies[root] for root, indices in kept.items())
    counts = {root: (kept[root].size if root in kept else sizes[root]) for root in sizes}
    return (removed, model.ratio(counts) / ctx.macs_scale,
            {**(budget.stats(counts) if budget else {}), **multiple_stats(round_to, blocks),
             **budget_restore_stats(budget, counts, sizes, round_to, ctx.macs_scale), **folded})


def _fold_rotations(graph: gs.Graph, chains: list[Chain], rotations: list[tuple[np.ndarray, list[np.ndarray]]]) -> int:
    """Fold each chain's rotation (the identity is left out); returns how many were folded."""
    rotated = 0
    for chain, (rotation, _) in zip(chains, rotations):
        if not np.array_equal(rotation, np.eye(rotation.shape[0])):
            fold(graph, chain, rotation)
            rotated += 1
    return rotated


def _graph_fraction(ctx: PassContext, kind: str, value: float) -> float:
    """A MAC target (a fraction of the model given) as a fraction of the graph this pass sees."""
    return value * ctx.macs_scale if kind == "target_macs" else value


def _open_post_norms(graph: gs.Graph, ctx: PassContext, kind: str | None) -> int:
    """With a budget, open post-norm shortcuts (graphopt.passes.cob.postnorm; without one they would only add
    MACs); the MACs they add lower `ctx.macs_scale`, so every budget after them stays a fraction of the given
    model."""
    shortcuts = open_post_norms(graph) if kind is not None else []
    if shortcuts:
        # count_cost infers the shapes it needs (with the inputs fixed), as graphopt.passes.channels.magnitude.analyse
        per_node = count_cost(ir.export_model(graph, ctx.template, infer=False), ctx.input_shapes,
                              sample=ctx.sample).per_node
        added = sum(per_node.get(node.name, 0) for node in shortcuts)
        total = float(sum(per_node.values()))
        ctx.macs_scale *= (total - added) / total if total else 1.0
        log.info("cob: %d post-norm shortcuts opened (%.1f%% of the MACs)", len(shortcuts), 100.0 * added / max(total, 1.0))
    return len(shortcuts)


def _deferred(ctx: PassContext, name: str, kind: str | None) -> bool:
    """Whether a later method of the pipeline spends this budget (CoB then only rotates)."""
    later = ctx.runs_after(name)
    deferred = kind in SHARED_BUDGETS and any(method in SHARES_BUDGET for method in later)
    if deferred:
        log.info("cob: rotations only; the %s budget is spent by %s on the rotated coordinates", kind, ",".join(later))
    return deferred


@register
class ChangeOfBasisPruning(Pass):
    name = "cob"
    kind = "method"
    through_quantized = True
    description = "change-of-basis pruning: PCA / L1-PCA rotations folded into weights (TSRA, RMS norm), then pruning"
    # chains are found on inferred shapes; a BatchNorm left between producer and consumers breaks a chain
    requires = READS_FOLDED_WEIGHTS
    preserves = CHANGES_CHANNELS

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        kind, value = _budget(ctx)
        method = ctx.option("rotation", "pca")
        if method not in ("pca", "l1pca"):
            raise OptionError(f"--rotation must be pca or l1pca, got {method}")
        unfused = unfuse_norms(graph)
        rms, tsra = canonicalise(graph)
        opened = _open_post_norms(graph, ctx, kind)
        centred = centre_layer_norms(graph)
        gains = fold_gains(graph)
        chains, reasons = find_chains(graph)
        result = PassResult(modified=sum((unfused, rms, tsra, opened, centred, gains)) > 0,
                            skipped=reasons + layers_left_alone(graph))
        rotations, stats = _rotations(ctx, graph, chains, method) if chains else ([], {})
        rotated = _fold_rotations(graph, chains, rotations)
        _know_rotated(ctx, graph, chains, rotations, stats)
        log.info("cob: %d chains, %d rotated (%s)", len(chains), rotated, method)
        removed, ratio, budget_stats = 0, 1.0, {}
        deferred = _deferred(ctx, self.name, kind)
        if kind is not None and chains and not deferred:
            removed, ratio, budget_stats = _prune(graph, ctx, chains, [e for _, e in rotations], kind, float(value), result)
        result.modified = result.modified or bool(rotated or removed)
        result.stats = {"fused_norms_split": unfused, "rms_norms_recognised": rms, "layer_norms_centred": centred,
                        "post_norm_shortcuts": opened,
                        "rms_gains_folded": gains,
                        "tsra_recognised": tsra,
                        "chains": len(chains),
                        "residual_groups": sum(len(chain.writers) > 1 for chain in chains), "chains_rotated": rotated, "chains_illegal": len(reasons), "channels_removed": removed,
                        "estimated_macs_ratio": ratio, "budget_deferred": int(deferred), **budget_stats}
        return result


@dataclass
class CobOptions(Rounding, KeepVariance, Seeded, Reconstruction, StatisticsOptions):
    cob_reconstruct: bool = option(True, flag="--no-cob-reconstruct", on_flag="--cob-reconstruct",
                                   help="cob: drop the pruned rotated coordinates without folding SNP's "
                                        "least-squares reconstruction of them into their readers (by default "
                                        "it is folded)")
    rotation: str = option("pca", choices=("pca", "l1pca"), help="cob: rotation from calibration data (PCA of the "
                                                                 "Gram, or L1-PCA by sign-power iteration)")
    zscore: float | None = option(None, metavar="Z", help="cob: keep rotated coordinates whose amplitude z-score "
                                                          "within their subspace is >= Z")
    l1pca_rows: int = option(4096, cli=False, help="L1-PCA: activation rows sampled per tensor read")
    l1pca_iterations: int = option(30, cli=False, help="L1-PCA: fixed-point steps per restart and component")


COB = register_method(Method(ChangeOfBasisPruning.name, ChangeOfBasisPruning.description, needs_data=True,
                             passes=(ChangeOfBasisPruning.name,), options=CobOptions))

"""Dead and constant unit elimination: remove channels that cannot change any output.

Over the channel groups of graphopt.analysis.groups (only whole groups shrink, so a channel of a
residual stream goes only if it is removable in every member):

- dead: every consumer weight slice that reads the channel is zero (for an LSTM/GRU/RNN hidden unit, its
  column of R too). Removing it is exact.
- constant: every producer weight slice that writes it is zero, so it holds its bias, mapped through the
  per-channel ops between producer and consumer (graphopt.analysis.constant_flow evaluates those it
  can, exactly). Each consumer gets W[:, c] * value (summed over kernel taps; times alpha for Gemm)
  added to its bias, then the channel is removed. Exact everywhere except where a consumer pads the
  channel with zeros (Conv with padding, ConvTranspose): there the constant is folded only when it is 0.

Channels of a group read by a two-variable MatMul (attention) or by a ReduceSum/ReduceMean over the
channel axis are never treated as dead: those reads have no weight to inspect (nor a bias to fold into).
A group keeps at least one channel; a group whose channels go in whole runs (GroupNorm's groups) loses only
runs removable whole, and keeps at least one. The pass repeats until nothing changes (a
removal can make units of the next layer constant), so running it twice changes nothing the second time.
Every constant channel left in place is reported with the reason, every removed one in the history
("dead" or "constant", in its group's numbering before the pass: later rounds map back through earlier cuts).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import AtomTable
from graphopt.analysis.groups import Analysis, Group, Site
from graphopt.analysis.macs import RECURRENT
from graphopt.analysis.state import group_key
from graphopt.ir import graph as ir
from graphopt.passes.base import CHANGES_CHANNELS, READS_WEIGHTS, Pass, PassContext, PassResult, register
from graphopt.passes.channels.consumer_shift import Shifts, add_shift, apply_with_shifts, consumer_shift
from graphopt.passes.channels.engine import removal
from graphopt.analysis.constant_flow import channel_constants
from graphopt.analysis.constants import agree, leaf_positions, nonzero_rows
from graphopt.analysis.registry import Values
from graphopt.passes.channels.magnitude import analyse
from graphopt.passes.methods import Method, register_method

log = logging.getLogger(__name__)

MAX_ROUNDS = 32


def _zero_channels(a: Analysis, groups: dict[int, Group], roles: tuple[str, ...]) -> dict[int, np.ndarray]:
    """Per root: channels whose every weight slice of a site in `roles` is zero (roots without such sites
    absent). A grouped convolution's input piece is read by every group at its own offset, so a channel of
    the piece is unread only where the weight's column is zero for the outputs of every group."""
    zero: dict[int, np.ndarray] = {}
    for site in a.sites:
        if site.kind != "weight" or site.role not in roles or (site.role == "producer" and site.node.op in RECURRENT):
            continue  # a recurrent layer's zero input rows do not make its units constant
        live = nonzero_rows(np.asarray(site.node.inputs[site.index].values), site.axis)
        for root, positions in leaf_positions(a.atoms, site.state):
            if root in groups:
                dead = ~np.any(live[positions], axis=1)
                zero[root] = dead & zero[root] if root in zero else dead
    return zero


def _producer_values(a: Analysis, groups: dict[int, Group]) -> dict[str, Values]:
    """The constant each producer writes on channels whose weights it zeroed (NaN where it does not)."""
    values: dict[str, Values] = {}
    for site in a.sites:
        if site.kind != "weight" or site.role != "producer" or site.node.op in RECURRENT:
            continue
        node = site.node
        live = nonzero_rows(np.asarray(node.inputs[site.index].values), site.axis)
        bias = np.zeros(live.size)
        if node.op != "MatMul" and len(node.inputs) > 2 and node.inputs[2].name:
            stored = np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1)
            scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            bias = scale * (np.full(live.size, stored[0]) if stored.size == 1 else stored)
        written: Values = {}
        for root, positions in leaf_positions(a.atoms, site.state):
            if root in groups:
                agree(written, root, np.where(live[positions[:, 0]], np.nan, bias[positions[:, 0]]))
        values[node.name] = written
    return values


def _pads_with_zeros(node: gs.Node) -> bool:
    if node.op == "ConvTranspose":
        return True
    return any(node.attrs.get("pads", [])) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")


def _bilinear_roots(a: Analysis) -> set[int]:
    roots: set[int] = set()
    for node in a.graph.nodes:
        if node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs):
            for tensor in node.inputs:
                state = a.state(tensor)
                if state is not None:
                    roots |= {root for root, _ in leaf_positions(a.atoms, state)}
    return roots


def _weightless_readers(a: Analysis) -> dict[int, str]:
    """Roots read without a weight to inspect or a bias to fold into, with what reads them."""
    readers = {root: "a reduction over its channels" for site in a.sites if site.kind == "reduce"
               for root, _ in leaf_positions(a.atoms, site.state)}
    readers.update((root, "a two-variable MatMul") for root in _bilinear_roots(a))
    return readers


def _consumer_sites(a: Analysis, root: int) -> list[tuple[Site, np.ndarray]]:
    return [(site, positions) for site in a.sites if site.kind == "weight" and site.role == "consumer"
            for leaf_root, positions in leaf_positions(a.atoms, site.state) if leaf_root == root]


def _why_kept(site: Site, value: np.ndarray, ops: set[str] | None) -> str:
    """Why constant channels whose values are `value` where `site` reads them cannot be folded there."""
    if np.any(np.isfinite(value)):
        return f"zero padding in {site.node.op} and a nonzero constant"
    if ops:
        return f"value not evaluated through {', '.join(sorted(ops))}"
    return "the channels coupled with it (across heads or reshapes) hold different constants"


def _foldable(root: int, constant: np.ndarray, dead: np.ndarray, grouped: set[int], result: PassResult) -> np.ndarray:
    """The constant channels of a group that may be folded into its consumers: none where a grouped
    convolution reads the group (no per-group bias fold), reported unless they are dead anyway."""
    if root not in grouped:
        return constant.copy()
    if np.any(constant & ~dead):
        result.skipped.append(f"group {root}: {int(np.sum(constant & ~dead))} constant channels kept: read by a "
                              f"grouped convolution")
    return np.zeros_like(constant)


def _whole_runs(mask: np.ndarray, run: int) -> np.ndarray:
    """`mask` left with only the whole runs of `run` channels it covers (a group whose channels go in runs)."""
    return np.repeat(mask.reshape(-1, run).all(axis=1), run) if run > 1 else mask


Plan = tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[str, Values]]


def _plan(a: Analysis, groups: dict[int, Group], result: PassResult) -> Plan:
    """Per root: channels to remove, those among them to fold, and the known constants by tensor."""
    dead_out = _zero_channels(a, groups, ("consumer", "grouped", "recurrent"))
    dead_in = _zero_channels(a, groups, ("producer",))
    grouped = {root for site in a.sites if site.role == "grouped" for root, _ in leaf_positions(a.atoms, site.state)}
    unsupported: dict[int, set[str]] = {}
    known = channel_constants(a, a.graph, _producer_values(a, groups), unsupported)
    weightless = _weightless_readers(a)
    removed, folded = {}, {}
    for root, group in groups.items():
        if root not in dead_out:
            continue  # no consumer weights read this group: nothing to inspect
        if root in weightless:
            if np.any(dead_out[root]) or np.any(dead_in.get(root, False)):
                result.skipped.append(f"group {root}: read by {weightless[root]}, zero units left alone")
            continue
        foldable = _foldable(root, dead_in.get(root, np.zeros(group.size, bool)), dead_out[root], grouped, result)
        for site, _ in _consumer_sites(a, root):
            value = known.get(site.node.inputs[0].name, {}).get(root, np.full(group.size, np.nan))
            ok = np.isfinite(value) & ((value == 0) | (not _pads_with_zeros(site.node)))
            lost = foldable & ~ok & ~dead_out[root]
            if np.any(lost):
                result.skipped.append(f"group {root}: {int(lost.sum())} constant channels kept at "
                                      f"{site.node.name}: {_why_kept(site, value[lost], unsupported.get(root))}")
            foldable &= ok
        remove = _whole_runs(dead_out[root] | foldable, group.granule)
        if remove.all():
            first = (np.argmax(dead_out[root]) if dead_out[root].any() else 0) // group.granule * group.granule
            remove[first:first + group.granule] = False
        if remove.any():
            removed[root] = remove
            folded[root] = remove & foldable & ~dead_out[root]
    return removed, folded, known


def _shifts(a: Analysis, folded: dict[int, np.ndarray], known: dict[str, Values]) -> Shifts:
    """Bias shift of every consumer that reads a removed constant channel (full output length): each
    consumer folds the value the channel has where that consumer reads it."""
    shifts: Shifts = {}
    for site in a.sites:
        if site.kind != "weight" or site.role != "consumer":
            continue
        features = a.size(site.state) * site.state.factor
        value = np.zeros(features)
        for root, positions in leaf_positions(a.atoms, site.state):
            if root in folded and folded[root].any():
                constant = known[site.node.inputs[0].name][root]
                value[positions] = np.where(folded[root], constant, 0.0)[:, None]
        if not np.any(value):
            continue
        add_shift(shifts, site.node, consumer_shift(site, value))
    return shifts


class _Removals:
    """Channels removed per group over the rounds, numbered as before the pass. A group is named across
    re-analyses by `group_key` (a group always keeps a channel, so its producers stay)."""

    def __init__(self) -> None:
        self.first: dict[tuple[tuple[str, int, int], ...], Group] = {}
        self.origin: dict[tuple[tuple[str, int, int], ...], np.ndarray] = {}  # current index -> index before
        self.reasons: dict[tuple[tuple[str, int, int], ...], dict[int, str]] = {}

    def add(self, atoms: AtomTable, groups: dict[int, Group], removed: dict[int, np.ndarray],
            folded: dict[int, np.ndarray]) -> None:
        for root, mask in removed.items():
            key = group_key(atoms, groups[root])
            if key not in self.first:
                self.first[key], self.origin[key], self.reasons[key] = groups[root], np.arange(mask.size), {}
            origin = self.origin[key]
            self.reasons[key].update({int(origin[i]): "constant" if folded[root][i] else "dead"
                                      for i in np.flatnonzero(mask)})
            self.origin[key] = origin[~mask]

    def history(self) -> list[dict]:
        entries = []
        for key, group in self.first.items():
            gone = self.reasons[key]
            entries.append(removal(group, "dead-units", self.origin[key], "zero_weights",
                                   reasons=[gone[index] for index in sorted(gone)]))
        return sorted(entries, key=lambda entry: entry["group"])


def eliminate(graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
    """Remove dead and constant units until none is left; adds counts to `result.stats` and the removed
    channels to `result.history`."""
    removed_total = folded_total = rounds = 0
    removals = _Removals()
    for rounds in range(1, MAX_ROUNDS + 1):
        ir.cleanup(graph)
        analysis, _ = analyse(graph, ctx)
        groups = {g.root: g for g in analysis.groups() if g.prunable}
        round_result = PassResult(modified=False)
        removed, folded, known = _plan(analysis, groups, round_result)
        if not removed:
            result.skipped.extend(round_result.skipped)
            break
        removals.add(analysis.atoms, groups, removed, folded)
        shifts = _shifts(analysis, folded, known)
        apply_with_shifts(graph, analysis, {root: np.flatnonzero(~mask) for root, mask in removed.items()}, shifts)
        removed_total += sum(int(mask.sum()) for mask in removed.values())
        folded_total += sum(int(mask.sum()) for mask in folded.values())
        result.modified = True
    ir.cleanup(graph)
    result.stats.update({"units_removed": removed_total, "constants_folded": folded_total, "rounds": rounds})
    result.history.extend(removals.history())


@register
class DeadUnitElimination(Pass):
    name = "dead-units"
    kind = "method"
    through_quantized = True
    description = "remove channels with all-zero outgoing weights; fold constant ones (zero incoming) into consumers"
    requires = READS_WEIGHTS
    preserves = CHANGES_CHANNELS

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        eliminate(graph, ctx, result)
        return result


DEAD_UNITS = register_method(Method(DeadUnitElimination.name, DeadUnitElimination.description, needs_data=False,
                                    passes=(DeadUnitElimination.name,)))

"""What channel rules read and write while the graph is walked: channel states per tensor, sites to
rewrite, cost terms, and the channel groups they add up to (see graphopt.analysis.groups)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.channels import AtomTable, ChannelState


@dataclass
class Site:
    """A place to rewrite when the channels of `state` shrink.

    kinds: "weight" (slice constant input `index` along `axis`; `role` producer/consumer/param, or grouped: a
    grouped Conv's weight, whose axis `axis` holds one group's piece of the input, read by every group),
    "split" (recompute split sizes from `outputs`), "slice" (recompute bounds on `axis`),
    "shape" (entry `axis` of the shape constant at input `index`), "group" (depthwise group count),
    "count" (integer attribute `role` = number of kept channels of `state`, e.g. TSRA's split),
    "reduce" (a ReduceSum/ReduceMean over the channel axis `axis`, role "consumer": a linear consumer whose
    weight is a row of ones, or of 1/n; graphopt.passes.channels.reduction gives it that weight).
    "empty" (an optional input `index` that is zero at run time, dropped when the channels shrink: an LSTM's
    zero initial state). Role "recurrent": a weight axis that reads the channels back into the layer that
    writes them (an LSTM/GRU/RNN's R columns read the previous step's outputs): a linear consumer of the
    layer's own output (`reads`), whose unit is not dead while R reads it.
    With `per` > 1 an entry of the site stands for `per` consecutive channels (GroupNorm's per-group scale, its
    group count, a reshape to [N, groups, -1]): it counts, or slices by, the whole runs kept.
    """

    kind: str
    node: gs.Node
    state: ChannelState
    index: int = 0
    axis: int = 0
    role: str = "param"
    outputs: list[ChannelState] = field(default_factory=list)
    per: int = 1

    @property
    def reads(self) -> gs.Tensor:
        """The tensor a consumer's weight reads: its input, or for a recurrent read the layer's output (the
        previous steps' values, whose statistics the output's are)."""
        return self.node.outputs[0] if self.role == "recurrent" else self.node.inputs[0]

    @property
    def groups(self) -> int:
        """How many groups read the state's features (a "grouped" consumer: its Conv's groups; else 1)."""
        return int(self.node.attrs.get("group", 1)) if self.role == "grouped" else 1


@dataclass
class CostTerm:
    """MACs of one node scale with the kept fraction of each listed channel state; `share` of them do (the
    rest, such as a fused attention's q·kᵀ over the tokens, stays)."""

    node: gs.Node
    states: list[ChannelState]
    share: float = 1.0


@dataclass
class Group:
    root: int
    size: int
    sites: list[Site]
    blocked: str | None
    granule: int = 1  # channels go in whole aligned runs of this many (GroupNorm groups)

    @property
    def prunable(self) -> bool:
        return self.blocked is None and any(s.role == "producer" for s in self.sites)

    def describe(self) -> dict[str, Any]:
        members = sorted({f"{s.node.name}:{s.role if s.kind == 'weight' else s.kind}" for s in self.sites})
        described = {"id": self.root, "size": self.size, "prunable": self.prunable,
                     "reason": self.blocked or (None if self.prunable else "no producer weights"),
                     "members": members}
        return {**described, "whole_runs_of": self.granule} if self.granule > 1 else described


def group_key(atoms: AtomTable, group: Group) -> tuple[tuple[str, int, int], ...]:
    """A group's name across re-analyses of an edited graph: its producer weights and which of their pieces it
    holds (a Split or a TSRA cuts one producer's channels into several groups, which share every producer; a
    group that keeps a channel keeps its piece)."""
    return tuple(sorted((site.node.name, site.index, piece) for site in group.sites if site.role == "producer"
                        for piece, leaf in enumerate(atoms.leaves(site.state.atoms)) if atoms.find(leaf) == group.root))


class Analysis:
    """State shared by the rules while walking one graph."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.atoms = AtomTable()
        self.states: dict[str, ChannelState] = {}
        self.sites: list[Site] = []
        self.costs: list[CostTerm] = []
        # tensor -> the channel states it is a statistic over (a reduction over their channel axis, and what
        # is computed from it alone): broadcasting one back onto those channels normalises over them
        self.statistics: dict[str, tuple[ChannelState, ...]] = {}

    # -- states -------------------------------------------------------------------------------
    def state(self, tensor: gs.Tensor) -> ChannelState | None:
        return self.states.get(tensor.name) if tensor.name else None

    def set_state(self, tensor: gs.Tensor, state: ChannelState | None) -> None:
        if state is not None and tensor.name:
            self.states[tensor.name] = state

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def size(self, state: ChannelState) -> int:
        return self.atoms.total(self.atoms.leaves(state.atoms))

    def new_state(self, axis: int, size: int) -> ChannelState:
        return ChannelState(axis, (self.atoms.new(size),))

    # -- coupling and recording ---------------------------------------------------------------
    def block(self, state: ChannelState | None, reason: str) -> None:
        if state is not None:
            self.atoms.block(state.atoms, reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.block(self.state(tensor), f"{node.name} ({node.op}): {reason}")

    def in_runs(self, state: ChannelState, run: int, where: gs.Node) -> bool:
        """Make `state`'s channels go in whole aligned runs of `run` (a normalisation over groups of channels);
        False, with the group blocked, where an atom boundary falls inside a run."""
        offset = 0
        for leaf in self.atoms.leaves(state.atoms):
            if offset % run or self.atoms.sizes[leaf] % run:
                self.block(state, f"{where.name} ({where.op}): a group of {run} channels it normalises together "
                                  f"spans channels pruned independently")
                return False
            offset += self.atoms.sizes[leaf]
        for leaf in self.atoms.leaves(state.atoms):
            self.atoms.set_granule(leaf, run)
        return True

    def unify(self, first: ChannelState, second: ChannelState, where: gs.Node) -> bool:
        if first.factor != second.factor or not self.atoms.unify(first.atoms, second.atoms):
            reason = f"{where.name} ({where.op}): merges channel layouts that do not line up"
            self.block(first, reason)
            self.block(second, reason)
            return False
        return True

    def coupled(self, first: ChannelState, second: ChannelState) -> bool:
        """Whether the two states share a channel group."""
        roots = {self.atoms.find(leaf) for leaf in self.atoms.leaves(first.atoms)}
        return any(self.atoms.find(leaf) in roots for leaf in self.atoms.leaves(second.atoms))

    def statistic_over(self, tensor: gs.Tensor, state: ChannelState) -> bool:
        """Whether `tensor` is a statistic over channels coupled with `state`'s."""
        return any(self.coupled(source, state) for source in self.statistics.get(tensor.name, ()))

    def site(self, kind: str, node: gs.Node, state: ChannelState, **extra: Any) -> None:
        self.sites.append(Site(kind, node, state, **extra))

    def cost(self, node: gs.Node, *states: ChannelState | None, share: float = 1.0) -> None:
        self.costs.append(CostTerm(node, [s for s in states if s is not None], share))

    # -- results ------------------------------------------------------------------------------
    def leaf_sites(self) -> dict[int, list[Site]]:
        by_root: dict[int, list[Site]] = {}
        for site in self.sites:
            for state in (site.state, *site.outputs):
                for leaf in self.atoms.leaves(state.atoms):
                    bucket = by_root.setdefault(self.atoms.find(leaf), [])
                    if not bucket or bucket[-1] is not site:
                        bucket.append(site)
        return by_root

    def groups(self) -> list[Group]:
        by_root = self.leaf_sites()
        roots = sorted({self.atoms.find(leaf) for state in self.states.values()
                        for leaf in self.atoms.leaves(state.atoms)} | set(by_root))
        return [Group(root, self.atoms.sizes[root], by_root.get(root, []), self.atoms.blocked.get(root),
                      self.atoms.granule.get(root, 1)) for root in roots]



def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

"""Channel atoms: the index spaces that structured pruning shrinks.

Every producer (Conv, Gemm, MatMul with a constant weight, ...) creates an *atom*: a run of `size`
channel indices. The channel axis of a tensor is described by a `ChannelState`: which axis, the list of
atoms laid end to end along it (Concat appends lists; a head reshape repeats one atom H times), and a
`factor` (features per channel after Flatten, e.g. H*W).

Two coupling operations keep the description consistent:
- `refine(atom, cuts)`: Split/Slice cut an atom; it becomes child atoms, and so does every atom
  coupled with it, at the same offsets, so coupled atoms always have identical layouts.
- `union(a, b)`: merges (residual Add, SE Mul, q/k contraction) couple two equal-size leaf atoms
  index by index; a union-find keeps the classes. A class is one *channel group*: pruning keeps the
  same indices of every member atom.

A class may be blocked (a graph output, an op without a rule, a normalisation over channels, ...);
the first reason is kept and the class is never pruned. A class may also have a *granule* k: its channels
go in whole aligned runs of k (GroupNorm's groups, whose statistics would change if a group lost part of
its channels), so a cut keeps whole runs and counts stay multiples of k. Coupling two classes keeps the
least common multiple of their granules; a refinement that cuts through a run blocks the pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChannelState:
    axis: int
    atoms: tuple[int, ...]
    factor: int = 1


@dataclass
class AtomTable:
    sizes: list[int] = field(default_factory=list)
    children: dict[int, list[int]] = field(default_factory=dict)
    parent: dict[int, int] = field(default_factory=dict)
    members: dict[int, list[int]] = field(default_factory=dict)
    blocked: dict[int, str] = field(default_factory=dict)
    granule: dict[int, int] = field(default_factory=dict)

    def new(self, size: int) -> int:
        atom = len(self.sizes)
        self.sizes.append(size)
        self.parent[atom] = atom
        self.members[atom] = [atom]
        return atom

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def leaves(self, atoms: tuple[int, ...] | list[int]) -> list[int]:
        out: list[int] = []
        stack = list(reversed(atoms))
        while stack:
            atom = stack.pop()
            if atom in self.children:
                stack.extend(reversed(self.children[atom]))
            else:
                out.append(atom)
        return out

    def total(self, atoms: tuple[int, ...] | list[int]) -> int:
        return sum(self.sizes[a] for a in atoms)

    def block(self, atoms: tuple[int, ...] | list[int], reason: str) -> None:
        for leaf in self.leaves(atoms):
            self.blocked.setdefault(self.find(leaf), reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            raise AssertionError("union of atoms with different sizes")
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))
        reason = self.blocked.pop(rb, None)
        if reason is not None:
            self.blocked.setdefault(ra, reason)
        granule = self.granule.pop(rb, None)
        if granule is not None:
            self.set_granule(ra, granule)

    def set_granule(self, atom: int, granule: int) -> None:
        """Atom `atom`'s class keeps its channels in whole aligned runs of `granule` (with any it had: their least
        common multiple); a class whose size is not a multiple of it is blocked."""
        root = self.find(atom)
        merged = math.lcm(self.granule.get(root, 1), granule)
        if merged > 1:
            self.granule[root] = merged
        if self.sizes[root] % merged:
            self.blocked.setdefault(root, f"channel groups in whole runs of {merged} (GroupNorm) do not fit "
                                          f"{self.sizes[root]} channels")

    def refine(self, leaf: int, cuts: list[int]) -> None:
        """Cut a leaf atom (and every atom coupled with it) at the given interior offsets."""
        cuts = sorted({c for c in cuts if 0 < c < self.sizes[leaf]})
        if not cuts:
            return
        bounds = [0, *cuts, self.sizes[leaf]]
        root = self.find(leaf)
        reason = self.blocked.pop(root, None)
        granule = self.granule.pop(root, 1)
        split_members = []
        for member in self.members.pop(root):  # every member becomes internal; its pieces form new classes
            pieces = [self.new(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
            self.children[member] = pieces
            split_members.append(pieces)
        for pieces in split_members[1:]:
            for first, other in zip(split_members[0], pieces):
                self.union(first, other)
        self._inherit(split_members[0], reason, granule, cuts)

    def _inherit(self, pieces: list[int], reason: str | None, granule: int, cuts: list[int]) -> None:
        """The pieces of a refined class take its block reason and its granule; a cut through a run blocks them."""
        inside = [cut for cut in cuts if cut % granule]
        if inside and reason is None:
            reason = f"a cut at channel {inside[0]} splits a run of {granule} channels that go together (a GroupNorm " \
                     "group)"
        for piece in pieces:
            if reason is not None:
                self.blocked.setdefault(self.find(piece), reason)
            elif granule > 1:
                self.set_granule(piece, granule)

    def cut_at(self, atoms: tuple[int, ...] | list[int], positions: list[int]) -> list[int]:
        """Refine so that every position in `positions` falls on a leaf boundary; return the leaves."""
        for position in sorted(set(positions)):
            offset = 0
            for leaf in self.leaves(atoms):
                size = self.sizes[leaf]
                if offset < position < offset + size:
                    self.refine(leaf, [position - offset])
                    break
                offset += size
        return self.leaves(atoms)

    def boundaries(self, atoms: tuple[int, ...] | list[int]) -> list[int]:
        offsets, offset = [], 0
        for leaf in self.leaves(atoms):
            offset += self.sizes[leaf]
            offsets.append(offset)
        return offsets

    def unify(self, first: tuple[int, ...], second: tuple[int, ...]) -> bool:
        """Couple two equal-length atom lists index by index; False if their lengths differ."""
        if self.total(self.leaves(first)) != self.total(self.leaves(second)):
            return False
        cuts = self.boundaries(first) + self.boundaries(second)
        while True:  # refining one list can refine the other (they may share classes)
            left, right = self.cut_at(first, cuts), self.cut_at(second, cuts)
            if len(left) == len(right) and all(self.sizes[a] == self.sizes[b] for a, b in zip(left, right)):
                break
            cuts = self.boundaries(first) + self.boundaries(second)
        for a, b in zip(left, right):
            self.union(a, b)
        return True

    def slice(self, atoms: tuple[int, ...], start: int, stop: int) -> tuple[int, ...]:
        """The atoms covering positions [start, stop) after cutting there."""
        leaves = self.cut_at(atoms, [start, stop])
        out, offset = [], 0
        for leaf in leaves:
            if start <= offset and offset + self.sizes[leaf] <= stop:
                out.append(leaf)
            offset += self.sizes[leaf]
        return tuple(out)

"""Float64 accumulators for activation statistics over a channel axis.

A tensor with channel axis c is read as rows: every other axis (samples, spatial positions, tokens)
indexes a row of C channel values, so [N,C,H,W] gives N·H·W rows and [N,T,C] gives N·T rows. With an
attention mask of shape [N,T], a tensor whose rows number exactly N·T in row-major (n, t) order
([N,T,C], [N·T,C], or [N,C,T] with c = 1) keeps only the rows whose mask entry is nonzero; other
tensors keep every row and say so with `masked = False`.

For n rows x_r ∈ R^C the kinds are
  mean      μ = (1/n) Σ x_r
  var       σ² = (1/n) Σ (x_r − μ)²           per channel, population variance
  gram      XᵀX = Σ x_r x_rᵀ (C×C); also the covariance
  abs_mean  (1/n) Σ |x_r|                     per channel
  neg_frac  (1/n) #{r : x_r < 0}              per channel
and the row count n is always kept.

Sampled positions: a tensor with many rows per sample (the positions of a wide feature map) need not
give all of them to its statistics. With `positions` p > 0, each item along axis 0 (a sample) gives the
same p of its R rows (`position_subset`: a fixed uniform draw without replacement, seeded by R and p, so
every batch, run, shard and paired tensor of that shape keeps the same positions), and the statistics are
those of the kept rows: unbiased estimates of the same moments, and every exact linear relation between
channels (a zero or duplicated channel) still holds exactly on them. `sampled_positions` chooses p from
the data's size so that about `rows_per_channel` rows per channel are kept, and keeps every row where
that is not at least twice fewer; token tensors under an attention mask keep every unmasked row.

Memory: rows are taken in blocks of at most CHUNK_ELEMENTS values (`row_blocks`, never a copy of the
whole tensor), so the working set beyond the captured tensor is a few chunks.

Speed: the Gram update is BLAS syrk (the upper triangle only, half a matmul), single-threaded; see
graphopt.calibration.blas.

Numerics: rows are converted to float64 in chunks of at most CHUNK_ELEMENTS values and summed about a
fixed shift K (the first chunk's mean): s = Σ (x − K), S = Σ (x − K)(x − K)ᵀ (only its diagonal
unless gram is asked). Then μ = K + s/n and the centred moment is M = S − s sᵀ/n, which avoids the
cancellation of Σxxᵀ − nμμᵀ when |μ| ≫ σ. Negative counts (neg_frac) are exact integers, kept as
`negatives`; |x| sums are float64.

Merging (`merge`, for statistics of disjoint row sets measured apart, e.g. data shards): rows measured
about shift K' (sums s', S', count n') enter statistics about K with d = K' − K as
  Σ (x − K) = s' + n' d,   Σ (x − K)(x − K)ᵀ = S' + s' dᵀ + d s'ᵀ + n' d dᵀ,
counts, |x| sums and negative counts add. The identity is exact; in floating point the merged
statistics differ from one pass over all rows by summation order only (float64 rounding).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from graphopt.calibration.blas import add_shifted, chunk_gram, symmetric

KINDS = frozenset({"mean", "var", "gram", "abs_mean", "neg_frac"})
CHUNK_ELEMENTS = 1 << 21  # values converted to float64 at once: 16 MiB


@dataclass(frozen=True)
class StatRequest:
    """Statistics `kinds` of `tensor`, reduced over every axis but `channel_axis` (negative counts from the end)."""

    tensor: str
    kinds: frozenset[str] = KINDS
    channel_axis: int = 1

    def __post_init__(self) -> None:
        kinds = frozenset(self.kinds)
        unknown = sorted(kinds - KINDS)
        if unknown or not kinds:
            raise ValueError(f"statistic kinds must be a non-empty subset of {sorted(KINDS)}, got {sorted(kinds)}")
        object.__setattr__(self, "kinds", kinds)


def mask_applies(values: np.ndarray, channel_axis: int, mask: np.ndarray | None) -> bool:
    """Whether `values` has exactly one row per mask entry (see the module docstring)."""
    return mask is not None and mask.size * values.shape[channel_axis] == values.size


def sampled_positions(sample_shape: tuple[int, ...], channel_axis: int, samples: int | None,
                      rows_per_channel: int) -> int:
    """How many rows each item along axis 0 keeps (0: every row) for about `rows_per_channel` rows per
    channel over `samples` samples of shape `sample_shape` (batch 1); see the module docstring."""
    rank = len(sample_shape)
    if rows_per_channel <= 0 or not samples or rank < 3 or channel_axis % rank == 0:
        return 0
    channels = sample_shape[channel_axis % rank]
    items = samples * sample_shape[0]
    per_item = int(np.prod(sample_shape[1:], dtype=np.int64)) // max(channels, 1)
    wanted = rows_per_channel * max(channels, 1)
    if items * per_item < 2 * wanted:
        return 0
    positions = -(-wanted // items)
    return positions if 2 * positions <= per_item else 0


@functools.lru_cache(maxsize=256)
def position_subset(per_item: int, positions: int) -> np.ndarray:
    """The `positions` of an item's `per_item` rows that statistics keep: the same for every batch and run."""
    rng = np.random.default_rng([per_item, positions])
    chosen = np.sort(rng.choice(per_item, size=positions, replace=False))
    chosen.flags.writeable = False
    return chosen


def _sampled(moved: np.ndarray, positions: int) -> np.ndarray:
    """`moved` ([items, ..., C]) as [items, kept, C] with `positions` kept rows per item, where it has more."""
    per_item = int(np.prod(moved.shape[1:-1], dtype=np.int64))
    if moved.ndim < 3 or per_item <= positions:
        return moved
    return moved.reshape(moved.shape[0], per_item, moved.shape[-1])[:, position_subset(per_item, positions)]


def row_blocks(values: np.ndarray, channel_axis: int, mask: np.ndarray | None,
               max_rows: int, positions: int = 0) -> Iterator[np.ndarray]:
    """The (rows, C) matrix of `values`, in row-major blocks of at most `max_rows` rows (one row at
    least); rows whose mask entry is zero are left out when the mask applies, and with `positions` > 0
    (and no mask) each item along axis 0 gives only those of its rows (see the module docstring). Each
    block is a view or a copy of at most its own size, so no copy of the whole tensor is made (the
    sampled rows are one copy of what they keep)."""
    keep = mask.reshape(-1) != 0 if mask is not None and mask_applies(values, channel_axis, mask) else None
    moved = np.moveaxis(values, channel_axis, -1)
    if positions > 0 and keep is None:
        moved = _sampled(moved, positions)
    offset = 0
    for block in _blocks(moved, max(1, max_rows)):
        if keep is not None:
            selected = keep[offset:offset + block.shape[0]]
            offset += block.shape[0]
            block = block[selected]
        yield block


def _blocks(moved: np.ndarray, max_rows: int) -> Iterator[np.ndarray]:
    channels = moved.shape[-1]
    if moved.ndim <= 2:
        rows = moved.reshape(-1, channels)
        for start in range(0, rows.shape[0], max_rows):
            yield rows[start:start + max_rows]
        return
    per_item = int(np.prod(moved.shape[1:-1]))
    if per_item > max_rows:  # one item is too large: split it along its own leading axis
        for item in moved:
            yield from _blocks(item, max_rows)
        return
    step = max_rows // per_item
    for start in range(0, moved.shape[0], step):
        yield moved[start:start + step].reshape(-1, channels)


def channel_rows(values: np.ndarray, channel_axis: int, mask: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """All of `values` as one (rows, C) matrix, and whether `mask` selected the rows."""
    blocks = list(row_blocks(values, channel_axis, mask, values.size or 1))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks), mask_applies(values, channel_axis, mask)


def chunk_rows(channels: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, channels))


@dataclass(frozen=True)
class Spilled:
    """A final accumulator kept in a .npy file (TensorStats.spill), read back for each use."""

    path: Path
    shape: tuple[int, ...]
    nbytes: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        return np.load(self.path)


@dataclass(eq=False)  # arrays inside: compare with to_arrays()
class TensorStats:
    """Running statistics of one tensor; see the module docstring for the maths."""

    tensor: str
    kinds: frozenset[str]
    channel_axis: int  # non-negative, of a tensor of rank `rank`
    rank: int
    channels: int
    masked: bool = False
    count: int = 0
    shift: np.ndarray | None = None
    shifted_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    shifted_square: np.ndarray = field(default_factory=lambda: np.zeros(0))
    positions: int = 0  # rows kept per item along axis 0 (sampled_positions); 0: every row
    abs_sum: np.ndarray | None = None
    negatives: np.ndarray | None = None

    @classmethod
    def empty(cls, tensor: str, kinds: frozenset[str], channel_axis: int, rank: int, channels: int,
              masked: bool = False, positions: int = 0) -> TensorStats:
        """Empty statistics; `positions` applies to Grams only (the other kinds cost one pass over the rows)."""
        square_shape = (channels, channels) if "gram" in kinds else (channels,)
        return cls(tensor, frozenset(kinds), channel_axis, rank, channels, masked,
                   shifted_sum=np.zeros(channels), shifted_square=np.zeros(square_shape, order="F"),
                   positions=positions if "gram" in kinds else 0,
                   abs_sum=np.zeros(channels) if "abs_mean" in kinds else None,
                   negatives=np.zeros(channels, dtype=np.int64) if "neg_frac" in kinds else None)

    @property
    def has_gram(self) -> bool:
        return self.shifted_square.ndim == 2

    def spill(self, folder: Path) -> None:
        """Move the final Gram accumulator to a file in `folder`: each later use reads it back, so the Grams of
        many tensors need not stay in memory together. Spilled statistics take no more rows."""
        if isinstance(self.shifted_square, Spilled) or not self.has_gram:
            return
        path = folder / f"{len(list(folder.iterdir()))}.npy"
        np.save(path, symmetric(self.shifted_square))
        self.shifted_square = Spilled(path, self.shifted_square.shape, self.shifted_square.nbytes)

    def _square(self) -> np.ndarray:
        square = self.shifted_square
        return square.load() if isinstance(square, Spilled) else square

    def covers(self, request: StatRequest) -> bool:
        """Whether these statistics answer `request` (same axis, at least its kinds); names are not compared."""
        in_range = -self.rank <= request.channel_axis < self.rank
        return in_range and request.channel_axis % self.rank == self.channel_axis and request.kinds <= self.kinds

    def update(self, rows: np.ndarray) -> None:
        """Add a (rows, C) block of any float dtype, in float64 chunks."""
        if isinstance(self.shifted_square, Spilled):
            raise ValueError(f"statistics of '{self.tensor}' are final (spilled to disk): they take no more rows")
        if rows.ndim != 2 or rows.shape[1] != self.channels:
            raise ValueError(f"'{self.tensor}': expected rows of {self.channels} channels, got {rows.shape}")
        step = chunk_rows(self.channels)
        for start in range(0, rows.shape[0], step):
            self._update_chunk(rows[start:start + step])

    def _update_chunk(self, chunk: np.ndarray) -> None:
        if chunk.shape[0] == 0:
            return
        if self.abs_sum is not None:
            self.abs_sum += np.abs(chunk).sum(axis=0, dtype=np.float64)
        if self.negatives is not None:
            self.negatives += np.count_nonzero(chunk < 0, axis=0)
        if self.shift is None:
            self.shift = chunk.mean(axis=0, dtype=np.float64)
        self.count += chunk.shape[0]
        if self.has_gram:
            self.shifted_sum += chunk_gram(self.shifted_square, chunk, self.shift)
            return
        centred = np.subtract(chunk, self.shift, dtype=np.float64)
        self.shifted_sum += centred.sum(axis=0)
        self.shifted_square += np.einsum("ij,ij->j", centred, centred)

    def merge(self, other: TensorStats) -> None:
        """Add the statistics of other rows of the same tensor, in place (see the module docstring)."""
        if isinstance(self.shifted_square, Spilled) or isinstance(other.shifted_square, Spilled):
            raise ValueError(f"statistics of '{self.tensor}' are final (spilled to disk): they merge no more")
        if (other.kinds, other.channel_axis, other.channels, other.has_gram, other.positions) != \
                (self.kinds, self.channel_axis, self.channels, self.has_gram, self.positions):
            raise ValueError(f"statistics of '{self.tensor}' and '{other.tensor}' were taken differently: "
                             "only statistics of the same kinds, axis, channels and sampled positions merge")
        self.masked = self.masked and other.masked
        if other.count == 0:
            return
        if self.count == 0 or self.shift is None:
            self.shift = np.array(other.shift, dtype=np.float64)
        delta = np.asarray(other.shift, dtype=np.float64) - self.shift
        weighted = other.count * delta
        if self.has_gram:  # both upper triangles are authoritative: add them, then the rank-2 term
            self.shifted_square += other.shifted_square
            add_shifted(self.shifted_square, other.shifted_sum, other.count, delta)
        else:
            self.shifted_square += other.shifted_square + 2.0 * other.shifted_sum * delta + weighted * delta
        self.shifted_sum += other.shifted_sum + weighted
        self.count += other.count
        if self.abs_sum is not None:
            self.abs_sum += other.abs_sum
        if self.negatives is not None:
            self.negatives += other.negatives

    def _centred(self) -> np.ndarray:
        """M = Σ (x − μ)(x − μ)ᵀ (or its diagonal)."""
        if self.count == 0:
            return np.zeros(self.shifted_square.shape)
        square = symmetric(self._square()) if self.has_gram else self._square()
        return square - _outer(self.shifted_sum, self.has_gram) / self.count

    def _need(self, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(f"statistics of '{self.tensor}' were collected without '{kind}' "
                             f"(have {sorted(self.kinds)})")
        if self.count == 0:
            raise ValueError(f"statistics of '{self.tensor}' have no rows")

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0 or self.shift is None:
            return np.zeros(self.channels)
        return self.shift + self.shifted_sum / self.count

    @property
    def var(self) -> np.ndarray:
        self._need("gram" if self.has_gram else "var")
        centred = self._centred()
        return (np.diagonal(centred) if self.has_gram else centred) / self.count

    @property
    def abs_mean(self) -> np.ndarray:
        self._need("abs_mean")
        return self.abs_sum / self.count

    def covariance(self) -> np.ndarray:
        """(1/n) Σ (x − μ)(x − μ)ᵀ, C×C."""
        self._need("gram")
        return self._centred() / self.count

    def gram(self) -> np.ndarray:
        """XᵀX = Σ x xᵀ over all rows, C×C."""
        self._need("gram")
        return self._centred() + self.count * np.outer(self.mean, self.mean)

    def rotated(self, rotation: np.ndarray) -> TensorStats:
        """The statistics of x' = Q x (Q: `rotation`, C×C) over the same rows, exactly: shift, sums and
        Gram rotated (Q K, Q s, Q S Qᵀ). Only the linear kinds carry over (mean, var, gram)."""
        self._need("gram")
        square = rotation @ symmetric(self._square()) @ rotation.T
        return replace(self, kinds=self.kinds & {"mean", "var", "gram"}, shift=rotation @ self.shift,
                       shifted_sum=rotation @ self.shifted_sum, shifted_square=np.asfortranarray(square),
                       abs_sum=None, negatives=None)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"count": np.array(self.count, dtype=np.int64),
                  "shift": self.shift if self.shift is not None else np.zeros(self.channels),
                  "shifted_sum": self.shifted_sum,
                  "shifted_square": symmetric(self._square()) if self.has_gram else self._square()}
        if self.abs_sum is not None:
            arrays["abs_sum"] = self.abs_sum
        if self.negatives is not None:
            arrays["negatives"] = self.negatives
        return arrays

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TensorStats:
        stats = cls.empty(meta["tensor"], frozenset(meta["kinds"]), int(meta["channel_axis"]), int(meta["rank"]),
                          int(meta["channels"]), bool(meta["masked"]), int(meta.get("positions", 0)))
        stats.count = int(arrays["count"])
        stats.shift = np.array(arrays["shift"], dtype=np.float64) if stats.count else None
        stats.shifted_sum = np.array(arrays["shifted_sum"], dtype=np.float64)
        stats.shifted_square = np.array(arrays["shifted_square"], dtype=np.float64, order="F")
        if stats.abs_sum is not None:
            stats.abs_sum = np.array(arrays["abs_sum"], dtype=np.float64)
        if stats.negatives is not None:
            stats.negatives = np.array(arrays["negatives"], dtype=np.int64)
        expected = (stats.channels, stats.channels) if stats.has_gram else (stats.channels,)
        if stats.shifted_square.shape != expected or stats.shifted_sum.shape != (stats.channels,):
            raise ValueError(f"statistics of '{stats.tensor}' have inconsistent array shapes")
        return stats

    def meta(self) -> dict[str, Any]:
        return _meta(self)


def _meta(stats: TensorStats) -> dict[str, Any]:
    return {"tensor": stats.tensor, "kinds": sorted(stats.kinds), "channel_axis": stats.channel_axis,
            "rank": stats.rank, "channels": stats.channels, "masked": stats.masked, "positions": stats.positions}


def _outer(vector: np.ndarray, full: bool) -> np.ndarray:
    return np.outer(vector, vector) if full else vector * vector



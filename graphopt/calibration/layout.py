"""How one input's samples lie in a data array, and how runs of samples become model inputs.

Two layouts are read (graphopt.calibration.data validates them against the model):
- batched: the input's own rank, samples along the input's batch axis wherever it sits (axis 0 of an
  image batch, axis 1 of an RNN state [2, batch, 128] or of a time-major sequence [T, batch, F]; see
  graphopt.ir.shapes.batch_axis); an input with no dynamic axis takes its samples along axis 0;
- stacked: one more axis than the input, samples on that leading axis, each sample shaped as the model
  declares the input. A run of k samples is concatenated along the input's dynamic batch axis (samples
  of s rows each give k*s rows, in sample order), or fed one sample per run when the input has none.
A scalar input given as a scalar is fed unchanged with every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from graphopt.errors import DataError
from graphopt.ir.shapes import InputSpec, batch_axis


@dataclass(frozen=True)
class Layout:
    """Where one input's samples lie in its data array, and how a run of them becomes one model input."""

    sample_axis: int | None  # None: a scalar given once, fed with every batch
    stacked: bool = False  # samples on a leading axis in front of the input's own shape
    merge_axis: int | None = None  # stacked: the batch axis samples are concatenated along; None: one per run

    def count(self, array: np.ndarray) -> int | None:
        return None if self.sample_axis is None else array.shape[self.sample_axis]

    def take(self, array: np.ndarray, index: slice | np.ndarray) -> np.ndarray:
        """The samples `index`, still in the data's layout."""
        if self.sample_axis is None:
            return array
        where: list[slice | np.ndarray] = [slice(None)] * array.ndim
        where[self.sample_axis] = index
        return array[tuple(where)]

    def feed(self, part: np.ndarray) -> np.ndarray:
        """Samples (in the data's layout) as one input of the model."""
        if not self.stacked:
            return part
        if self.merge_axis is None:
            return part[0]
        shape = list(part.shape[1:])
        shape[self.merge_axis] *= part.shape[0]
        return np.moveaxis(part, 0, self.merge_axis).reshape(shape)

    @property
    def model_batch_axis(self) -> int | None:
        """The axis of the fed input that holds the samples."""
        return self.merge_axis if self.stacked else self.sample_axis

    def per_sample(self, array: np.ndarray, axis: int) -> int:
        """The size one sample contributes to axis `axis` of the fed input."""
        if self.stacked:
            return array.shape[axis + 1]
        return 1 if axis == self.sample_axis else array.shape[axis]


def shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join(str(d) if d not in (None, 0) else "?" for d in shape) + "]"


def layout_of(spec: InputSpec, array: np.ndarray, batch: set[str], where: str) -> Layout:
    """How `array` holds the samples of `spec`, refusing ranks and static dims that do not fit."""
    rank, axis = len(spec.shape), batch_axis(spec, batch)
    if array.ndim == rank:
        layout = Layout(None) if rank == 0 else Layout(0 if axis is None else axis)
        sample_shape, skipped, how = array.shape, layout.sample_axis, ""
    elif array.ndim == rank + 1:
        layout = Layout(0, stacked=True, merge_axis=axis)
        sample_shape, skipped, how = array.shape[1:], None, " per stacked sample"
    else:
        along = f"samples along axis {0 if axis is None else axis}"
        raise DataError(f"{where}: input '{spec.name}' expects rank {rank} {shape_text(spec.shape)} ({along}) or "
                        f"rank {rank + 1} (samples stacked in front), data has shape {list(array.shape)}")
    for index, (want, have) in enumerate(zip(spec.shape, sample_shape)):
        if index != skipped and isinstance(want, int) and want > 0 and want != have:
            raise DataError(f"{where}: input '{spec.name}' axis {index} must be {want}, data has {have}{how} "
                            f"(data shape {list(array.shape)})")
    return layout


def check_symbols(specs: list[InputSpec], bound: dict[str, np.ndarray], layouts: dict[str, Layout],
                  where: str) -> None:
    """One size per dimension symbol, per sample, across the inputs."""
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        array, layout = bound[spec.name], layouts[spec.name]
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str):
                continue
            size = layout.per_sample(array, axis)
            first = seen.setdefault(dim, (size, f"'{spec.name}' axis {axis}"))
            if first[0] != size:
                raise DataError(f"{where}: dimension '{dim}' is {first[0]} per sample in {first[1]} but {size} in "
                                f"'{spec.name}' axis {axis} (data shape {list(array.shape)})")


def fixed_unit(specs: list[InputSpec], layouts: dict[str, Layout], where: str) -> int | None:
    """Samples per run the model fixes (a fixed batch axis, or one stacked sample at a time), if any."""
    fixed: dict[int, str] = {}
    for spec in specs:
        layout = layouts[spec.name]
        if layout.sample_axis is None:
            continue
        if layout.stacked and layout.merge_axis is None:
            fixed.setdefault(1, f"'{spec.name}' (stacked, no dynamic batch axis)")
        elif not layout.stacked and isinstance(spec.shape[layout.sample_axis], int) and spec.shape[layout.sample_axis]:
            fixed.setdefault(int(spec.shape[layout.sample_axis]), f"'{spec.name}'")  # type: ignore[arg-type]
    if len(fixed) > 1:
        raise DataError(f"{where}: inputs fix different numbers of samples per run: "
                        + ", ".join(f"{size} by {name}" for size, name in fixed.items()))
    return next(iter(fixed), None)


def runs(arrays: dict[str, np.ndarray], layouts: dict[str, Layout], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of `size` consecutive samples (the last may be shorter)."""
    total = next((layouts[k].count(v) for k, v in arrays.items() if layouts[k].sample_axis is not None), 1) or 0
    for start in range(0, total, size):
        yield {k: layouts[k].feed(layouts[k].take(v, slice(start, start + size))) for k, v in arrays.items()}

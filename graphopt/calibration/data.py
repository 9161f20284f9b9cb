"""Calibration and evaluation data: loading, validation against a model, batching.

A data source is an .npz path (one array per graph input keyed by input name; a single-input model
accepts a single array under any key), a dict of arrays, or an iterable of feed dicts. Arrays are never
unpickled. Each input's array is read batched (the input's own rank, samples along its batch axis
wherever it sits) or stacked (one more axis, samples in front, each shaped as the model declares the
input); graphopt.calibration.layout says how runs of samples become feeds.

Validation refuses, with one clear line: unknown or missing input names, dtypes that cannot be read as
the model's, ranks or static dimensions that differ, a dimension symbol with two sizes across inputs,
unequal sample counts, and NaN/Inf values. Close dtypes are cast, with one warning per input and data
source: any float width to the input's float type (refused where a finite value overflows it), any
integer width or bool to the input's integer type, and 0/1 integers to bool (refused, with the range,
where values do not fit). Integers are never read as floats nor floats as integers.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Union

import numpy as np
import onnx

from graphopt.calibration.layout import Layout, check_symbols, fixed_unit, layout_of, runs
from graphopt.calibration.trim import Trim
from graphopt.errors import DataError
from graphopt.ir.io import open_regular
from graphopt.ir.shapes import InputSpec, batch_axes, batch_symbols, input_specs

log = logging.getLogger(__name__)

DataSource = Union[str, os.PathLike, Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]]]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model fixes on axis 0 of every input, or None where axis 0 is dynamic."""
    sizes = {s.shape[0] if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 else None
             for s in input_specs(model)}
    return sizes.pop() if len(sizes) == 1 else None


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    with open_regular(path, DataError, "data file") as handle:  # regular files only, checked on the descriptor
        if not zipfile.is_zipfile(handle):  # np.load would return a bare array for an .npy file
            raise DataError(f"{path} is not an .npz archive (save data with numpy.savez)")
        handle.seek(0)
        try:
            with np.load(handle, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{path} is not a readable .npz of numeric arrays: {exc}") from exc


def _converted(spec: InputSpec, array: np.ndarray, where: str) -> np.ndarray:
    """`array` as the input's dtype where the values survive the cast (see the module docstring)."""
    want, have = spec.dtype, array.dtype
    if have == want:
        return array
    if want.kind == "f" and have.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(want)
        overflow = np.isfinite(array) & ~np.isfinite(cast)
        if np.any(overflow):
            raise DataError(f"{where}: input '{spec.name}' is {want}; data ({have}) has values up to "
                            f"{float(np.max(np.abs(array[overflow]))):g}, beyond {want}'s range "
                            f"±{float(np.finfo(want).max):g}")
    elif want.kind in "iu" and have.kind in "iub":
        _check_range(spec, array, where)
        cast = array.astype(want)
    elif want.kind == "b" and have.kind in "iu":
        if not np.all((array == 0) | (array == 1)):
            raise DataError(f"{where}: input '{spec.name}' is bool; data ({have}) has values other than 0 and 1")
        cast = array.astype(bool)
    else:
        raise DataError(f"{where}: input '{spec.name}' expects {want}, data has {have}")
    return cast


def _check_range(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if array.dtype.kind == "b" or not array.size:
        return
    info = np.iinfo(spec.dtype)
    low, high = int(array.min()), int(array.max())
    if low < info.min or high > info.max:
        raise DataError(f"{where}: input '{spec.name}' is {spec.dtype}; data ({array.dtype}) has values in "
                        f"[{low}, {high}], outside {spec.dtype}'s range [{info.min}, {info.max}]")


def _matched(specs: list[InputSpec], arrays: Mapping[str, np.ndarray], where: str) -> Mapping[str, np.ndarray]:
    """`arrays` keyed by the model's input names (a single array names a single input)."""
    if len(specs) == 1 and len(arrays) == 1:
        return {specs[0].name: next(iter(arrays.values()))}
    wanted = {s.name for s in specs}
    unknown = sorted(set(arrays) - wanted)
    missing = sorted(wanted - set(arrays))
    if unknown or missing:
        raise DataError(f"{where}: keys do not match the model inputs {sorted(wanted)}"
                        + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
    return arrays


def bind_layouts(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], where: str = "data",
                 warned: set[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Layout]]:
    """Match named arrays to the model's inputs, cast close dtypes and validate them; with their layouts."""
    specs = input_specs(model)
    arrays = _matched(specs, arrays, where)
    batch, warned = batch_symbols(specs), set() if warned is None else warned
    bound: dict[str, np.ndarray] = {}
    layouts: dict[str, Layout] = {}
    for spec in specs:
        array = _converted(spec, np.asarray(arrays[spec.name]), where)
        layouts[spec.name] = layout_of(spec, array, batch, where)
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise DataError(f"{where}: input '{spec.name}' contains NaN or Inf")
        bound[spec.name] = array
    check_symbols(specs, bound, layouts, where)
    counts = {name: layouts[name].count(a) for name, a in bound.items() if layouts[name].sample_axis is not None}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs have different sample counts {counts}")
    if next(iter(counts.values()), 0) == 0:
        raise DataError(f"{where}: no samples")
    _warn_casts(specs, arrays, where, warned)  # only once the data are accepted: a refusal stays one line
    return bound, layouts


def _warn_casts(specs: list[InputSpec], arrays: Mapping[str, np.ndarray], where: str, warned: set[str]) -> None:
    for spec in specs:
        have = np.asarray(arrays[spec.name]).dtype
        if have != spec.dtype and spec.name not in warned:
            warned.add(spec.name)
            log.warning("%s: input '%s' is %s; data (%s) cast to it", where, spec.name, spec.dtype, have)


@dataclass
class Dataset:
    """Validated data: either whole arrays (sliced into batches) or a stream of feed dicts."""

    arrays: dict[str, np.ndarray] | None
    feeds: Iterable[Mapping[str, np.ndarray]] | None
    model: onnx.ModelProto
    layouts: dict[str, Layout] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)  # inputs whose data were cast, warned about once
    unit: int | None = None  # samples per run the model fixes (arrays only)
    trim: Trim | None = None  # trailing padding cut from every feed (graphopt.calibration.trim)

    @property
    def num_samples(self) -> int | None:
        if self.arrays is None:
            return None
        return next((self.layouts[k].count(a) for k, a in self.arrays.items()
                     if self.layouts[k].sample_axis is not None), 1)

    @property
    def fixed_batch(self) -> int | None:
        return self.unit if self.arrays is not None else fixed_batch(self.model)

    def batches(self, batch_size: int, trimmed: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of `batch_size` samples (of the model's fixed batch size, where it has one); a feed of a
        stream is passed whole (one sample per run where the model fixes that). With a `trim` (and `trimmed`),
        each feed runs only up to its last counted token."""
        if self.trim is not None and trimmed:
            yield from map(self.trim.apply, self.batches(batch_size, trimmed=False))
            return
        if self.arrays is not None:
            total = self.num_samples or 0
            size = self.unit or batch_size
            if total % size and self.unit:
                raise DataError(f"the model's batch axis is fixed to {size}: "
                                f"{total} samples are not a multiple of it")
            yield from runs(self.arrays, self.layouts, size)
            return
        for arrays, layouts, specs in self._stream():
            whole = next((layouts[k].count(v) for k, v in arrays.items() if layouts[k].sample_axis is not None), 1)
            yield from runs(arrays, layouts, fixed_unit(specs, layouts, "feed") or whole or 1)

    def feed_samples(self, feed: Mapping[str, np.ndarray]) -> int:
        """How many samples a feed from `batches` holds (counted along the model's batch axis)."""
        for name, layout in self.layouts.items():
            if layout.stacked and layout.merge_axis is None:
                return 1
            axis = layout.model_batch_axis
            if axis is not None and self.arrays is not None:
                return feed[name].shape[axis] // layout.per_sample(self.arrays[name], axis)
        axes = batch_axes(self.model)
        return next((feed[n].shape[a] for n, a in axes.items() if a is not None and np.ndim(feed[n]) > a), 1)

    def _stream(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Layout], list[InputSpec]]]:
        specs = input_specs(self.model)
        for index, feed in enumerate(self.feeds or ()):
            yield (*bind_layouts(self.model, feed, where=f"feed {index}", warned=self.warned), specs)

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """(fit, held-out): a seeded random `fraction` of the samples (of the feeds, for a stream) held out;
        both parts keep at least one sample. Arrays are split per sample, streams per feed."""
        if self.arrays is not None:
            total = self.num_samples or 0
            unit = self.unit or 1
            groups = max(1, total // unit)
            order = np.random.default_rng(seed).permutation(groups)
            held = min(groups - 1, max(1, round(fraction * groups))) if groups > 1 else 0
            parts = []
            for chosen in (np.sort(order[held:]), np.sort(order[:held])):
                index = (chosen[:, None] * unit + np.arange(unit)[None]).reshape(-1)
                arrays = {k: self.layouts[k].take(v, index) for k, v in self.arrays.items()}
                parts.append(Dataset(arrays, None, self.model, self.layouts, self.warned, self.unit, self.trim))
            return parts[0], parts[1]
        feeds = list(self.feeds or ())
        order = np.random.default_rng(seed).permutation(len(feeds))
        held = min(len(feeds) - 1, max(1, round(fraction * len(feeds)))) if len(feeds) > 1 else 0
        chosen = set(order[:held].tolist())
        return (Dataset(None, [f for i, f in enumerate(feeds) if i not in chosen], self.model, warned=self.warned,
                        trim=self.trim),
                Dataset(None, [f for i, f in enumerate(feeds) if i in chosen], self.model, warned=self.warned,
                        trim=self.trim))

    def first_sample(self) -> dict[str, np.ndarray]:
        """The first sample as the model reads it (a sample of several rows keeps them; see
        `first_sample_shapes`)."""
        return self._first()[0]

    def _first(self) -> tuple[dict[str, np.ndarray], dict[str, Layout]]:
        arrays, layouts = (self.arrays, self.layouts) if self.arrays is not None else next(self._stream())[:2]
        return next(runs(arrays, layouts, 1)), layouts

    def first_sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-input shapes of one sample as the model reads it, its batch axis at 1."""
        first, layouts = self._first()
        shapes = {}
        for name, array in first.items():
            shape, axis = list(array.shape), layouts[name].model_batch_axis
            if axis is not None:
                shape[axis] = 1
            shapes[name] = tuple(shape)
        return shapes


def load_data(source: DataSource, model: onnx.ModelProto) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _from_arrays(model, load_npz(source), str(source))
    if isinstance(source, Mapping):
        return _from_arrays(model, source, "data")
    if iter(source) is source:  # a one-shot iterator: keep it so several passes can read it
        source = list(source)
    return Dataset(None, source, model)


def _from_arrays(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], where: str) -> Dataset:
    warned: set[str] = set()
    bound, layouts = bind_layouts(model, arrays, where, warned)
    return Dataset(bound, None, model, layouts, warned, fixed_unit(input_specs(model), layouts, where))

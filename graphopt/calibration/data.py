"""Calibration and evaluation data: loading, validation against a model, batching.

A data source is an .npz path (one array per graph input keyed by input name, samples on axis 0; a
single-input model accepts a single array under any key), a dict of arrays, or an iterable of feed
dicts. Arrays are never unpickled. Validation refuses, with one clear line: unknown or missing input
names, dtypes that differ from the model's, ranks or static dimensions that differ, unequal sample
counts, and NaN/Inf values.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Union

import numpy as np
import onnx

from graphopt.errors import DataError
from graphopt.ir.io import not_regular
from graphopt.ir.shapes import InputSpec, input_specs

DataSource = Union[str, os.PathLike, Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]]]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model fixes on axis 0 of every input, or None where axis 0 is dynamic."""
    sizes = {s.shape[0] if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 else None
             for s in input_specs(model)}
    return sizes.pop() if len(sizes) == 1 else None


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    refused = not_regular(path)
    if refused:
        raise DataError(refused)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load would return a bare array for an .npy file
        raise DataError(f"{path} is not an .npz archive (save data with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz of numeric arrays: {exc}") from exc


def _check_array(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if array.dtype != spec.dtype:
        raise DataError(f"{where}: input '{spec.name}' expects {spec.dtype}, data has {array.dtype}")
    if array.ndim != len(spec.shape):
        raise DataError(f"{where}: input '{spec.name}' expects rank {len(spec.shape)} "
                        f"{_shape_text(spec.shape)}, data has shape {list(array.shape)}")
    for axis, (want, have) in enumerate(zip(spec.shape, array.shape)):
        if axis > 0 and isinstance(want, int) and want > 0 and want != have:
            raise DataError(f"{where}: input '{spec.name}' axis {axis} must be {want}, data has {have}")
    if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
        raise DataError(f"{where}: input '{spec.name}' contains NaN or Inf")


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join(str(d) if d not in (None, 0) else "?" for d in shape) + "]"


def bind_arrays(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], where: str = "data") -> dict[str, np.ndarray]:
    """Match named arrays to the model's inputs and validate them; samples lie on axis 0."""
    specs = input_specs(model)
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    wanted = {s.name for s in specs}
    unknown = sorted(set(arrays) - wanted)
    missing = sorted(wanted - set(arrays))
    if unknown or missing:
        raise DataError(f"{where}: keys do not match the model inputs {sorted(wanted)}"
                        + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
    bound = {s.name: np.asarray(arrays[s.name]) for s in specs}
    for spec in specs:
        _check_array(spec, bound[spec.name], where)
    counts = {name: a.shape[0] for name, a in bound.items() if a.ndim}  # a scalar input has no sample axis
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs have different sample counts {counts}")
    if next(iter(counts.values()), 0) == 0:
        raise DataError(f"{where}: no samples")
    return bound


@dataclass
class Dataset:
    """Validated data: either whole arrays (sliced into batches) or a stream of feed dicts."""

    arrays: dict[str, np.ndarray] | None
    feeds: Iterable[Mapping[str, np.ndarray]] | None
    model: onnx.ModelProto

    @property
    def num_samples(self) -> int | None:
        return next((a.shape[0] for a in self.arrays.values() if a.ndim), 1) if self.arrays is not None else None

    @property
    def fixed_batch(self) -> int | None:
        return fixed_batch(self.model)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Slices of `batch_size` samples (of the model's fixed batch size, where it has one)."""
        if self.arrays is not None:
            total = self.num_samples or 0
            batch_size = self.fixed_batch or batch_size
            if total % batch_size and self.fixed_batch:
                raise DataError(f"the model's batch axis is fixed to {batch_size}: "
                                f"{total} samples are not a multiple of it")
            for start in range(0, total, batch_size):
                yield {k: v[start:start + batch_size] if v.ndim else v for k, v in self.arrays.items()}
            return
        for index, feed in enumerate(self.feeds or ()):
            yield bind_arrays(self.model, feed, where=f"feed {index}")

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """(fit, held-out): a seeded random `fraction` of the samples (of the feeds, for a stream) held out;
        both parts keep at least one sample. Arrays are split per sample, streams per feed."""
        if self.arrays is not None:
            total = self.num_samples or 0
            unit = self.fixed_batch or 1
            groups = max(1, total // unit)
            order = np.random.default_rng(seed).permutation(groups)
            held = min(groups - 1, max(1, round(fraction * groups))) if groups > 1 else 0
            parts = []
            for chosen in (np.sort(order[held:]), np.sort(order[:held])):
                index = (chosen[:, None] * unit + np.arange(unit)[None]).reshape(-1)
                parts.append(Dataset({k: v[index] if v.ndim else v for k, v in self.arrays.items()}, None, self.model))
            return parts[0], parts[1]
        feeds = list(self.feeds or ())
        order = np.random.default_rng(seed).permutation(len(feeds))
        held = min(len(feeds) - 1, max(1, round(fraction * len(feeds)))) if len(feeds) > 1 else 0
        chosen = set(order[:held].tolist())
        return (Dataset(None, [f for i, f in enumerate(feeds) if i not in chosen], self.model),
                Dataset(None, [f for i, f in enumerate(feeds) if i in chosen], self.model))

    def first_sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-input shapes of one sample (batch 1), from the first batch."""
        first = next(iter(self.batches(1)))
        return {name: (1, *array.shape[1:]) if array.ndim else () for name, array in first.items()}


def load_data(source: DataSource, model: onnx.ModelProto) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Dataset(bind_arrays(model, load_npz(source), where=str(source)), None, model)
    if isinstance(source, Mapping):
        return Dataset(bind_arrays(model, source), None, model)
    if iter(source) is source:  # a one-shot iterator: keep it so several passes can read it
        source = list(source)
    return Dataset(None, source, model)

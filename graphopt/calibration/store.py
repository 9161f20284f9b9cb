"""Statistics files: `TensorStats` saved as a plain .npz with fingerprints, so stale ones are refused.

Layout (np.savez, no object arrays; read with allow_pickle=False): `header` is a UTF-8 JSON document
stored as a uint8 array; tensor i's arrays are `t{i}.{field}` (TensorStats.to_arrays). The header holds
the format name and version, the model fingerprint (a digest of the graph's nodes, initializers,
inputs, outputs, opsets and local functions; value_info and doc strings do not count), the data
fingerprint (a digest of every input's name, dtype, shape and bytes, batch by batch in order), the
mask input, and per tensor its metadata and cone fingerprint (capture.py).

Staleness: a tensor's statistics are valid for a model exactly when its cone fingerprint there equals
the saved one (so rewriting layers after it does not invalidate it), and for data exactly when the data
fingerprints are equal. `load_stats` given a model or data refuses a file with any stale tensor
(`StaleStatsError`, one line); a `Calibrator` preloaded with a file serves the valid entries and
recomputes the stale ones, or refuses them when it has no data.
Writing is atomic (graphopt.ir.files.write_atomic: a killed write leaves the previous file intact) and
never overwrites an input, also through a symlink or hard link (check_outputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from graphopt._version import __version__
from graphopt.calibration.capture import cone_fingerprints, tensor_parts
from graphopt.calibration.data import Dataset
from graphopt.calibration.stats import TensorStats
from graphopt.errors import DataError
from graphopt.ir.io import check_outputs, open_regular, write_atomic

FORMAT = "graphopt-stats"
VERSION = 1


class StaleStatsError(DataError):
    """A statistics file does not belong to the model or data it is used with."""


@dataclass
class StatsFile:
    stats: dict[str, TensorStats]
    cones: dict[str, str]
    model_fingerprint: str
    data_fingerprint: str
    mask_input: str | None = None
    samples: int | None = None
    source: str = "statistics"

    @classmethod
    def build(cls, model: onnx.ModelProto, stats: dict[str, TensorStats], data: Dataset,
              mask_input: str | None = None) -> StatsFile:
        cones = cone_fingerprints(model)
        return cls(dict(stats), {name: cones[name] for name in stats}, model_fingerprint(model),
                   data_fingerprint(data), mask_input, data.num_samples)

    def check(self, model: onnx.ModelProto | None = None, data: Dataset | None = None) -> None:
        """Raise `StaleStatsError` unless every tensor is valid for `model` and `data` (when given)."""
        if model is not None:
            cones = cone_fingerprints(model)
            stale = [name for name in self.stats if cones.get(name) != self.cones[name]]
            if stale:
                more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
                raise StaleStatsError(f"{self.source} is stale for this model: tensor '{stale[0]}'{more} is missing "
                                      "or computed differently than when the statistics were taken; "
                                      "rerun `graphopt calibrate`")
        if data is not None and data_fingerprint(data) != self.data_fingerprint:
            raise StaleStatsError(f"{self.source} was computed on other calibration data; rerun `graphopt calibrate`")


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=16)


def model_fingerprint(model: onnx.ModelProto) -> str:
    hasher = _hasher()
    for opset in model.opset_import:
        hasher.update(f"{opset.domain}:{opset.version};".encode())
    for function in model.functions:
        hasher.update(function.SerializeToString())
    graph = model.graph
    for part in (*graph.input, *graph.output, *graph.node, *graph.sparse_initializer):
        hasher.update(part.SerializeToString())
    for tensor in graph.initializer:
        hasher.update(tensor.name.encode() + b"\0")
        for part in tensor_parts(tensor):
            hasher.update(part)
    return hasher.hexdigest()


def data_fingerprint(data: Dataset) -> str:
    hasher = _hasher()
    batches: Iterable[dict[str, np.ndarray]] = ([data.arrays] if data.arrays is not None
                                                else data.batches(1, trimmed=False))
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            hasher.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            hasher.update(memoryview(array).cast("B"))
    return hasher.hexdigest()


def save_stats(stats_file: StatsFile, path: str | os.PathLike[str], *, protected: Iterable[Path] = ()) -> Path:
    """Write `stats_file` to exactly `path` (no suffix added), atomically (graphopt.ir.files.write_atomic);
    refuse a path that is the same file as one in `protected` (by path, symlink or hard link)."""
    path = Path(path)
    check_outputs([path], protected)
    tensors, arrays = [], {}
    for index, (name, stats) in enumerate(stats_file.stats.items()):
        tensors.append({**stats.meta(), "tensor": name, "cone": stats_file.cones[name], "key": f"t{index}"})
        arrays.update({f"t{index}.{field}": value for field, value in stats.to_arrays().items()})
    header = {"format": FORMAT, "version": VERSION, "graphopt": __version__, "model": stats_file.model_fingerprint,
              "data": stats_file.data_fingerprint, "mask_input": stats_file.mask_input,
              "samples": stats_file.samples, "tensors": tensors}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    write_atomic(path, lambda stream: np.savez(stream, **arrays))
    return path


def load_stats(path: str | os.PathLike[str], model: onnx.ModelProto | None = None,
               data: Dataset | None = None) -> StatsFile:
    """Read a statistics file; with `model` or `data`, refuse it when stale (see the module docstring)."""
    path = Path(path)
    try:
        with open_regular(path, DataError, "statistics file") as handle, \
                np.load(handle, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        header = json.loads(arrays.pop("header").tobytes().decode()) if "header" in arrays else {}
    except (ValueError, TypeError, OSError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable statistics file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise DataError(f"{path} is not a graphopt statistics file (make one with `graphopt calibrate`)")
    if header.get("version") != VERSION:
        raise DataError(f"{path} has statistics format version {header.get('version')}, this graphopt reads {VERSION}")
    stats, cones = {}, {}
    try:
        for entry in header["tensors"]:
            prefix = entry["key"] + "."
            fields = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
            stats[entry["tensor"]] = TensorStats.from_arrays(entry, fields)
            cones[entry["tensor"]] = entry["cone"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is a damaged statistics file: {exc}") from exc
    loaded = StatsFile(stats, cones, header["model"], header["data"], header.get("mask_input"),
                       header.get("samples"), source=str(path))
    loaded.check(model, data)
    return loaded

"""Loading and saving ONNX models safely.

Invariants:
- The model file is read like every user file (graphopt.ir.files): regular files only, one bounded read
  of its size on disk, parsed from those bytes.
- External data is untrusted. Every `location` is checked before a byte is read: it must be a relative
  path that stays inside the model's directory after resolving `..` and symlinks, name an existing
  regular file, and its offset/length must lie within that file. graphopt reads each tensor's byte range
  itself (bounded, and re-checked against the open file's size), so a symlink that stays inside the
  directory is followed like any other path.
- Saving never overwrites an input (`check_outputs`) and is atomic (`write_atomic`): a failed or killed
  save leaves the previous file as it was.
- Models whose tensors exceed `EXTERNAL_DATA_THRESHOLD` bytes are saved with external data
  (protobuf cannot serialise more than 2 GiB into one message): the initializers of at least
  `EXTERNAL_TENSOR_MIN_BYTES` go to `NAME.data` beside the model, written before the model. Each file is
  replaced atomically, the pair is not: a save killed between the two renames leaves the new data file
  beside the previous model file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import GraphoptError, ModelLoadError, OutputPathError, UnsafeExternalDataError
from graphopt.ir import weights
from graphopt.ir.files import (PathLike, check_outputs, not_regular, open_regular, read_regular, same_file,
                               write_atomic)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "check_outputs", "external_data_path", "input_files", "load_model",
           "model_outputs", "model_tensors", "not_regular", "read_regular", "same_file", "save_model", "write_atomic"]

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors stay inside the model file when it uses external data


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of `graph` and all nested subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: graph, subgraphs and model-local functions."""
    yield from _all_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


@dataclass(frozen=True)
class _Extent:
    """A validated external-data reference: bytes [offset, offset + length) of a regular file."""

    file: Path
    offset: int
    length: int


def _extent(tensor: onnx.TensorProto, base: Path) -> _Extent:
    """Validate `tensor`'s external-data reference against the resolved model directory `base`."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    where = f"tensor '{tensor.name}' external data location '{location}'"
    if not location or os.path.isabs(location) or Path(location).drive:
        raise UnsafeExternalDataError(f"{where} must be a relative path inside the model's directory")
    if ".." in Path(location).parts:
        raise UnsafeExternalDataError(f"{where} escapes the model's directory")
    target = (base / location).resolve()
    if base not in target.parents:
        raise UnsafeExternalDataError(f"{where} resolves outside the model's directory")
    refused = not_regular(target)
    if refused:
        raise UnsafeExternalDataError(f"{where}: {refused}")
    if not target.is_file():
        raise UnsafeExternalDataError(f"{where}: file not found")
    size = target.stat().st_size
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError as exc:
        raise UnsafeExternalDataError(f"{where}: offset/length are not integers") from exc
    if offset < 0 or length < 0 or offset + length > size:
        raise UnsafeExternalDataError(f"{where}: offset {offset} + length {length} exceeds the file's {size} bytes")
    return _Extent(target, offset, length)


def _external_extents(model: onnx.ModelProto, base_dir: Path) -> list[tuple[onnx.TensorProto, _Extent]]:
    """Every external tensor of `model` with its validated reference (all checked before any is read)."""
    base = base_dir.resolve()
    return [(tensor, _extent(tensor, base)) for tensor in model_tensors(model)
            if tensor.data_location == onnx.TensorProto.EXTERNAL]


def _read_extent(stream: BinaryIO, extent: _Extent, tensor: onnx.TensorProto) -> bytes:
    size = os.fstat(stream.fileno()).st_size
    if extent.offset + extent.length > size:  # the file shrank since it was checked
        raise UnsafeExternalDataError(f"tensor '{tensor.name}': external data {extent.file} is now {size} bytes, "
                                      f"shorter than offset {extent.offset} + length {extent.length}")
    stream.seek(extent.offset)
    data = stream.read(extent.length)
    if len(data) != extent.length:
        raise UnsafeExternalDataError(f"tensor '{tensor.name}': external data {extent.file} ended early")
    return data


def _load_external(extents: list[tuple[onnx.TensorProto, _Extent]]) -> None:
    """Read every validated extent into its tensor's raw_data (each file opened once, reads bounded)."""
    streams: dict[Path, BinaryIO] = {}
    try:
        for tensor, extent in extents:
            if extent.file not in streams:
                streams[extent.file] = open_regular(extent.file, UnsafeExternalDataError, "external data file")
            tensor.raw_data = _read_extent(streams[extent.file], extent, tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    finally:
        for stream in streams.values():
            stream.close()


def _parse(data: bytes, path: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model (truncated or corrupt): {exc}") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{path} is not a valid ONNX model (no graph or opset)")
    return model


def load_model(path: PathLike) -> onnx.ModelProto:
    """Load a model by path, validating and then loading its external data."""
    path = Path(path)
    model = _parse(read_regular(path, ModelLoadError, "model file"), path)
    extents = _external_extents(model, path.parent)
    if weights.by_reference(sum(extent.length for _, extent in extents) + model.ByteSize()):
        extents = _map_initializers(model, extents)
    _load_external(extents)
    try:
        in_memory = model.ByteSize() < EXTERNAL_DATA_THRESHOLD and not any(True for _ in weights.referenced(model.graph))
        onnx.checker.check_model(model if in_memory else str(path))
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{path} fails the ONNX checker: {first_line}") from exc
    return model


def _map_initializers(model: onnx.ModelProto,
                      extents: list[tuple[onnx.TensorProto, _Extent]]) -> list[tuple[onnx.TensorProto, _Extent]]:
    """Turn the main graph's external initializers into references to their (memory-mapped) files
    (graphopt.ir.weights); return the extents still to read (tensors of subgraphs and attributes)."""
    main = {id(tensor) for tensor in model.graph.initializer}
    rest = []
    for tensor, extent in extents:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if id(tensor) not in main or tensor.data_type == onnx.TensorProto.STRING:
            rest.append((tensor, extent))
        elif extent.length != itemsize * math.prod(tensor.dims):
            raise UnsafeExternalDataError(f"tensor '{tensor.name}': external data length {extent.length} does not "
                                          f"match its dims {list(tensor.dims)}")
        else:
            weights.reference_to_file(tensor, extent.file, extent.offset, extent.length)
    return rest


def input_files(path: PathLike) -> set[Path]:
    """The model file and the external data files it references (all resolved)."""
    path = Path(path)
    refused = not_regular(path)
    if refused:
        raise ModelLoadError(refused)
    try:
        header = _parse(read_regular(path, ModelLoadError, "model file"), path)
    except GraphoptError:  # an unreadable input has no external files to protect; loading it says why
        return {path.resolve()}
    return {path.resolve()} | {extent.file for _, extent in _external_extents(header, path.parent)}


def _to_raw_data(model: onnx.ModelProto) -> None:
    """Store initializers held in typed fields (float_data, ...) as raw_data: only raw_data is moved out."""
    for tensor in model.graph.initializer:
        if (tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data")
                and tensor.data_type != onnx.TensorProto.STRING):
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))


def _payload_bytes(model: onnx.ModelProto) -> int:
    inline = sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) for t in model_tensors(model))
    return inline + weights.referenced_bytes(model)


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of `graph` and of its subgraphs: the tensors saved as external data."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


def external_data_path(path: PathLike) -> Path:
    """Where `save_model(model, path)` writes external data: `NAME.data` beside the (symlink-resolved) file."""
    destination = Path(os.path.realpath(path))
    return destination.with_name(destination.name + ".data")


def model_outputs(path: PathLike) -> list[Path]:
    """The files `save_model(model, path)` may write: the model and its external data file."""
    return [Path(path), external_data_path(path)]


def _save_external(model: onnx.ModelProto, data_path: Path) -> onnx.ModelProto:
    """Write `model`'s large initializers to `data_path` (atomically); return a copy that references them."""
    header = onnx.ModelProto()
    header.CopyFrom(model)
    _to_raw_data(header)
    moved = [t for t in _initializers(header.graph)
             if len(t.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES or weights.is_reference(t)]

    def write(stream: BinaryIO) -> None:
        offset = 0
        for tensor in moved:
            if weights.is_reference(tensor):  # streamed from its array (a file mapping or a pass's result)
                data = memoryview(np.ascontiguousarray(weights.array_of(tensor))).cast("B")
                del tensor.external_data[:]
            else:
                data = memoryview(tensor.raw_data)
            length = len(data)
            stream.write(data)
            del data
            tensor.ClearField("raw_data")  # frees the copy's bytes as they are written
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            offset += length

    write_atomic(data_path, write)
    return header


def save_model(model: onnx.ModelProto, path: PathLike, *, protected: Iterable[PathLike] | None = None,
               external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write `model` to `path` atomically; refuse to overwrite any file in `protected` (`check_outputs`).

    Above `external_threshold` bytes of tensor data, and always for a model held by reference
    (graphopt.ir.weights), the weights go to `<name>.data` beside the model.
    """
    path = Path(path)
    check_outputs(model_outputs(path), protected or ())
    external = (_payload_bytes(model) > external_threshold
                or any(True for _ in weights.referenced(model.graph)))  # references are only ever written out
    try:
        stored = _save_external(model, external_data_path(path)) if external else model
        serialized = stored.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages above 2 GiB
        raise OutputPathError(f"cannot write {path}: {exc}") from exc
    write_atomic(path, lambda stream: stream.write(serialized))
    log.info("saved %s%s", path, " (+ external data)" if external else "")
    return path



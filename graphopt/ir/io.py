"""Loading and saving ONNX models safely.

Invariants:
- External data is untrusted. Every `location` is checked before a byte is read: it must be a relative
  path that stays inside the model's directory after resolving `..` and symlinks, name an existing
  regular file, and its offset/length must lie within that file.
- Saving is atomic: the model (and its external data file, when one is needed) is written into a
  temporary directory beside the destination and moved into place with `os.replace`, so a failed save
  never leaves a half-written file. The input model and its external data files are never overwritten.
- Models whose tensors exceed `EXTERNAL_DATA_THRESHOLD` bytes are saved with external data
  (protobuf cannot serialise more than 2 GiB into one message).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import ModelLoadError, OutputPathError, UnsafeExternalDataError

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)


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


def _external_files(model: onnx.ModelProto, base_dir: Path) -> set[Path]:
    """Validate every external-data reference of `model` against `base_dir`; return the files used."""
    base = base_dir.resolve()
    files: set[Path] = set()
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
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
        if not target.is_file():
            raise UnsafeExternalDataError(f"{where}: file not found")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError as exc:
            raise UnsafeExternalDataError(f"{where}: offset/length are not integers") from exc
        if offset < 0 or length < 0 or offset + length > size:
            raise UnsafeExternalDataError(
                f"{where}: offset {offset} + length {length} exceeds the file's {size} bytes"
            )
        files.add(target)
    return files


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """Why an existing `path` must not be read (a folder, device, FIFO or socket: reading one could block
    forever or never end), or None for a regular file or a path that does not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device")
    return f"{path} is {kind}, not a regular file"


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load a model by path, validating and then loading its external data."""
    path = Path(path)
    refused = not_regular(path)
    if refused:
        raise ModelLoadError(refused)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model (truncated or corrupt): {exc}") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{path} is not a valid ONNX model (no graph or opset)")
    if _external_files(model, path.parent):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # e.g. onnx refuses any symlink
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{path}: cannot load its external data: {first_line}") from exc
    try:
        onnx.checker.check_model(model if model.ByteSize() < EXTERNAL_DATA_THRESHOLD else str(path))
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{path} fails the ONNX checker: {first_line}") from exc
    return model


def input_files(path: str | os.PathLike[str]) -> set[Path]:
    """The model file and the external data files it references (all resolved)."""
    path = Path(path)
    refused = not_regular(path)
    if refused:
        raise ModelLoadError(refused)
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable input has no external files to protect
        return {path.resolve()}
    return {path.resolve()} | _external_files(header, path.parent)


def _to_raw_data(model: onnx.ModelProto) -> None:
    """Store initializers held in typed fields (float_data, ...) as raw_data: onnx moves only raw_data out."""
    for tensor in model.graph.initializer:
        if (tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data")
                and tensor.data_type != onnx.TensorProto.STRING):
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))


def _payload_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) for t in model_tensors(model))


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    protected: set[Path] | None = None,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write `model` to `path` atomically; refuse to overwrite any path in `protected`.

    Above `external_threshold` bytes of tensor data the weights go to `<name>.data` beside the model.
    """
    path = Path(path)
    data_name = path.name + ".data"
    destinations = {path.resolve(), (path.parent / data_name).resolve()}
    if protected and destinations & {p.resolve() for p in protected}:
        raise OutputPathError(f"refusing to overwrite the input model: {path}")
    if path.is_dir():
        raise OutputPathError(f"output path is a directory: {path}")
    if not path.parent.is_dir():
        raise OutputPathError(f"output directory does not exist: {path.parent}")
    external = _payload_bytes(model) > external_threshold
    staging = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=path.parent))
    try:
        staged = staging / path.name
        if external:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            _to_raw_data(to_save)
            onnx.save_model(to_save, str(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(staging / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved %s%s", path, " (+ external data)" if external else "")
    return path


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(stream)` on a temporary file in the same folder (flushed, synced, then
    renamed), so an interrupted write never leaves a half-written file or destroys the one already there."""
    target = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)


def same_file(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: the same resolved path, or (through a hard link) the same inode."""
    if Path(first).resolve() == Path(second).resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist yet
        return False

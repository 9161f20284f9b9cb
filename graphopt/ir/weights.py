"""Weights held by reference: how models larger than protobuf's 2 GiB are loaded, rewritten, run and saved.

A model whose initializers hold at least `BY_REFERENCE_BYTES` is never copied into protobuf messages:
- `load_model` memory-maps its external data files (read-only) and its initializers become *references*;
- `import_graph` gives each graph constant a numpy view of that mapping (a pass that slices a weight
  makes a new array; nothing is edited in place: the mapping is read-only);
- `export_model` writes every constant of at least `REFERENCE_MIN_BYTES` as a reference to its array;
- onnxruntime sessions receive the referenced arrays as shared initializers (no copy, see
  graphopt.calibration.session), and `save_model` streams them into the output's data file.

A reference is a TensorProto with data_location EXTERNAL whose external_data names `REFERENCE_LOCATION`
and a key: `file:PATH` for a range of a memory-mapped file, `array:N` for an array made in this process
(kept in a weak registry: the graph that holds the array keeps it alive). Such protos are for graphopt's
own use; `materialized` turns them back into ordinary inline tensors, and every file graphopt writes is
an ordinary ONNX model with ordinary external data.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.errors import GraphoptError

T = TypeVar("T")

BY_REFERENCE_BYTES = 1 << 30  # models with at least this much initializer data go by reference
REFERENCE_MIN_BYTES = 1 << 16  # constants from this size are written as references in such models
REFERENCE_LOCATION = "graphopt-weights"
_KEY = "graphopt_reference"

_arrays: "weakref.WeakValueDictionary[str, np.ndarray]" = weakref.WeakValueDictionary()
_counter = itertools.count()
_mappings: "weakref.WeakValueDictionary[tuple[str, int, int], np.memmap]" = weakref.WeakValueDictionary()
_keys: dict[int, tuple[weakref.ref, str]] = {}  # id(array) -> (the array, its key)
_scopes: list[dict[str, np.ndarray]] = []  # arrays held for the calls in progress (`holding`)


def _placeholder(name: str, dtype: int, dims: tuple[int, ...], key: str, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=dtype, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    for entry, value in (("location", REFERENCE_LOCATION), (_KEY, key), ("length", str(length))):
        tensor.external_data.add(key=entry, value=value)
    return tensor


def is_reference(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == _KEY for e in tensor.external_data)


def reference_to(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A reference to the C-contiguous `array`, kept alive by its owner, not by the reference. The same array
    object always gets the same key (a file range keeps its file's), so digests of models stay stable."""
    if not array.flags.c_contiguous:
        raise ValueError("internal: only C-contiguous arrays are referenced")
    known = _keys.get(id(array))
    key = known[1] if known is not None and known[0]() is array else None
    if key is None:
        key = f"array:{next(_counter)}"
        _arrays[key] = array
        _remember(array, key)
    if key.startswith("array:"):  # a file range can always be mapped again; a pass's array only while held
        for held in _scopes:
            held[key] = array
    return _placeholder(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, key, array.nbytes)


def holding(function: Callable[..., T]) -> Callable[..., T]:
    """Run `function` with every array it references held alive until it returns: a model exported from a
    graph (a snapshot: the reference model of error-correcting SNP, a probe's copy) stays valid after the
    graph has moved on to newer arrays. What the call returns keeps alive what it needs (`arrays_of`)."""
    @functools.wraps(function)
    def held_call(*args: Any, **kwargs: Any) -> T:
        scope: dict[str, np.ndarray] = {}
        _scopes.append(scope)
        try:
            return function(*args, **kwargs)
        finally:
            _scopes.remove(scope)
    return held_call


def arrays_of(model: onnx.ModelProto) -> list[np.ndarray]:
    """The arrays `model` references: holding them keeps the model valid."""
    return [array_of(tensor) for tensor in referenced(model.graph)]


def _remember(array: np.ndarray, key: str) -> None:
    """Note `array`'s key for as long as the array lives."""
    identity = id(array)
    _keys[identity] = (weakref.ref(array, lambda _: _keys.pop(identity, None)), key)


def reference_to_file(tensor: onnx.TensorProto, file: Path, offset: int, length: int) -> None:
    """Turn an external-data `tensor` (already validated) into a reference to bytes [offset, offset+length) of
    `file`, in place."""
    key = f"file:{offset}:{length}:{os.fspath(file)}"
    replacement = _placeholder(tensor.name, tensor.data_type, tuple(tensor.dims), key, length)
    tensor.CopyFrom(replacement)


def _file_array(key: str, dtype: np.dtype, dims: tuple[int, ...]) -> np.ndarray:
    _, offset, length, path = key.split(":", 3)
    start, size = int(offset), int(length)
    stat = os.stat(path)
    whole = _mappings.get((path, stat.st_ino, stat.st_size))
    if whole is None:
        whole = np.memmap(path, dtype=np.uint8, mode="r")
        _mappings[(path, stat.st_ino, stat.st_size)] = whole
    if start + size > whole.size:
        raise GraphoptError(f"external data file {path} changed while in use (now {whole.size} bytes)")
    raw = whole[start:start + size]
    if start % dtype.itemsize:  # an unaligned range: one copy of this tensor
        raw = np.array(raw)
    array = raw.view(dtype).reshape(dims)
    _remember(array, key)
    return array


def release(array: np.ndarray) -> None:
    """Drop the resident pages of a file-mapped weight that a pass has replaced (madvise DONTNEED): they stop
    counting in the process's memory, and a later read of the same range maps them again from the file.
    Only views of the whole-file mappings made here (offset 0) are released; anything else is left alone."""
    root = array
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not isinstance(root, np.memmap) or root.offset != 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = array.ctypes.data - root.ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the array only
    last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        root.base.madvise(mmap.MADV_DONTNEED, first, last - first)


def release_mappings() -> None:
    """Drop the resident pages of every weight file mapped here (madvise DONTNEED), e.g. once an onnxruntime
    session that read all of them is done: the file's pages stay in the page cache, so a weight read again
    maps them back cheaply, but pages nobody reads stop counting in the process's memory."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for whole in list(_mappings.values()):
        if isinstance(whole.base, mmap.mmap):
            whole.base.madvise(mmap.MADV_DONTNEED)


def array_of(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of `tensor`: a reference's array (read-only where it maps a file), else numpy_helper's."""
    if not is_reference(tensor):
        return numpy_helper.to_array(tensor)
    key = next(e.value for e in tensor.external_data if e.key == _KEY)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if key.startswith("file:"):
        return _file_array(key, dtype, tuple(tensor.dims))
    found = _arrays.get(key)
    if found is None:
        raise GraphoptError(f"internal: the array behind weight '{tensor.name}' is gone (a model was used after "
                            "the graph that held its weights)")
    return found


def referenced(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The reference initializers of `graph` (main graph only: subgraph initializers stay inline)."""
    return (t for t in graph.initializer if is_reference(t))


def referenced_bytes(model: onnx.ModelProto) -> int:
    return sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in referenced(model.graph))


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size with its referenced weights counted."""
    return model.ByteSize() + referenced_bytes(model)


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when it holds no reference, else a copy with every reference inlined (raw_data)."""
    if not any(True for _ in referenced(model.graph)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in referenced(copy.graph):
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array_of(tensor)), tensor.name))
    return copy


def by_reference(total_bytes: int) -> bool:
    """Whether a model with `total_bytes` of initializer data is held by reference."""
    return total_bytes >= BY_REFERENCE_BYTES

"""Concrete shapes for a batch-1 sample, the model's real inputs (`input_specs`) and their batch axes.

Dynamic input dimensions are resolved from, in order: explicit overrides (`name=1x3x224x224` for one
input, `sequence=128` for a dimension symbol wherever it appears; an input's override also binds the
symbols it names), the data file's sample shape, and 1 for the batch (the batch axis of each input,
every batch symbol, and axis 0). One symbol gets one size: contradicting overrides are refused.
Intermediate shapes then come from ONNX shape inference on a copy of the model whose inputs are fixed
to those shapes.

The batch axis of an input is where its batch symbol sits (a symbol named like `batch`, `N` or `B`,
else the symbols found on axis 0 of the inputs), else axis 0 when it is dynamic, else its one dynamic
axis when that is unnamed (an RNN state [2, ?, 128]); otherwise the input has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from graphopt.errors import OptionError
from graphopt.ir.graph import infer_shapes, weightless_copy

Shapes = dict[str, tuple[int, ...]]


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'name=1x3x224x224' -> ('name', (1, 3, 224, 224)); 'sequence=128' -> ('sequence', (128,))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise OptionError(f"--input-shape expects NAME=D1xD2x... or DIM=N, got '{text}'")
    return name, shape


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


ANONYMOUS_DIMS = frozenset({"?", "-1", "None", "unk", "unknown"})  # written for "any size", not as a shared name


def declared_symbol(dim_param: str) -> str | None:
    """A declared dimension symbol, None for an unnamed dim. Exporters that write every unknown dim with the
    same placeholder (Paddle2ONNX's '?', '-1' or 'None' from others) do not mean those dims to be equal, so a
    placeholder is an unnamed dim: a classifier declared [-1, 3, '?', '?'] takes 48 x 192 images."""
    return None if not dim_param or dim_param.strip() in ANONYMOUS_DIMS else dim_param


def declared_dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A declared dim: its size, its symbol, or None where unnamed (a negative size, as Paddle2ONNX writes
    -1 for a dynamic batch, is unnamed too)."""
    if dim.HasField("dim_value"):
        return dim.dim_value if dim.dim_value >= 0 else None
    return declared_symbol(dim.dim_param)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers that double as inputs are excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(declared_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), dims))
    return specs


def _static(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim > 0


def dim_symbols(specs: Iterable[InputSpec]) -> dict[str, list[str]]:
    """Every dimension symbol of the inputs -> where it appears ('input_ids[1]', ...)."""
    found: dict[str, list[str]] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                found.setdefault(dim, []).append(f"{spec.name}[{axis}]")
    return found


def batch_symbols(specs: Sequence[InputSpec]) -> set[str]:
    """The symbols that name the batch: those named so ('batch', 'batch_size', 'N', 'B'), else those
    on axis 0 of the inputs."""
    symbols = dim_symbols(specs)
    named = {s for s in symbols if "batch" in s.lower() or s.lower() in ("n", "b", "bs")}
    return named or {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}


def batch_axis(spec: InputSpec, batch: set[str]) -> int | None:
    """The input's dynamic batch axis (see the module docstring), None when every axis is fixed."""
    dynamic = [axis for axis, dim in enumerate(spec.shape) if not _static(dim)]
    named = [axis for axis in dynamic if spec.shape[axis] in batch]
    if named:
        return named[0]
    if 0 in dynamic:
        return 0
    return dynamic[0] if len(dynamic) == 1 and spec.shape[dynamic[0]] is None else None


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """Each real input's dynamic batch axis (None: all its axes are fixed)."""
    specs = input_specs(model)
    batch = batch_symbols(specs)
    return {spec.name: batch_axis(spec, batch) for spec in specs}


def resolve_input_shapes(model: onnx.ModelProto, explicit: Mapping[str, Sequence[int] | int] | None = None,
                         observed: Shapes | None = None) -> Shapes:
    """Each real input's batch-1 shape: `explicit` overrides (input names or dimension symbols), else
    `observed` (a data sample), else the model's static dims with the batch taken as 1."""
    specs = input_specs(model)
    overrides, bound = _bindings(specs, explicit or {})
    observed = observed or {}
    batch = batch_symbols(specs)
    resolved: Shapes = {}
    for spec in specs:
        if spec.name in overrides:
            resolved[spec.name] = overrides[spec.name]
            continue
        seen = observed.get(spec.name)
        batch_at = batch_axis(spec, batch)
        resolved[spec.name] = tuple(_resolved_dim(spec, axis, bound, seen, batch, batch_at)
                                    for axis in range(len(spec.shape)))
    return resolved


def _resolved_dim(spec: InputSpec, axis: int, bound: dict[str, int], seen: tuple[int, ...] | None,
                  batch: set[str], batch_at: int | None) -> int:
    dim = spec.shape[axis]
    if isinstance(dim, str) and dim in bound:
        return bound[dim]
    if seen is not None:
        return seen[axis]
    if _static(dim):
        return int(dim)  # type: ignore[arg-type]
    if axis in (0, batch_at) or dim in batch:
        return 1
    symbol = f"--input-shape {dim}=N or " if isinstance(dim, str) else ""
    raise OptionError(f"input '{spec.name}' has dynamic axis {axis} ('{dim or '?'}'): "
                      f"give {symbol}--input-shape {spec.name}=... or a data file")


def _bindings(specs: list[InputSpec], explicit: Mapping[str, Sequence[int] | int]) -> tuple[Shapes, dict[str, int]]:
    """(per-input overrides, symbol -> size) from the explicit overrides; refuses unknown or ambiguous
    keys and two sizes for one symbol."""
    inputs = {spec.name: spec for spec in specs}
    symbols = dim_symbols(specs)
    overrides: Shapes = {}
    bound: dict[str, tuple[int, str]] = {}
    for key, value in explicit.items():
        dims = _dims_of(key, value)
        if _names_symbol(key, dims, inputs, symbols):
            if len(dims) != 1:
                raise OptionError(f"--input-shape {key}=...: '{key}' is a dimension symbol (of "
                                  f"{', '.join(symbols[key])}); give one size, {key}=N")
            _bind(bound, key, dims[0], f"{key}={dims[0]}")
        else:
            overrides[key] = _checked_override(inputs[key], dims)
    for name, shape in overrides.items():
        for dim, size in zip(inputs[name].shape, shape):
            if isinstance(dim, str):
                _bind(bound, dim, size, f"{name}={'x'.join(map(str, shape))}")
    return overrides, {symbol: size for symbol, (size, _) in bound.items()}


def _dims_of(key: str, value: Sequence[int] | int) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not dims or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in dims):
        raise OptionError(f"--input-shape {key}: sizes must be positive integers, got {value!r}")
    return tuple(int(d) for d in dims)


def _names_symbol(key: str, dims: tuple[int, ...], inputs: dict[str, InputSpec], symbols: dict[str, list[str]]) -> bool:
    """Whether `key` binds a dimension symbol (else it names an input); refuses unknown and ambiguous keys."""
    if key not in inputs and key not in symbols:
        raise OptionError(f"--input-shape names '{key}', which is not a model input nor a dimension symbol "
                          f"(inputs: {sorted(inputs)}; symbols: {sorted(symbols)})")
    if key in inputs and key in symbols:
        if len(dims) == 1 and len(inputs[key].shape) == 1:
            raise OptionError(f"--input-shape {key}={dims[0]} is ambiguous: '{key}' is both a rank-1 input and a "
                              f"dimension symbol (of {', '.join(symbols[key])}); rename one or give the other "
                              f"symbols or inputs instead (inputs: {sorted(inputs)}; symbols: {sorted(symbols)})")
        return len(dims) == 1
    return key in symbols


def _bind(bound: dict[str, tuple[int, str]], symbol: str, size: int, source: str) -> None:
    if symbol in bound and bound[symbol][0] != size:
        raise OptionError(f"--input-shape gives dimension '{symbol}' two sizes: {bound[symbol][0]} "
                          f"({bound[symbol][1]}) and {size} ({source})")
    bound.setdefault(symbol, (size, source))


def _checked_override(spec: InputSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An --input-shape override, refused where it contradicts the model's rank or static dims."""
    if len(shape) != len(spec.shape):
        raise OptionError(f"--input-shape for '{spec.name}' has rank {len(shape)}, model says {len(spec.shape)}")
    for axis, (fixed, given) in enumerate(zip(spec.shape, shape)):
        if _static(fixed) and fixed != given:
            raise OptionError(f"--input-shape for '{spec.name}' sets axis {axis} to {given}, "
                              f"the model fixes it to {fixed}")
    return shape


def with_fixed_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A weightless copy of `model` with input shapes fixed and all intermediate shapes inferred."""
    fixed = weightless_copy(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    return infer_shapes(fixed)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Fully static shapes recorded in a model's value_info, inputs and outputs."""
    shapes: dict[str, tuple[int, ...]] = {}
    graph = model.graph
    for value in (*graph.value_info, *graph.input, *graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor_type.shape.dim]
        if all(d > 0 for d in dims) or not dims:
            shapes[value.name] = tuple(dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes

"""Concrete shapes for a batch-1 sample, and the model's real inputs (`input_specs`).

Dynamic input dimensions are resolved from, in order: explicit `name=1x3x224x224` overrides, the data
file's sample shape, and (for axis 0 only) batch 1. Intermediate shapes then come from ONNX shape
inference on a copy of the model whose inputs are fixed to those shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.errors import OptionError
from graphopt.ir.graph import infer_shapes


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'name=1x3x224x224' -> ('name', (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise OptionError(f"--input-shape expects NAME=D1xD2x..., got '{text}'")
    return name, shape


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers that double as inputs are excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), dims))
    return specs


def resolve_input_shapes(model: onnx.ModelProto, explicit: dict[str, tuple[int, ...]] | None = None,
                         observed: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Each real input's batch-1 shape: `explicit` overrides, else `observed` (a data sample), else the
    model's static dims with a dynamic axis 0 set to 1."""
    explicit, observed = explicit or {}, observed or {}
    specs = input_specs(model)
    known = {s.name for s in specs}
    for name in explicit:
        if name not in known:
            raise OptionError(f"--input-shape names '{name}', which is not a model input {sorted(known)}")
    resolved: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in explicit:
            resolved[spec.name] = _checked_override(spec, explicit[spec.name])
        elif spec.name in observed:
            resolved[spec.name] = observed[spec.name]
        else:
            resolved[spec.name] = _static_shape(spec)
    return resolved


def _checked_override(spec: InputSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An --input-shape override, refused where it contradicts the model's rank or static dims."""
    if len(shape) != len(spec.shape):
        raise OptionError(f"--input-shape for '{spec.name}' has rank {len(shape)}, model says {len(spec.shape)}")
    for axis, (fixed, given) in enumerate(zip(spec.shape, shape)):
        if isinstance(fixed, int) and fixed > 0 and fixed != given:
            raise OptionError(f"--input-shape for '{spec.name}' sets axis {axis} to {given}, "
                              f"the model fixes it to {fixed}")
    return shape


def _static_shape(spec: InputSpec) -> tuple[int, ...]:
    """The model's own dims, a dynamic batch axis taken as 1; any other dynamic axis needs the user."""
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(1)
        else:
            raise OptionError(f"input '{spec.name}' has dynamic axis {axis} ('{dim}'): "
                              f"give --input-shape {spec.name}=... or a data file")
    return tuple(dims)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference: large floating-point initializers keep their dims but not their data
    (inference reads only their shapes; copying and scanning hundreds of MB would dominate)."""
    graph = onnx.GraphProto(name=model.graph.name)
    for field in ("node", "input", "output", "sparse_initializer"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        large_float = tensor.data_type in _FLOAT_TYPES and math.prod(tensor.dims) > 64
        graph.initializer.append(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                                 if large_float else tensor)
    light = onnx.helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    light.ir_version = max(model.ir_version, 4)
    return light


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def with_fixed_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A weightless copy of `model` with input shapes fixed and all intermediate shapes inferred."""
    fixed = _without_weights(model)
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

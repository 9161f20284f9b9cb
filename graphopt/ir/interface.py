"""The declared interface of a model: the dims of its graph inputs and outputs.

ONNX shape inference writes what it can prove into the graph's outputs, including concrete sizes for
dims the model declares symbolic (a torch export's `Concatoutput_dim_1` that happens to be 84) or leaves
unnamed. Callers rely on the declared interface, so `keep_declared` puts the declared dims back after
inference, axis by axis. The only dims it leaves as found are those the graph now contradicts: a fixed
declared size that became another fixed size, or a different rank (a pass changed that axis on purpose,
e.g. pruning an output's channels); `interface_changes` lists them for the report. A value declared
without a shape gets the inferred one (the ONNX checker wants a shape on graph outputs), which is not
counted as a change. Element types are not touched. Inputs and outputs are matched by name; those the template lacks are left alone.
"""

from __future__ import annotations

from typing import Any

import onnx

Dims = list[int | str | None]


def _dims(value: onnx.ValueInfoProto) -> Dims | None:
    """The value's dims (int, symbol or None for an unnamed dim), None when it declares no shape."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def _fixed(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim > 0


def _kept(declared: Dims, found: Dims) -> Dims:
    """Per axis the declared dim, unless a fixed declared size now has another fixed size."""
    return [now if _fixed(want) and _fixed(now) and want != now else want for want, now in zip(declared, found)]


def _write(value: onnx.ValueInfoProto, dims: Dims) -> None:
    tensor_type = value.type.tensor_type
    tensor_type.ClearField("shape")
    tensor_type.shape.SetInParent()  # a rank-0 shape is still a declared shape
    for dim in dims:
        entry = tensor_type.shape.dim.add()
        if isinstance(dim, str):
            entry.dim_param = dim
        elif dim is not None:
            entry.dim_value = dim


def keep_declared(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Give `model`'s graph inputs and outputs `template`'s declared dims, in place (see the module)."""
    for values, declared_values in ((model.graph.input, template.graph.input),
                                    (model.graph.output, template.graph.output)):
        declared_by_name = {v.name: v for v in declared_values}
        for value in values:
            declared = declared_by_name.get(value.name)
            if declared is None or not value.type.HasField("tensor_type"):
                continue
            want, found = _dims(declared), _dims(value)
            if want is not None and (found is None or len(want) == len(found)):
                _write(value, want if found is None else _kept(want, found))


def interface_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[dict[str, Any]]:
    """Graph inputs and outputs (by name) whose declared dims differ between the two models."""
    changes = []
    for role, old_values, new_values in (("input", before.graph.input, after.graph.input),
                                         ("output", before.graph.output, after.graph.output)):
        new_by_name = {v.name: v for v in new_values}
        for value in old_values:
            new = new_by_name.get(value.name)
            if new is not None and _dims(value) is not None and _dims(value) != _dims(new):
                changes.append({"role": role, "name": value.name, "before": _dims(value), "after": _dims(new)})
    return changes


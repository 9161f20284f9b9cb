"""Rules for ops that move, select, create or resample values (no arithmetic on them).

Shape-like inputs (Reshape's shape, Slice's starts, Squeeze's axes, ...) are read as Python ints, so the
graph may compute them at run time. Attributes that moved to inputs across opsets are read from where the
model's opset puts them (Split, Slice, Squeeze/Unsqueeze, Pad, Clip). Resize honours nearest with the
asymmetric coordinate transform and floor rounding (what torch's nearest upsampling exports), and linear
with half_pixel, pytorch_half_pixel or align_corners on spatial axes; other modes are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.torch.interpreter.registry import Call, ints, rule, scalar


@rule("Reshape")
def reshape(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, shape = inputs[0], ints(inputs[1])
    if not call.attr("allowzero", 0):
        shape = [x.shape[i] if size == 0 else size for i, size in enumerate(shape)]
    return x.reshape(shape)


@rule("Transpose")
def transpose(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    return x.permute(call.attr("perm", list(range(x.dim()))[::-1]))


@rule("DepthToSpace")
def depth_to_space(call: Call, inputs: list[Any]) -> torch.Tensor:
    """DCR (the default): depth holds (row offset, column offset, channel); CRD (torch's PixelShuffle):
    (channel, row offset, column offset)."""
    x, block = inputs[0], int(call.attr("blocksize"))
    n, c, h, w = x.shape
    if call.attr("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, block)
    moved = x.reshape(n, block, block, c // block ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    return moved.reshape(n, c // block ** 2, h * block, w * block)


@rule("SpaceToDepth")
def space_to_depth(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, block = inputs[0], int(call.attr("blocksize"))
    n, c, h, w = x.shape
    moved = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return moved.reshape(n, c * block ** 2, h // block, w // block)


@rule("Flatten")
def flatten(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axis = call.attr("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@rule("Concat")
def concat(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=call.attr("axis"))


@rule("Split")
def split(call: Call, inputs: list[Any]) -> list[torch.Tensor]:
    x, axis = inputs[0], call.attr("axis", 0)
    sizes = ints(inputs[1] if len(inputs) > 1 else None) if call.opset >= 13 else ints(call.attr("split"))
    if not sizes:
        parts = call.attr("num_outputs", len(call.node.output))
        sizes = math.ceil(x.shape[axis] / parts)
    return list(torch.split(x, sizes, dim=axis))


@rule("Slice")
def slice_(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    if call.opset < 10:
        starts, ends, axes, steps = call.attr("starts"), call.attr("ends"), call.attr("axes"), None
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes, steps = (ints(inputs[i]) if len(inputs) > i else None for i in (3, 4))
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        chosen = range(*slice(start, end, step).indices(x.shape[axis]))
        if step > 0:
            x = x.narrow(axis, chosen.start, len(chosen)) if step == 1 else \
                x[(slice(None),) * axis + (slice(chosen.start, chosen.stop, step),)]
        else:
            x = x.index_select(axis, torch.tensor(list(chosen), dtype=torch.int64, device=x.device))
    return x


def _axes(call: Call, inputs: list[Any]) -> list[int] | None:
    return ints(inputs[1] if len(inputs) > 1 else None) if call.opset >= 13 else ints(call.attr("axes"))


@rule("Squeeze")
def squeeze(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, axes = inputs[0], _axes(call, inputs)
    if axes is None:
        return x.reshape([size for size in x.shape if size != 1])
    dropped = {a % x.dim() for a in axes}
    return x.reshape([size for i, size in enumerate(x.shape) if i not in dropped])


@rule("Unsqueeze")
def unsqueeze(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, axes = inputs[0], _axes(call, inputs) or []
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@rule("Gather")
def gather(call: Call, inputs: list[Any]) -> torch.Tensor:
    data, index = inputs
    axis = call.attr("axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index).long()
    picked = data.index_select(axis, index.reshape(-1))
    return picked.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1:]))


@rule("OneHot")
def one_hot(call: Call, inputs: list[Any]) -> torch.Tensor:
    """`values[1]` where an index hits, `values[0]` elsewhere, on a new axis of `depth` entries at `axis`;
    negative indices count from the end and indices out of [-depth, depth) hit nothing."""
    indices, depth_value, values = inputs
    depth = int(depth_value.reshape(-1)[0].item())
    index = indices.long()
    index = torch.where(index < 0, index + depth, index)
    valid = (index >= 0) & (index < depth)
    hot = F.one_hot(torch.where(valid, index, torch.zeros_like(index)), depth).bool() & valid.unsqueeze(-1)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(hot, on, off).movedim(-1, call.attr("axis", -1) % (indices.dim() + 1))


@rule("GatherElements")
def gather_elements(call: Call, inputs: list[Any]) -> torch.Tensor:
    data, index = inputs
    axis = call.attr("axis", 0) % data.dim()
    return torch.gather(data, axis, torch.where(index < 0, index + data.shape[axis], index).long())


@rule("Shape")
def shape(call: Call, inputs: list[Any]) -> torch.Tensor:
    dims = list(inputs[0].shape)
    end = call.attr("end")
    return torch.tensor(dims[call.attr("start", 0):end], dtype=torch.int64)


@rule("Size")
def size(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


_CONSTANT_KINDS = {"value_float": torch.float32, "value_floats": torch.float32, "value_int": torch.int64,
                   "value_ints": torch.int64}


@rule("Constant")
def constant(call: Call, inputs: list[Any]) -> torch.Tensor:
    if "value" in call.attributes:
        return call.attr("value")
    for name, dtype in _CONSTANT_KINDS.items():
        if name in call.attributes:
            return torch.tensor(call.attr(name), dtype=dtype)
    raise call.refuse(f"attribute {', '.join(call.attributes) or '(none)'} (string and sparse constants)")


@rule("ConstantOfShape")
def constant_of_shape(call: Call, inputs: list[Any]) -> torch.Tensor:
    value = call.attr("value")
    fill = value.reshape(-1) if value is not None else torch.zeros(1, dtype=torch.float32)
    return fill.expand(ints(inputs[0])).clone() if ints(inputs[0]) else fill.reshape([]).clone()


@rule("Expand")
def expand(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(inputs[1]))))


@rule("Tile")
def tile(call: Call, inputs: list[Any]) -> torch.Tensor:
    return inputs[0].repeat(ints(inputs[1]))


@rule("Range")
def range_(call: Call, inputs: list[Any]) -> torch.Tensor:
    start, limit, delta = inputs
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@rule("ArgMax", "ArgMin")
def arg_extreme(call: Call, inputs: list[Any]) -> torch.Tensor:
    if call.attr("select_last_index", 0):
        raise call.refuse("select_last_index")
    function = torch.argmax if call.node.op_type == "ArgMax" else torch.argmin
    return function(inputs[0], dim=call.attr("axis", 0), keepdim=bool(call.attr("keepdims", 1)))


_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_amounts(call: Call, x: torch.Tensor, inputs: list[Any]) -> tuple[list[int], list[int], float]:
    """(begin, end) padding of every axis and the constant value, from attributes or inputs by opset."""
    if call.opset < 11:
        pads, value, axes = list(call.attr("pads")), call.attr("value", 0.0), None
    else:
        pads = ints(inputs[1])
        value = scalar(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else 0.0
        axes = ints(inputs[3]) if len(inputs) > 3 else None
    axes = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[i + len(axes)]
    return begins, ends, value


def _border_index(mode: str, size: int, begin: int, end: int, device: torch.device) -> torch.Tensor:
    """Which source position each position of a padded axis reads: reflected about the end elements (reflect),
    the end element repeated (edge) or wrapped around (wrap); negative pads crop."""
    index = torch.arange(-begin, size + end, device=device)
    if mode == "reflect":
        index = index.abs()
        return torch.where(index >= size, 2 * (size - 1) - index, index)
    return index.clamp(0, size - 1) if mode == "edge" else index.remainder(size)


@rule("Pad")
def pad(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, mode = inputs[0], call.attr("mode", "constant")
    begins, ends, value = _pad_amounts(call, x, inputs)
    if mode not in _PAD_MODES:
        raise call.refuse(f"mode {mode}")
    if mode == "constant":
        return F.pad(x, [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)], value=value)
    for axis, (begin, end) in enumerate(zip(begins, ends)):
        if begin or end:
            if mode == "reflect" and max(begin, end) >= x.shape[axis]:
                raise call.refuse(f"reflect pads of {max(begin, end)} on an axis of {x.shape[axis]}")
            x = x.index_select(axis, _border_index(mode, x.shape[axis], begin, end, x.device))
    return x


def _present(inputs: list[Any], index: int) -> Any:
    value = inputs[index] if len(inputs) > index else None
    return value if value is not None and value.numel() else None


def _resize_target(call: Call, x: torch.Tensor, scales: Any, sizes: list[int] | None) -> dict[str, Any]:
    """F.interpolate's size or scale_factor for the spatial axes; batch and channel must keep their size."""
    if call.attr("axes") is not None or call.attr("antialias", 0):
        raise call.refuse("axes and antialias are not supported")
    if sizes is not None:
        if sizes[:2] != list(x.shape[:2]):
            raise call.refuse("resizing the batch or channel axis")
        return {"size": sizes[2:]}
    factors = [float(s) for s in (scales.tolist() if scales is not None else call.attr("scales", []))]
    if factors[:2] != [1.0, 1.0]:
        raise call.refuse("resizing the batch or channel axis")
    return {"scale_factor": factors[2:], "recompute_scale_factor": False}


@rule("Resize", "Upsample")
def resize(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    mode = call.attr("mode", "nearest")
    transform = call.attr("coordinate_transformation_mode", "half_pixel" if call.opset >= 11 else "asymmetric")
    if call.node.op_type == "Upsample" or call.opset < 11:  # scales as input 1 (or Upsample's attribute)
        scales, sizes = _present(inputs, 1), None
    else:
        scales, sizes = _present(inputs, 2), ints(_present(inputs, 3))
    target = _resize_target(call, x, scales, sizes)
    nearest = call.attr("nearest_mode", "round_prefer_floor" if call.opset >= 11 else "floor")
    if mode == "nearest" and transform == "asymmetric" and nearest == "floor":
        return F.interpolate(x, mode="nearest", **target)
    if mode in ("linear", "bilinear") and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = {3: "linear", 4: "bilinear", 5: "trilinear"}.get(x.dim())
        if kind is not None:
            return F.interpolate(x, mode=kind, align_corners=transform == "align_corners", **target)
    raise call.refuse(f"mode {mode} with coordinate_transformation_mode {transform} "
                      f"(nearest_mode {nearest})")


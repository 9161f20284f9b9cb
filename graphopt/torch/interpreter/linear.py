"""Rules for the weighted ops (Conv, ConvTranspose, Gemm, MatMul, Einsum), pooling and normalisation.

Padding follows ONNX: `pads` lists every spatial axis's begin then every end; `auto_pad` SAME_UPPER /
SAME_LOWER pad to ceil(input / stride) outputs (the odd pixel at the end / the beginning), VALID pads
nothing. Asymmetric pads are applied to the input explicitly (zeros for Conv and AveragePool, -inf for
MaxPool); ConvTranspose computes the full output and crops its pads, so every pad is honoured.
AveragePool without `count_include_pad` divides by the number of input pixels under each window.
BatchNormalization runs in inference form (running statistics); LayerNormalization normalises over every
axis from `axis` on and computes in float32 at least, as GroupNormalization does over each group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.torch.interpreter.registry import Call, rule

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial(call: Call, x: torch.Tensor) -> int:
    rank = x.dim() - 2
    if rank not in _CONV:
        raise call.refuse(f"{rank} spatial axes (1 to 3 are supported)")
    return rank


def _pads(call: Call, sizes: list[int], kernel: list[int], strides: list[int],
          dilations: list[int]) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis from `pads` or `auto_pad`."""
    mode = call.attr("auto_pad", "NOTSET")
    rank = len(sizes)
    if mode in ("NOTSET", ""):
        pads = list(call.attr("pads", [0] * 2 * rank))
        return pads[:rank], pads[rank:]
    if mode == "VALID":
        return [0] * rank, [0] * rank
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise call.refuse(f"auto_pad {mode}")
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begins.append(small if mode == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins, ends


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) as F.pad's list, last axis first."""
    return [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]


def _window(call: Call, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    rank = len(kernel)
    strides = list(call.attr("strides", [1] * rank))
    dilations = list(call.attr("dilations", [1] * rank))
    begins, ends = _pads(call, list(x.shape[2:]), kernel, strides, dilations)
    return strides, dilations, begins, ends


@rule("Conv")
def conv(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    rank = _spatial(call, x)
    strides, dilations, begins, ends = _window(call, x, list(weight.shape[2:]))
    padding: list[int] | int = begins
    if begins != ends:
        x, padding = F.pad(x, _torch_pad(begins, ends)), 0
    return _CONV[rank](x, weight, bias, strides, padding, dilations, call.attr("group", 1))


@rule("ConvTranspose")
def conv_transpose(call: Call, inputs: list[Any]) -> torch.Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    rank = _spatial(call, x)
    if call.attr("output_shape") is not None or call.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise call.refuse("output_shape and auto_pad are not supported (give pads)")
    strides = list(call.attr("strides", [1] * rank))
    dilations = list(call.attr("dilations", [1] * rank))
    extra = list(call.attr("output_padding", [0] * rank))
    pads = list(call.attr("pads", [0] * 2 * rank))
    full = _CONV_T[rank](x, weight, bias, strides, 0, extra, call.attr("group", 1), dilations)
    crop = tuple(slice(begin, full.shape[2 + axis] - end) for axis, (begin, end)
                 in enumerate(zip(pads[:rank], pads[rank:])))
    return full[(slice(None), slice(None), *crop)]


@rule("Gemm")
def gemm(call: Call, inputs: list[Any]) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    a = a.transpose(0, 1) if call.attr("transA", 0) else a
    b = b.transpose(0, 1) if call.attr("transB", 0) else b
    found = call.attr("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        found = found + call.attr("beta", 1.0) * inputs[2]
    return found


@rule("MatMul")
def matmul(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.matmul(inputs[0], inputs[1])


@rule("Einsum")
def einsum(call: Call, inputs: list[Any]) -> torch.Tensor:
    return torch.einsum(call.attr("equation"), *inputs)


def _pool_window(call: Call, x: torch.Tensor) -> tuple[int, list[int], list[int], list[int], list[int], list[int]]:
    """A pooling node's spatial rank, kernel, strides, dilations and pads (begins, ends)."""
    rank = _spatial(call, x)
    kernel = list(call.attr("kernel_shape"))
    return (rank, kernel, *_window(call, x, kernel))


def _torch_pads(begins: list[int], ends: list[int], kernel: list[int]) -> bool:
    """Whether torch's pooling can pad as the node does: symmetric pads of at most half the kernel."""
    return begins == ends and all(2 * p <= k for p, k in zip(begins, kernel))


@rule("MaxPool")
def max_pool(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    rank, kernel, strides, dilations, begins, ends = _pool_window(call, x)
    if call.outputs_used() > 1:
        raise call.refuse("its Indices output is not supported")
    padding: list[int] | int = begins
    if not _torch_pads(begins, ends, kernel):
        x, padding = F.pad(x, _torch_pad(begins, ends), value=-math.inf), 0
    return _MAX[rank](x, kernel, strides, padding, dilations, ceil_mode=bool(call.attr("ceil_mode", 0)))


@rule("AveragePool")
def average_pool(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    rank, kernel, strides, dilations, begins, ends = _pool_window(call, x)
    if any(d != 1 for d in dilations):
        raise call.refuse("dilations other than 1")
    ceil, include = bool(call.attr("ceil_mode", 0)), bool(call.attr("count_include_pad", 0))
    if _torch_pads(begins, ends, kernel):
        return _AVG[rank](x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include)
    if ceil:
        raise call.refuse("ceil_mode with asymmetric pads")
    pad = _torch_pad(begins, ends)
    summed = _AVG[rank](F.pad(x, pad), kernel, strides, 0)
    if include:
        return summed
    covered = _AVG[rank](F.pad(torch.ones_like(x[:1, :1]), pad), kernel, strides, 0)
    return summed / covered


@rule("GlobalAveragePool", "GlobalMaxPool")
def global_pool(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    dims = list(range(2, x.dim()))
    if call.node.op_type == "GlobalAveragePool":
        return x.mean(dim=dims, keepdim=True)
    return x.amax(dim=dims, keepdim=True)


@rule("BatchNormalization")
def batch_norm(call: Call, inputs: list[Any]) -> torch.Tensor:
    if call.attr("training_mode", 0) or call.outputs_used() > 1:
        raise call.refuse("training mode (running statistics as outputs) is not supported")
    x, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inverse = torch.rsqrt(var.reshape(shape) + call.attr("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inverse * scale.reshape(shape) + bias.reshape(shape)


@rule("InstanceNormalization")
def instance_norm(call: Call, inputs: list[Any]) -> torch.Tensor:
    return F.instance_norm(inputs[0], weight=inputs[1], bias=inputs[2], eps=call.attr("epsilon", 1e-5))


@rule("GroupNormalization")
def group_norm(call: Call, inputs: list[Any]) -> torch.Tensor:
    """Scale and bias per channel (opset 21) or, as opset 18 wrote them, per group."""
    x, scale, bias = inputs[:3]
    groups = int(call.attr("num_groups", 1))
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    normalised = F.group_norm(wide, groups, eps=call.attr("epsilon", 1e-5)).to(x.dtype)
    repeat = x.shape[1] // scale.numel()
    shape = [1, -1] + [1] * (x.dim() - 2)
    return normalised * scale.repeat_interleave(repeat).reshape(shape) + bias.repeat_interleave(repeat).reshape(shape)


@rule("LayerNormalization")
def layer_norm(call: Call, inputs: list[Any]) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = call.attr("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = wide.mean(dim=dims, keepdim=True)
    centred = wide - mean
    inverse = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + call.attr("epsilon", 1e-5))
    found = (centred * inverse).to(x.dtype) * scale
    found = found + bias if bias is not None else found
    return [found, mean, inverse][:max(1, call.outputs_used())]

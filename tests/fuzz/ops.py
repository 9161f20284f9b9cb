"""Producers and per-channel ops of random graphs: each takes the Builder and a Tensor and returns the new
Tensor, planting rows and keeping planted zeros zero as the Planting says (tests/fuzz/builder.py)."""

from __future__ import annotations

import numpy as np

from tests.fuzz.builder import Builder, Tensor, chance, pick


# -- producers ---------------------------------------------------------------------------------

def _conv_geometry(b: Builder, size: tuple[int, int], keep_size: bool) -> dict[str, object]:
    """Kernel, stride, pads and dilation of a Conv on a map of `size` (same size when `keep_size`)."""
    small = min(size)
    options = ["1x1", "3x3 same"] + ([] if keep_size or small < 3 else ["3x3 valid", "3x3 stride 2", "3x3 pad 0101"])
    if small >= 5:
        options.append("3x3 dilated")
    options.append("3x3 auto_pad")
    kind = pick(b.chooser, options)
    if kind == "3x3 auto_pad":  # SAME_UPPER/SAME_LOWER: stride 1 keeps the size, the padding is implicit
        return {"kernel_shape": [3, 3], "strides": [1, 1], "auto_pad": pick(b.chooser, ["SAME_UPPER", "SAME_LOWER"])}
    if kind == "1x1":
        stride = 2 if not keep_size and small >= 2 and chance(b.chooser, 20) else 1
        return {"kernel_shape": [1, 1], "strides": [stride, stride], "pads": [0, 0, 0, 0]}
    table = {"3x3 same": ([1, 1], [1, 1, 1, 1], [1, 1]), "3x3 valid": ([1, 1], [0, 0, 0, 0], [1, 1]),
             "3x3 stride 2": ([2, 2], [1, 1, 1, 1], [1, 1]), "3x3 pad 0101": ([1, 1], [0, 1, 0, 1], [1, 1]),
             "3x3 dilated": ([1, 1], [2, 2, 2, 2], [2, 2])}
    strides, pads, dilations = table[kind]
    return {"kernel_shape": [3, 3], "strides": strides, "pads": pads, "dilations": dilations}


def _spatial_out(size: tuple[int, int], attrs: dict[str, object]) -> tuple[int, int]:
    kernel, strides = attrs["kernel_shape"], attrs["strides"]
    if attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return size
    pads, dilations = attrs.get("pads", [0, 0, 0, 0]), attrs.get("dilations", [1, 1])
    return tuple((size[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(2))  # type: ignore[return-value]


def _groups(b: Builder, channels: int, out: int, plain: bool) -> int:
    """1, a shared divisor of `channels` and `out` (grouped), or `channels` (depthwise, when out == channels)."""
    if plain:
        return 1
    kind = pick(b.chooser, ["plain", "plain", "grouped", "depthwise"])
    divisors = [g for g in range(2, min(channels, out) + 1) if channels % g == 0 and out % g == 0]
    if kind == "grouped" and divisors:
        return pick(b.chooser, divisors)
    if kind == "depthwise" and out in (channels, 2 * channels) and channels > 1:
        return channels  # out == 2 * channels: a depthwise multiplier, grouped for the analysis
    return 1


def conv(b: Builder, t: Tensor, out: int | None = None, must: np.ndarray | None = None, keep_size: bool = False,
         plain: bool = False) -> Tensor:
    """Conv on NCHW: plain, grouped or depthwise; zero rows planted (at least `must`), dead input slices zeroed."""
    channels = t.channels
    out = out if out is not None else b.chooser.integer(2, 8)
    groups = _groups(b, channels, out, plain or must is not None)
    attrs = _conv_geometry(b, t.spatial, keep_size)
    kernel = attrs["kernel_shape"][0]
    weight = b.weight((out, channels // groups, kernel, kernel), channels // groups * kernel * kernel)
    bias = b.bias(out) if chance(b.chooser, 70) else None
    if groups == channels and channels > 1 and out == channels:  # depthwise: a planted channel stays planted
        planted, dead = t.planted.copy(), t.dead.copy()
        if bias is not None:
            bias = b.keeps_zero(bias, planted)
        name = b.const(weight, "w")
    else:
        planted, constant, dead = b.rows(out, must)
        weight[planted] = 0.0
        if groups == 1:
            weight[:, t.dead] = 0.0
        name, planted = b.shared(weight, 0)
        if bias is not None:
            bias[planted & ~constant] = 0.0
    inputs = [t.name, name] + ([b.const(bias, "b")] if bias is not None else [])
    (name,) = b.node("Conv", inputs, group=groups, **attrs)
    b.ops.append(f"Conv(k{kernel},g{groups})")
    return b.tensor(name, (1, out, *_spatial_out(t.spatial, attrs)), "nchw", planted, dead)


def _gemm_bias(b: Builder, out: int, planted: np.ndarray, constant: np.ndarray) -> np.ndarray | None:
    form = pick(b.chooser, ["vector", "none", "row", "scalar"])
    if form == "none" or (form == "scalar" and b.planting.guard and planted.any()):
        return None
    if form == "scalar":
        return b.bias(1).reshape(())
    bias = b.bias(out)
    bias[planted & ~constant] = 0.0
    return bias.reshape(1, out) if form == "row" else bias


def gemm(b: Builder, t: Tensor, out: int | None = None, must: np.ndarray | None = None) -> Tensor:
    features = t.channels
    out = out if out is not None else b.chooser.integer(2, 10)
    trans_b = chance(b.chooser, 50)
    planted, constant, dead = b.rows(out, must)
    weight = b.weight((features, out), features)
    weight[:, planted] = 0.0
    weight[t.dead, :] = 0.0
    bias = _gemm_bias(b, out, planted, constant)
    attrs = {"transB": 1} if trans_b else {}
    if chance(b.chooser, 20):
        attrs.update(alpha=0.5, beta=2.0)
    inputs = [t.name, b.const(weight.T.copy() if trans_b else weight, "w")]
    if bias is not None:
        inputs.append(b.const(bias, "b"))
    (name,) = b.node("Gemm", inputs, **attrs)
    b.ops.append("Gemm")
    return b.tensor(name, (1, out), "flat", planted, dead)


def matmul(b: Builder, t: Tensor, out: int | None = None, must: np.ndarray | None = None) -> Tensor:
    """x @ W (+ bias) over the last axis of [N, F] or NHWC."""
    features = t.channels
    out = out if out is not None else b.chooser.integer(2, 10)
    planted, constant, dead = b.rows(out, must)
    weight = b.weight((features, out), features)
    weight[:, planted] = 0.0
    weight[t.dead, :] = 0.0
    shared, planted = b.shared(weight, 1)
    (name,) = b.node("MatMul", [t.name, shared])
    if chance(b.chooser, 60):
        bias = b.bias(out)
        bias[planted & ~constant] = 0.0
        (name,) = b.node("Add", [name, b.const(bias, "b")])
    b.ops.append("MatMul")
    return b.tensor(name, (*t.shape[:-1], out), t.layout, planted, dead)


def conv_transpose(b: Builder, t: Tensor, out: int | None = None, must: np.ndarray | None = None,
                   keep_size: bool = False) -> Tensor:
    """ConvTranspose (weight [C_in, C_out, k, k]): a 2x upsampling, or 3x3 with pads 1 (the same size)."""
    channels, (h, w) = t.channels, t.spatial
    out = out if out is not None else b.chooser.integer(2, 8)
    upsample = not keep_size and chance(b.chooser, 50)
    kernel, stride, pad = (2, 2, 0) if upsample else (3, 1, 1)
    planted, constant, dead = b.rows(out, must)
    weight = b.weight((channels, out, kernel, kernel), channels * kernel * kernel)
    weight[:, planted] = 0.0
    weight[t.dead] = 0.0
    inputs = [t.name, b.const(weight, "w")]
    if chance(b.chooser, 70):
        bias = b.bias(out)
        bias[planted & ~constant] = 0.0
        inputs.append(b.const(bias, "b"))
    (name,) = b.node("ConvTranspose", inputs, kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)
    b.ops.append(f"ConvTranspose(k{kernel})")
    size = ((h - 1) * stride + kernel - 2 * pad, (w - 1) * stride + kernel - 2 * pad)
    return b.tensor(name, (1, out, *size), "nchw", planted, dead)


def producer(b: Builder, t: Tensor, out: int | None = None, must: np.ndarray | None = None,
             keep_size: bool = False) -> Tensor:
    """The layout's producer: Conv (sometimes ConvTranspose) on NCHW, Gemm or MatMul on [N, F], MatMul on
    NHWC and tokens."""
    if t.layout == "nchw":
        if chance(b.chooser, 12):
            return conv_transpose(b, t, out, must, keep_size)
        return conv(b, t, out, must, keep_size)
    if t.layout == "flat" and chance(b.chooser, 50):
        return gemm(b, t, out, must)
    return matmul(b, t, out, must)


# -- per-channel ops ---------------------------------------------------------------------------

# activation -> (keeps 0 at 0, lowest opset, attributes)
ACTIVATIONS: dict[str, tuple[bool, int, dict[str, object]]] = {
    "Relu": (True, 1, {}), "Tanh": (True, 1, {}), "LeakyRelu": (True, 1, {"alpha": 0.1}), "Elu": (True, 1, {}),
    "Clip": (True, 11, {}), "HardSwish": (True, 14, {}), "Swish": (True, 1, {}),
    "Sigmoid": (False, 1, {}), "HardSigmoid": (False, 1, {}), "Softplus": (False, 1, {}),
}


def activation(b: Builder, t: Tensor) -> Tensor:
    allowed = [op for op, (keeps, since, _) in ACTIVATIONS.items()
               if since <= b.opset and (keeps or not (b.planting.guard and t.planted.any()))]
    op = pick(b.chooser, allowed)
    if op == "Swish":  # x * Sigmoid(x): the exporters' SiLU
        (gate,) = b.node("Sigmoid", [t.name])
        (name,) = b.node("Mul", [t.name, gate])
    elif op == "Clip":
        (name,) = b.node("Clip", [t.name, b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32))])
    else:
        (name,) = b.node(op, [t.name], **ACTIVATIONS[op][2])
    b.ops.append(op)
    return b.tensor(name, t.shape, t.layout, t.planted, t.dead)


def batchnorm(b: Builder, t: Tensor) -> Tensor:
    channels = t.channels
    scale = (b.rng.uniform(0.5, 1.5, channels) * b.rng.choice([-1.0, 1.0], channels)).astype(np.float32)
    shift = b.keeps_zero(b.bias(channels) * 5, t.planted)
    mean = b.keeps_zero(b.bias(channels) * 5, t.planted)
    var = b.rng.uniform(0.5, 2.0, channels).astype(np.float32)
    (name,) = b.node("BatchNormalization", [t.name, *(b.const(v, "bn") for v in (scale, shift, mean, var))])
    b.ops.append("BatchNormalization")
    return b.tensor(name, t.shape, t.layout, t.planted, t.dead)


def affine(b: Builder, t: Tensor) -> Tensor:
    """Mul or Add of a per-channel (or scalar) constant broadcast onto the channel axis."""
    op = pick(b.chooser, ["Mul", "Add"])
    per_channel = not chance(b.chooser, 20)
    if per_channel:
        values = b.rng.uniform(0.5, 1.5, t.channels).astype(np.float32) if op == "Mul" else b.bias(t.channels)
        values = b.keeps_zero(values, t.planted) if op == "Add" else values
        shape = (t.channels, 1, 1) if t.layout == "nchw" else (t.channels,)
    else:
        zero_kept = op == "Add" and b.planting.guard and t.planted.any()
        values, shape = np.array([0.0 if zero_kept else 0.75], np.float32), (1,)
    (name,) = b.node(op, [t.name, b.const(values.reshape(shape), "k")])
    b.ops.append(f"{op}(const)")
    return b.tensor(name, t.shape, t.layout, t.planted, t.dead)


def pool(b: Builder, t: Tensor) -> Tensor:
    h, w = t.spatial
    options = ["GlobalAveragePool", "MaxPool 3 same", "AveragePool 3 same", "AveragePool 3 same counted"]
    if min(h, w) >= 2:
        options += ["MaxPool 2", "AveragePool 2", "MaxPool 2 ceil"]
    kind = pick(b.chooser, options)
    op = kind.split()[0]
    if op == "GlobalAveragePool":
        attrs: dict[str, object] = {}
        size = (1, 1)
    else:
        k = 3 if " 3 " in kind + " " else 2
        attrs = {"kernel_shape": [k, k], "strides": [k, k] if k == 2 else [1, 1],
                 "pads": [0, 0, 0, 0] if k == 2 else [1, 1, 1, 1]}
        if kind.endswith("counted"):
            attrs["count_include_pad"] = 1
        size = _spatial_out((h, w), attrs)
        if kind.endswith("ceil"):
            attrs["ceil_mode"] = 1
            size = (-(-(h - 2) // 2) + 1, -(-(w - 2) // 2) + 1)
    (name,) = b.node(op, [t.name], **attrs)
    b.ops.append(op)
    return b.tensor(name, (1, t.channels, *size), "nchw", t.planted, t.dead)


def resize(b: Builder, t: Tensor) -> Tensor:
    """Nearest 2x upsampling of H and W (Resize with constant scales)."""
    scales = b.const(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales")
    roi = b.const(np.zeros(0, np.float32), "roi") if b.opset < 13 else ""
    (name,) = b.node("Resize", [t.name, roi, scales], mode="nearest")
    b.ops.append("Resize")
    h, w = t.spatial
    return b.tensor(name, (1, t.channels, 2 * h, 2 * w), "nchw", t.planted, t.dead)


def pad(b: Builder, t: Tensor) -> Tensor:
    """Pad of H and W: zeros, edge or reflect."""
    mode = pick(b.chooser, ["constant", "edge", "reflect"] if min(t.spatial) > 1 else ["constant", "edge"])
    before, after = b.chooser.integer(0, 1), 1
    pads = b.const(np.array([0, 0, before, before, 0, 0, after, after], np.int64), "pads")
    (name,) = b.node("Pad", [t.name, pads], mode=mode)
    b.ops.append(f"Pad({mode})")
    h, w = t.spatial
    return b.tensor(name, (1, t.channels, h + before + after, w + before + after), "nchw", t.planted, t.dead)

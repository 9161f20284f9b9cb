"""Pruning through QDQ weights: a layer whose weight (or bias) is the DequantizeLinear of a stored integer
constant (onnxruntime's static QDQ quantization writes every Conv, Gemm and MatMul weight this way) is pruned
like a float layer, and its integers are written back afterwards.

`unquantize_weights` replaces each such DequantizeLinear (and those of other constants: onnxruntime quantizes the
bias a MatMul's Add reads too, and a Constant node's value as a QuantizeLinear/DequantizeLinear pair, whose
integers are the QuantizeLinear's rounding of it) by the float constant it computes, bit for bit what
onnxruntime computes ((q - zero_point) x scale in float32), so the graph still computes exactly what it did and
every channel method sees float weights. Activations keep their QuantizeLinear/DequantizeLinear pairs: the
channel analysis passes channels through them (graphopt.analysis.oprules.quantized).

`requantize_weights` turns each of those float constants back into an integer constant behind a
DequantizeLinear with the original's element type, axis and scheme. Channel by channel along the scale's axis,
the original channels are tried in order (pruning keeps channels in their order): a channel whose values are
integers times one original channel's scale (plus its zero point) within the type's range keeps that scale and
zero point, so a channel that was only sliced comes back as the very integers it had. A channel whose values
changed (SNP's reconstruction, cob's rotation) gets a new scale from its range, symmetric where the original
zero points were all zero, as onnxruntime quantizes weights; its error is at most half a step. A bias takes
the scale its weight channel kept, or where the weight was quantized again, the original ratio of bias scale to
weight scale (onnxruntime's input scale) times the new weight scale.

Blocked quantization (`block_size`), 4-bit and 8-bit float types and graph outputs are left as they are (the
channel analysis then leaves those layers alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir

_INTEGER = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
            for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}
_TOLERANCE = 1e-3  # how far from an integer a stored value divided by a scale may land (float32 rounding)


@dataclass
class Quantized:
    """One DequantizeLinear of a constant that layers read: its stored integers, scale, zero point and axis."""

    name: str
    values: np.ndarray  # the integers
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None  # None: one scale for the tensor
    readers: list[tuple[gs.Node, int]] = field(default_factory=list)  # (layer, input index)
    bias_of: "Quantized | None" = None  # a bias: the weight of its layer, whose channels it follows
    node: gs.Node | None = None  # the DequantizeLinear itself, put back where nothing changed
    output: gs.Variable | None = None
    quantize: gs.Node | None = None  # the QuantizeLinear of a float constant only `node` reads, put back with it
    # once written back: the scale of each written channel and the original channel it kept (None: quantized anew)
    written_scale: np.ndarray | None = None
    written_channels: list[int | None] | None = None

    def floats(self) -> np.ndarray:
        """What DequantizeLinear computes: (q - zero point) x scale in float32, in the scale's type."""
        zero = 0.0 if self.zero_point is None else self._along(self.zero_point).astype(np.float32)
        steps = self.values.astype(np.float32) - zero
        return np.asarray(steps * self._along(self.scale).astype(np.float32)).astype(self.scale.dtype)

    def _along(self, per_channel: np.ndarray) -> np.ndarray:
        return _broadcast(per_channel, self.values.ndim, self.axis)


def _constants(node: gs.Node) -> tuple[np.ndarray, gs.Constant, gs.Constant | None, gs.Node | None] | None:
    """(the stored integers, scale, zero point, the QuantizeLinear of a float constant that computes the integers
    or None) a DequantizeLinear reads, when it can take them back (constants, no blocked quantization)."""
    if node.op != "DequantizeLinear" or len(node.inputs) < 2 or node.attrs.get("block_size", 0):
        return None
    stored, scale = node.inputs[0], node.inputs[1]
    zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if not all(isinstance(t, gs.Constant) for t in (scale, *([zero] if zero is not None else []))):
        return None
    quantize = stored.inputs[0] if isinstance(stored, gs.Variable) and len(stored.inputs) == 1 else None
    if quantize is not None:
        values = _quantized_constant(quantize, node)
        return None if values is None else (values, scale, zero, quantize)
    if not isinstance(stored, gs.Constant) or np.asarray(stored.values).dtype not in _INTEGER:
        return None
    return np.asarray(stored.values), scale, zero, None


def _quantized_constant(quantize: gs.Node, dequantize: gs.Node) -> np.ndarray | None:
    """The integers a QuantizeLinear computes from a float constant, with the very scale and zero point
    `dequantize` reads (a constant's QDQ pair, as onnxruntime writes it for Constant nodes): round half to even
    and saturate, as the operator does; None for any other producer."""
    same_axis = quantize.attrs.get("axis", 1) == dequantize.attrs.get("axis", 1)
    if quantize.op != "QuantizeLinear" or quantize.attrs.get("block_size", 0) or not same_axis \
            or quantize.inputs[1:] != dequantize.inputs[1:]:
        return None
    source = quantize.inputs[0]
    zero = dequantize.inputs[2] if len(dequantize.inputs) > 2 and dequantize.inputs[2].name else None
    dtype = np.dtype(np.uint8) if zero is None else np.asarray(zero.values).dtype
    if not isinstance(source, gs.Constant) or np.asarray(source.values).dtype.kind != "f" or dtype not in _INTEGER \
            or "output_dtype" in quantize.attrs:
        return None
    values = np.asarray(source.values, dtype=np.float32)
    scale = np.asarray(dequantize.inputs[1].values, dtype=np.float32).reshape(-1)
    axis = None if scale.size == 1 else int(dequantize.attrs.get("axis", 1)) % max(values.ndim, 1)
    point = np.zeros(1, np.float32) if zero is None else np.asarray(zero.values, dtype=np.float32).reshape(-1)
    steps = np.rint(values / _broadcast(scale, values.ndim, axis)) + _broadcast(point, values.ndim, axis)
    return np.clip(steps, *_INTEGER[dtype]).astype(dtype)


def _broadcast(per_channel: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """One value for the tensor, or one per channel of `axis` shaped to broadcast over `rank` axes."""
    if axis is None or per_channel.size == 1:
        return per_channel.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return per_channel.reshape(shape)


def _stored(node: gs.Node, graph_outputs: set[str]) -> Quantized | None:
    """The DequantizeLinear `node` as a record, when it dequantizes stored constants with a per-tensor or per-axis
    scale this module writes back, and its output is no graph output."""
    found = _constants(node)
    out = node.outputs[0] if node.outputs else None
    if found is None or out is None or out.name in graph_outputs or not out.outputs:
        return None
    readers = [(reader, index) for reader in out.outputs for index, t in enumerate(reader.inputs) if t is out]
    values, scale, zero, quantize = found
    scale_values = np.asarray(scale.values)
    axis = None if scale_values.size == 1 and scale_values.ndim <= 1 else \
        int(node.attrs.get("axis", 1)) % max(values.ndim, 1)
    zero_values = None if zero is None else np.asarray(zero.values).reshape(-1)
    return Quantized(out.name, values, scale_values.reshape(-1), zero_values, axis, readers, node=node, output=out,
                     quantize=quantize if quantize is not None and len(quantize.outputs[0].outputs) == 1 else None)


def unquantize_weights(graph: gs.Graph) -> list[Quantized]:
    """Replace every DequantizeLinear of stored constants (a layer's weight or bias, a bias Add's operand) by the
    float constant it computes (the same values); return what was replaced, for `requantize_weights`."""
    outputs = {t.name for t in graph.outputs}
    found = []
    for node in list(graph.nodes):
        record = _stored(node, outputs)
        if record is None:
            continue
        constant = gs.Constant(ir.unique_name(graph, f"{record.name}_float"), record.floats())
        for reader, index in record.readers:
            reader.inputs[index] = constant
        node.outputs.clear()
        graph.nodes.remove(node)
        if record.quantize is not None:
            graph.nodes.remove(record.quantize)
        found.append(record)
    weights = {id(reader): record for record in found for reader, index in record.readers if index == 1}
    for record in found:
        record.bias_of = next((weights.get(id(r)) for r, index in record.readers if index == 2), None)
    return found


def requantize_weights(graph: gs.Graph, records: list[Quantized]) -> dict[str, int]:
    """Write every float weight and bias `unquantize_weights` made (where a layer still reads it) back as
    integers behind a DequantizeLinear; stats: channels restored as they were and channels quantized anew."""
    stats = {"quantized_channels_kept": 0, "quantized_channels_requantized": 0}
    present = {id(node) for node in graph.nodes}
    written: dict[int, gs.Variable] = {}  # float constant id -> its new DequantizeLinear output
    restored: set[int] = set()  # records whose own DequantizeLinear is back in the graph
    for record in sorted(records, key=lambda r: r.bias_of is not None):  # weights first: biases follow them
        for reader, index in record.readers:
            constant = reader.inputs[index] if id(reader) in present else None
            if not isinstance(constant, gs.Constant) or np.asarray(constant.values).dtype.kind != "f":
                continue
            if id(constant) not in written:
                written[id(constant)] = _write_back(graph, record, constant, restored)
                kept = sum(c is not None for c in record.written_channels)
                stats["quantized_channels_kept"] += kept
                stats["quantized_channels_requantized"] += len(record.written_channels) - kept
            reader.inputs[index] = written[id(constant)]
    ir.cleanup(graph)  # the DequantizeLinear nodes go before their readers
    return stats


def _write_back(graph: gs.Graph, record: Quantized, constant: gs.Constant, restored: set[int]) -> gs.Variable:
    """The DequantizeLinear output standing for `constant`: the original one where the values are as they were,
    else new integers."""
    if _unchanged(record, constant):
        record.written_scale = record.scale
        record.written_channels = list(range(record.scale.size)) if record.axis is not None else [0]
        return _restore(graph, record, restored)
    values = np.asarray(constant.values, dtype=np.float32)
    stored, scale, zero = quantize_weight(record, values) if record.bias_of is None \
        else _quantize_bias(record, values)
    return _dequantize_node(graph, record, constant.name, stored, scale, zero)


def _unchanged(record: Quantized, constant: gs.Constant) -> bool:
    values = np.asarray(constant.values)
    return values.shape == record.values.shape and np.array_equal(values, record.floats())


def _restore(graph: gs.Graph, record: Quantized, restored: set[int]) -> gs.Variable:
    """The original DequantizeLinear, its constants and names as they were (put back once)."""
    if id(record) not in restored:
        restored.add(id(record))
        record.node.outputs.append(record.output)
        if record.quantize is not None:
            graph.nodes.append(record.quantize)
        graph.nodes.append(record.node)
    return record.output


def _channels(record: Quantized, values: np.ndarray) -> list[np.ndarray]:
    if record.axis is None:
        return [values]
    return [np.take(values, c, axis=record.axis) for c in range(values.shape[record.axis])]


def _fits(channel: np.ndarray, scale: float, zero: int, bounds: tuple[int, int]) -> bool:
    """Whether `channel` is integers within `bounds` with this scale and zero point."""
    if scale <= 0 or not np.isfinite(scale):
        return False
    steps = channel.astype(np.float64) / scale + zero
    stored = np.rint(steps)
    if np.any(np.abs(steps - stored) > _TOLERANCE * np.maximum(1.0, np.abs(stored) * 1e-3)):
        return False
    return not stored.size or (stored.min() >= bounds[0] and stored.max() <= bounds[1])


def _fresh(channel: np.ndarray, symmetric: bool, bounds: tuple[int, int]) -> tuple[float, int]:
    """A scale and zero point for `channel` from its range (symmetric: zero point 0, the range ±max|value|)."""
    low, high = min(float(channel.min(initial=0.0)), 0.0), max(float(channel.max(initial=0.0)), 0.0)
    if symmetric:
        reach = max(-low, high)
        limit = min(-bounds[0], bounds[1]) if bounds[0] < 0 else bounds[1]
        return (reach / limit if reach > 0 else 1.0), 0
    scale = (high - low) / (bounds[1] - bounds[0]) if high > low else 1.0
    return scale, int(np.clip(np.rint(bounds[0] - low / scale), *bounds))


def _zero_points(record: Quantized) -> np.ndarray:
    return record.zero_point if record.zero_point is not None else np.zeros(record.scale.size, dtype=np.int64)


def _write(record: Quantized, values: np.ndarray, choose: Callable[[int, np.ndarray], tuple[float, int, int | None]]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`values` as (integers, scale, zero point), channel by channel with the (scale, zero point, original channel
    or None) `choose` gives each, recorded on `record` as written."""
    bounds = _INTEGER[record.values.dtype]
    pieces, scales, points, chosen = [], [], [], []
    for position, channel in enumerate(_channels(record, values)):
        scale, zero, original = choose(position, channel)
        pieces.append(np.clip(np.rint(channel.astype(np.float64) / scale + zero), *bounds))
        scales.append(scale)
        points.append(zero)
        chosen.append(original)
    record.written_scale = np.asarray(scales, dtype=np.float64)
    record.written_channels = chosen
    return _assemble(record, pieces, scales, points, values.shape)


def quantize_weight(record: Quantized, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each channel keeps the scale of the first original channel (after the last one taken) it is integers of,
    else gets one from its range."""
    bounds = _INTEGER[record.values.dtype]
    zeros = _zero_points(record)
    symmetric = not np.any(zeros)
    start = 0

    def choose(position: int, channel: np.ndarray) -> tuple[float, int, int | None]:
        nonlocal start
        for original in range(start, record.scale.size):
            if _fits(channel, float(record.scale[original]), int(zeros[original]), bounds):
                start = original + 1
                return float(record.scale[original]), int(zeros[original]), original
        return (*_fresh(channel, symmetric, bounds), None)

    return _write(record, values, choose)


def _quantize_bias(record: Quantized, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A bias follows its weight's channels: the original scale where the weight channel kept its own, else the
    original ratio of bias scale to weight scale times the weight channel's new scale."""
    bounds = _INTEGER[record.values.dtype]
    zeros = _zero_points(record)
    weight = record.bias_of
    ratio = float(np.median(record.scale / weight.scale)) if weight is not None and \
        weight.scale.size == record.scale.size else None
    count = values.shape[record.axis] if record.axis is not None else 1
    weight_channels = weight.written_channels if weight is not None else None
    followed = weight_channels if weight_channels is not None and len(weight_channels) == count else None

    def choose(position: int, channel: np.ndarray) -> tuple[float, int, int | None]:
        original = followed[position] if followed is not None else None
        if original is not None and original < record.scale.size:
            return float(record.scale[original]), int(zeros[original]), original
        if ratio is not None and followed is not None:
            return ratio * _new_weight_scale(weight, position), 0, None
        return (*_fresh(channel, True, bounds), None)

    return _write(record, values, choose)


def _new_weight_scale(weight: Quantized, position: int) -> float:
    written = weight.written_scale
    return float(written[position]) if written is not None and position < written.size \
        else float(np.median(weight.scale))


def _assemble(record: Quantized, pieces: list[np.ndarray], scales: list[float], points: list[int],
              shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    dtype = record.values.dtype
    if record.axis is None:
        stored = pieces[0].reshape(shape).astype(dtype)
    else:
        stored = np.stack(pieces, axis=record.axis).reshape(shape).astype(dtype)
    scale = np.asarray(scales, dtype=record.scale.dtype)
    zero = None if record.zero_point is None else np.asarray(points, dtype=record.zero_point.dtype)
    if record.axis is None:
        scale, zero = scale.reshape(()), (None if zero is None else zero.reshape(()))
    return stored, scale, zero


def _dequantize_node(graph: gs.Graph, record: Quantized, name: str, stored: np.ndarray, scale: np.ndarray,
                     zero: np.ndarray | None) -> gs.Variable:
    base = name[:-len("_float")] if name.endswith("_float") else name
    inputs = [gs.Constant(ir.unique_name(graph, f"{base}_quantized"), stored),
              gs.Constant(ir.unique_name(graph, f"{base}_scale"), scale)]
    if zero is not None:
        inputs.append(gs.Constant(ir.unique_name(graph, f"{base}_zero_point"), zero))
    out = gs.Variable(ir.unique_name(graph, base), dtype=record.scale.dtype, shape=list(stored.shape))
    attrs = {} if record.axis is None else {"axis": record.axis}
    graph.nodes.append(gs.Node("DequantizeLinear", ir.unique_name(graph, f"{base}_DequantizeLinear"), attrs=attrs,
                               inputs=inputs, outputs=[out]))
    return out

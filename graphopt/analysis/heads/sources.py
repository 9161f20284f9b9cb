"""Where a head block's heads come from: the linear projections behind a head split, through per-channel
ops and Split/Slice of a packed projection, and the projections of com.microsoft attention ops (Attention,
MultiHeadAttention, GroupQueryAttention)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.heads.blocks import (HeadBlock, HeadSlice, PackedCut, ShapeEntry, Shapes, constant_value,
                                            weight_slice)
from graphopt.ir.graph import per_tensor_qdq

PER_CHANNEL = {"Add", "Sub", "Mul", "Div"}
SECTION_LAYOUT = {"Unsqueeze", "Squeeze", "Transpose"}


def _projection(node: gs.Node, width: int, offset: int) -> list[HeadSlice] | None:
    """The weight (and Gemm bias) slices of a linear producer, None when `node` is not one."""
    weight = weight_slice(node, width, offset)
    if weight is None:
        return None
    bias = constant_value(node.inputs[2]) if node.op == "Gemm" and len(node.inputs) > 2 else None
    return [weight] + ([HeadSlice(node, 2, bias.ndim - 1, width, offset)] if bias is not None and bias.size > 1 else [])


def _back(node: gs.Node, tensor: gs.Tensor, width: int, offset: int,
          shapes: Shapes) -> tuple[list[HeadSlice | PackedCut], gs.Tensor, int] | str:
    """One step back from `tensor` through its producer `node`: (slices, the tensor it reads, new offset)."""
    if per_tensor_qdq(node):  # an activation's quantize/dequantize pair (QDQ models) keeps every column
        return [], node.inputs[0], offset
    if node.op in PER_CHANNEL and len(node.inputs) == 2:
        step = _per_channel(node, tensor, width, offset, shapes)
        return step if isinstance(step, str) else (step[0], step[1], offset)
    if node.op == "Gather":
        section = gathered_section(tensor, shapes)
        if isinstance(section, str):
            return f"{node.name} (Gather): {section}"
        reshape, start, width_entry = section
        return [ShapeEntry(reshape, width_entry, width)], reshape.inputs[0], offset + start
    if node.op in ("Split", "Slice"):
        start = _split_start(node, tensor, shapes) if node.op == "Split" else _slice_start(node, shapes)
        if start is None:
            return f"{node.name} ({node.op}): not a constant cut of the last axis"
        return [PackedCut(node.inputs[0], width, offset + start)], node.inputs[0], offset + start
    return f"{node.name} ({node.op}): not a linear projection"


def _moved(node: gs.Node, axis: int, shapes: Shapes) -> int | None:
    """Where input `axis` of a Transpose, Unsqueeze or Squeeze lands in its output (None: squeezed, or unknown)."""
    rank_in, rank_out = len(shapes.get(node.inputs[0].name, ())), len(shapes.get(node.outputs[0].name, ()))
    if node.op == "Transpose":
        return list(node.attrs.get("perm", range(rank_in - 1, -1, -1))).index(axis)
    given = node.attrs.get("axes") if len(node.inputs) < 2 else constant_value(node.inputs[1])
    if given is None:
        return None
    if node.op == "Squeeze":
        axes = sorted(int(a) % rank_in for a in np.reshape(given, -1))
        return None if axis in axes else axis - sum(a < axis for a in axes)
    position = axis
    for inserted in sorted(int(a) % rank_out for a in np.reshape(given, -1)):
        position += inserted <= position
    return position


def gathered_section(tensor: gs.Tensor, shapes: Shapes) -> tuple[gs.Node, int, int] | str:
    """`tensor` as one section of a packed projection reshaped to [..., sections, width], moved by Unsqueeze,
    Transpose and Squeeze that keep the width last (per-tensor quantize/dequantize pairs between them), and taken
    by a Gather of a constant position along the sections (torch's nn.MultiheadAttention: [seq, batch, 3, E],
    then unsqueeze, transpose, squeeze, select): (that Reshape, the section's first column, the position of the
    width in its target), or why not."""
    gather = tensor.inputs[0]
    index = constant_value(gather.inputs[1])
    if index is None or index.ndim != 0:
        return "not a constant position"
    chain, current = [], gather.inputs[0]
    while current.inputs and (current.inputs[0].op in SECTION_LAYOUT or per_tensor_qdq(current.inputs[0])):
        if current.inputs[0].op in SECTION_LAYOUT:  # a quantize/dequantize pair (QDQ models) moves no axis
            chain.append(current.inputs[0])
        current = current.inputs[0].inputs[0]
    split = _sections(current, shapes)
    if split is None:
        return "not a section of a packed projection split into [sections, width]"
    reshape, sections, width = split
    rank = len(shapes[current.name])
    section, last = rank - 2, rank - 1
    for node in reversed(chain):
        section, last = _moved(node, section, shapes), _moved(node, last, shapes)
        if section is None or last is None:
            return f"{node.name} ({node.op}) moves the sections or the width"
    rank = len(shapes.get(gather.inputs[0].name, ()))
    if int(gather.attrs.get("axis", 0)) % max(rank, 1) != section or last != rank - 1:
        return "not a section of a packed projection split into [sections, width]"
    return reshape, (int(index) % sections) * width, len(shapes[current.name]) - 1


def _sections(tensor: gs.Tensor, shapes: Shapes) -> tuple[gs.Node, int, int] | None:
    """(the Reshape, sections, width) where `tensor` is a Reshape of its input's last axis into [sections, width]."""
    reshape = tensor.inputs[0] if tensor.inputs else None
    if reshape is None or reshape.op != "Reshape":
        return None
    before, after = shapes.get(reshape.inputs[0].name), shapes.get(tensor.name)
    if before is None or after is None or len(after) != len(before) + 1 or tuple(after[:-2]) != tuple(before[:-1]) \
            or after[-2] * after[-1] != before[-1]:
        return None
    return reshape, after[-2], after[-1]


def producer_slices(tensor: gs.Tensor, width: int, offset: int,
                    shapes: Shapes) -> list[HeadSlice | PackedCut | ShapeEntry] | str:
    """Walk back from the tensor a split Reshape reads to the linear producer of its columns; the slices of
    the producer's weight, bias and every per-channel constant on the way (`offset`: where the heads start
    along the producer's columns, after a Split/Slice of a packed projection, which is a PackedCut)."""
    found: list[HeadSlice | PackedCut] = []
    while True:
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None:
            return f"{tensor.name}: not computed by a linear projection"
        readers = [r for r in tensor.outputs if r.op != "Shape"]
        packed = bool(found) and isinstance(found[-1], PackedCut) and found[-1].tensor is tensor
        if len(readers) != 1 and not packed:
            return f"{tensor.name}: read by more than the head split"
        if packed and any(cut_bounds(r, shapes) is None for r in readers):
            return f"{tensor.name}: a packed projection cut at positions computed at run time"
        projection = _projection(node, width, offset)
        if projection is not None:
            return found + projection
        step = _back(node, tensor, width, offset, shapes)
        if isinstance(step, str):
            return step
        found.extend(step[0])
        tensor, offset = step[1], step[2]


def _per_channel(node: gs.Node, tensor: gs.Tensor, width: int, offset: int,
                 shapes: Shapes) -> tuple[list[HeadSlice], gs.Tensor] | str:
    constants = [(i, constant_value(t)) for i, t in enumerate(node.inputs) if constant_value(t) is not None]
    variables = [t for t in node.inputs if constant_value(t) is None]
    if len(constants) != 1 or len(variables) != 1:
        return f"{node.name} ({node.op}): not a per-channel constant"
    index, value = constants[0]
    if node.op in ("Sub", "Div") and index == 0:
        return f"{node.name} ({node.op}): the projection is the second operand"
    out = shapes.get(tensor.name)
    if value.size == 1:
        return [], variables[0]
    if out is None or value.shape[-1] != shapes.get(variables[0].name, (0,))[-1] or value.size != value.shape[-1]:
        return f"{node.name} ({node.op}): its constant is not one value per channel"
    return [HeadSlice(node, index, value.ndim - 1, width, offset)], variables[0]


def cut_bounds(node: gs.Node, shapes: Shapes) -> list[tuple[int, int]] | None:
    """[start, end) along its input's last axis of each output of a Split or Slice cutting that axis at
    constant positions (what removing heads can move), None for anything else."""
    if node.op == "Split":
        starts = [_split_start(node, out, shapes) for out in node.outputs]
    elif node.op == "Slice" and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None \
            and constant_value(node.inputs[2]).size == 1:
        starts = [_slice_start(node, shapes)]
    else:
        return None
    if any(start is None for start in starts) or any(out.name not in shapes for out in node.outputs):
        return None
    return [(start, start + shapes[out.name][-1]) for start, out in zip(starts, node.outputs)]


def _split_start(node: gs.Node, tensor: gs.Tensor, shapes: Shapes) -> int | None:
    """Where output `tensor` of a Split over the last axis starts along its input's last axis."""
    source = shapes.get(node.inputs[0].name)
    if source is None or int(node.attrs.get("axis", 0)) % len(source) != len(source) - 1:
        return None
    position = next(i for i, out in enumerate(node.outputs) if out is tensor)
    return int(sum(shapes.get(out.name, (0,))[-1] for out in node.outputs[:position]))


def _slice_start(node: gs.Node, shapes: Shapes) -> int | None:
    """Where a Slice with step 1 over the last axis starts along its input's last axis."""
    source = shapes.get(node.inputs[0].name)
    starts = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 else np.array([-1])
    steps = constant_value(node.inputs[4]) if len(node.inputs) > 4 else np.array([1])
    if source is None or starts is None or axes is None or steps is None or starts.size != 1:
        return None
    if int(axes.reshape(-1)[0]) % len(source) != len(source) - 1 or int(steps.reshape(-1)[0]) != 1:
        return None
    start = int(starts.reshape(-1)[0])
    return start + source[-1] if start < 0 else min(start, source[-1])


def head_split(node: gs.Node, shapes: Shapes) -> tuple[int, int] | None:
    """(heads, width) when Reshape `node` splits its input's last axis into [heads, width] as its last two."""
    before, after = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    if node.op != "Reshape" or before is None or after is None or len(after) != len(before) + 1 or len(after) < 3:
        return None
    if tuple(after[:-2]) != tuple(before[:-1]) or after[-2] * after[-1] != before[-1] or after[-2] < 2:
        return None
    return after[-2], after[-1]


def folded_split(node: gs.Node, shapes: Shapes) -> tuple[int, int] | None:
    """(heads, width) when Reshape `node` splits its input's last axis into [heads, width] with the heads folded
    into the axis in front, the batch (torch's nn.MultiheadAttention: [seq, batch, E] -> [seq, batch x heads,
    width]; at the batch of 1 the analysis runs at, [seq, 1, E] -> [seq, heads, width])."""
    before, after = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    if node.op != "Reshape" or before is None or after is None or len(after) != len(before) or len(after) < 3:
        return None
    if tuple(after[:-2]) != tuple(before[:-2]) or before[-2] != 1 or after[-2] * after[-1] != before[-1] \
            or after[-2] < 2:
        return None
    return after[-2], after[-1]


def sectioned_split(node: gs.Node, shapes: Shapes) -> tuple[int, int, int] | None:
    """(sections, heads, width) when Reshape `node` splits its input's last axis into [sections, heads, width]
    as its last three: one packed q/k/v projection split at once, as timm's attention writes it
    (reshape(B, T, 3, H, d), a permute, then q, k, v = qkv[0], qkv[1], qkv[2]). Column p·H·d + h·d + j is
    entry j of head h in section p, whatever the sections are."""
    before, after = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    if node.op != "Reshape" or before is None or after is None or len(after) != len(before) + 2 or len(after) < 4:
        return None
    if tuple(after[:-3]) != tuple(before[:-1]) or after[-3] * after[-2] * after[-1] != before[-1] \
            or after[-3] < 2 or after[-2] < 2:
        return None
    return after[-3], after[-2], after[-1]


def _packed_sizes(node: gs.Node, columns: int) -> list[int]:
    sizes = node.attrs.get("qkv_hidden_sizes")
    return [int(s) for s in sizes] if sizes else [columns // 3] * 3


def packed_projection(found: HeadBlock, node: gs.Node, heads: int) -> str | None:
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return "its QKV weight is not a constant matrix"
    offset = 0
    for size in _packed_sizes(node, weight.shape[1]):
        found.slices.append(HeadSlice(node, 1, 1, size // heads, offset))
        if len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
            found.slices.append(HeadSlice(node, 2, 0, size // heads, offset))
        offset += size
    return None


def separate_projections(shapes: Shapes, found: HeadBlock, node: gs.Node, heads: int) -> str | None:
    if len(node.inputs) < 3 or not node.inputs[1].name or not node.inputs[2].name:
        return "packed query/key/value input"
    offset = 0
    for index in range(3):
        columns = shapes.get(node.inputs[index].name, (0,))[-1]
        if len(shapes.get(node.inputs[index].name, ())) != 3:
            return "query, key and value are not [batch, sequence, channels]"
        slices = producer_slices(node.inputs[index], columns // heads, 0, shapes)
        if isinstance(slices, str):
            return slices
        found.add_sources(slices)
        if len(node.inputs) > 3 and constant_value(node.inputs[3]) is not None:
            found.slices.append(HeadSlice(node, 3, 0, columns // heads, offset))
        offset += columns
    return None


def grouped_projections(shapes: Shapes, found: HeadBlock, node: gs.Node, heads: int, units: int) -> str | None:
    """GroupQueryAttention: query heads h·g … h·g + g − 1 (g = num_heads / kv_num_heads) read key/value head h,
    so a unit is the query projection's columns of those g heads with the key and value columns of head h,
    from separate projections or one packed [query | key | value] input."""
    query = shapes.get(node.inputs[0].name, ())
    if len(query) != 3:
        return "query is not [batch, sequence, channels]"
    group = heads // units
    if len(node.inputs) < 3 or not node.inputs[1].name or not node.inputs[2].name:
        if query[-1] % (heads + 2 * units):
            return f"a packed query/key/value width {query[-1]} not made of {heads} + 2 x {units} heads"
        width = query[-1] // (heads + 2 * units)
        parts = [(node.inputs[0], group * width, 0), (node.inputs[0], width, heads * width),
                 (node.inputs[0], width, (heads + units) * width)]
    else:
        key, value = shapes.get(node.inputs[1].name, ()), shapes.get(node.inputs[2].name, ())
        width = query[-1] // heads
        if len(key) != 3 or len(value) != 3 or key[-1] != units * width or value[-1] % units:
            return "key and value are not [batch, sequence, kv_num_heads x head size]"
        parts = [(node.inputs[0], group * width, 0), (node.inputs[1], width, 0),
                 (node.inputs[2], value[-1] // units, 0)]
    for tensor, part, offset in parts:
        slices = producer_slices(tensor, part, offset, shapes)
        if isinstance(slices, str):
            return slices
        found.add_sources(slices)
    return None

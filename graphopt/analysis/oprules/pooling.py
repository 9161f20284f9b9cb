"""Pooling: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, LpPool.

Channels pass through (pooling acts on each channel separately; MaxPool's index output, when read,
blocks). Constants: max and global pooling keep a spatially constant channel constant, as does average
pooling without padding or without counting padded positions. Rotations: average pooling over the
spatial axes of NCHW commutes with a channel rotation; max pooling does not.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.analysis.constants import keeps_when, merge_inputs
from graphopt.analysis.oprules.elementwise import gated, unary
from graphopt.analysis.registry import equivariant, register


def _average_keeps(node: gs.Node) -> bool:
    return not any(node.attrs.get("pads", [])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
        or not node.attrs.get("count_include_pad", 0)


def _channels_first(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
    return axis if axis == 1 else "not equivariant to a rotation of the channels"


register("MaxPool", channels=unary, constant=merge_inputs, rotation=gated("max pooling is not equivariant to rotations"))
register("GlobalMaxPool", channels=unary, constant=merge_inputs, rotation=gated("max pooling is not equivariant"))
register("GlobalAveragePool", channels=unary, constant=merge_inputs, rotation=equivariant(_channels_first))
register("AveragePool", channels=unary, constant=keeps_when(_average_keeps), rotation=equivariant(_channels_first))
register("LpPool", channels=unary)

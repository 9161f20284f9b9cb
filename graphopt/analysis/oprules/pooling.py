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
from graphopt.analysis.registry import Mixing, linear, rank_of, register


def _average_keeps(node: gs.Node) -> bool:
    return not any(node.attrs.get("pads", [])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
        or not node.attrs.get("count_include_pad", 0)


def _spatial(node: gs.Node, tensor: gs.Tensor) -> Mixing | str:
    """Average pooling mixes the spatial axes of NCHW (every axis behind axis 1), each channel alike."""
    rank = rank_of(tensor)
    return "rank unknown" if rank is None else Mixing(frozenset(range(2, rank)), tuple(range(rank)))


register("MaxPool", channels=unary, constant=merge_inputs, rotation=gated("max pooling is not equivariant to rotations"))
register("GlobalMaxPool", channels=unary, constant=merge_inputs, rotation=gated("max pooling is not equivariant"))
register("GlobalAveragePool", channels=unary, constant=merge_inputs, rotation=linear(_spatial))
register("AveragePool", channels=unary, constant=keeps_when(_average_keeps), rotation=linear(_spatial))
register("LpPool", channels=unary)

"""Planted redundancy for structured-pruning tests: relations written into a torch layer's output rows,
the ONNX node a layer became, and what a pruning history must show for them.

A relation rewrites output rows (weight row and bias entry) of a Conv or Linear so that the unit is
redundant in what the layer computes: `Zero` (row and bias 0), `Constant` (row 0, bias c), `Copy`
(c times another unit) and `Combination` (a·u_i + b·u_j, rows and bias alike). Whether the redundancy
survives to the consumer is the planting test's business: after a nonlinearity only zeros, constants
and copies (positive scale, for positively homogeneous activations) stay redundant; combinations need a
linear path. `period` and `repeat` plant the same relation in several blocks of rows, e.g. every
attention head (unit k of head h is row h·period + k).

A pruning pass removes a relation exactly when it removes one of the relation's units: the zero or
constant unit itself, or any one of the units tied by a copy or combination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class Zero:
    unit: int

    @property
    def units(self) -> frozenset[int]:
        return frozenset({self.unit})

    def apply(self, weight: np.ndarray, bias: np.ndarray, offset: int) -> None:
        weight[offset + self.unit] = 0.0
        bias[offset + self.unit] = 0.0


@dataclass(frozen=True)
class Constant:
    unit: int
    value: float

    @property
    def units(self) -> frozenset[int]:
        return frozenset({self.unit})

    def apply(self, weight: np.ndarray, bias: np.ndarray, offset: int) -> None:
        weight[offset + self.unit] = 0.0
        bias[offset + self.unit] = self.value


@dataclass(frozen=True)
class Copy:
    unit: int
    source: int
    scale: float = 1.0

    @property
    def units(self) -> frozenset[int]:
        return frozenset({self.unit, self.source})

    def apply(self, weight: np.ndarray, bias: np.ndarray, offset: int) -> None:
        weight[offset + self.unit] = self.scale * weight[offset + self.source]
        bias[offset + self.unit] = self.scale * bias[offset + self.source]


@dataclass(frozen=True)
class Combination:
    unit: int
    first: int
    second: int
    a: float
    b: float

    @property
    def units(self) -> frozenset[int]:
        return frozenset({self.unit, self.first, self.second})

    def apply(self, weight: np.ndarray, bias: np.ndarray, offset: int) -> None:
        for target in (weight, bias):
            target[offset + self.unit] = self.a * target[offset + self.first] + self.b * target[offset + self.second]


Relation = Union[Zero, Constant, Copy, Combination]


def plant(layer: Any, relations: Iterable[Relation], period: int = 0, repeat: int = 1) -> None:
    """Write `relations` into the output rows of a torch Conv/Linear `layer` (with a bias), in each of
    `repeat` blocks of `period` rows."""
    import torch

    weight, bias = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    for block in range(repeat):
        for relation in relations:
            relation.apply(weight, bias, block * period)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))


def producer_name(model: onnx.ModelProto, layer: Any) -> str:
    """The name of the Conv/Gemm/MatMul node of `model` whose weight is `layer`'s (or its transpose)."""
    weight = layer.weight.detach().numpy()
    candidates = [weight] + ([weight.T] if weight.ndim == 2 else [])
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        value = stored.get(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 \
            else None
        if value is not None and any(value.shape == c.shape and np.array_equal(value, c) for c in candidates):
            return node.name
    raise AssertionError(f"no node of the model holds the weight of {layer}")


def output_channels(model: onnx.ModelProto, name: str) -> int:
    """The number of output channels of the Conv/Gemm/MatMul node `name` (from its weight)."""
    node = next(n for n in model.graph.node if n.name == name)
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(
        a.name == "transB" and a.i for a in node.attribute))
    return int(weight.dims[1] if transposed else weight.dims[0])


def entry_of(history: list[dict[str, Any]], producer: str) -> dict[str, Any] | None:
    """The history entry of the group `producer` (a node name) produces, None if it was not cut."""
    found = [e for e in history if f"{producer}:producer" in e["members"]]
    assert len(found) <= 1, found
    return found[0] if found else None


def assert_removes_one_unit_per_relation(removed: Iterable[int], relations: Iterable[Relation]) -> None:
    """`removed` (a group's removed units) takes exactly one unit of every relation and nothing else."""
    removed, relations = set(removed), list(relations)
    for relation in relations:
        assert len(removed & relation.units) == 1, (sorted(removed), relation)
    assert removed <= set().union(*(r.units for r in relations)), (sorted(removed), relations)
    assert len(removed) == len(relations), (sorted(removed), relations)

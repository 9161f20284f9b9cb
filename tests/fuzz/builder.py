"""What a random graph is built from: choices, the planting plan, tensors and the graph under construction.

Every choice is one `Chooser.integer` draw whose simplest value (the lowest) is the simplest option, so
hypothesis shrinks a failing graph to a short one; weights come from one drawn seed. Graphs run at opsets
11 to 18 on an NCHW, NHWC, tokens ([N, T, C]) or [N, F] input whose batch is dynamic.

Planting (`Planting`):
- `zeros`: some producers' output channels get zero weight rows and zero bias, and every op after them maps
  0 to 0 on those channels (BatchNorm shifts, depthwise biases and per-channel Add constants are zeroed
  there; activations with f(0) != 0 are drawn only on tensors without planted channels). Residual branches,
  projection shortcuts, gates and squeeze-excitation gates plant the channels of the stream they join, so a
  channel whose every coupled producer is zero is zero wherever it is read, and removing it is exact.
- `constants` and `dead` (for dead-unit elimination, exact whatever the values): zero weight rows that keep
  their bias, activations with f(0) != 0 anywhere, and consumer weight slices zeroed on channels chosen at
  their producer (a residual stream keeps them, so a whole group can be dead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

T = TypeVar("T")

OPSETS = (11, 13, 17, 18)


class Chooser(Protocol):
    def integer(self, low: int, high: int) -> int:
        """A draw in [low, high]; `low` is the simplest."""


class SeededChooser:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))


def pick(chooser: Chooser, options: Sequence[T]) -> T:
    return options[chooser.integer(0, len(options) - 1)]


def chance(chooser: Chooser, percent: int) -> bool:
    """True with probability `percent`/100; the simplest draw gives False."""
    return chooser.integer(0, 99) >= 100 - percent


@dataclass(frozen=True)
class Planting:
    """Zero weight rows with zero bias are always planted; these add the kinds dead-unit elimination folds."""

    constants: bool = False  # zero weight rows that keep their bias (and f(0) != 0 activations anywhere)
    dead: bool = False       # consumer weight slices zeroed

    @property
    def guard(self) -> bool:
        """Planted channels must stay exactly zero wherever they are read."""
        return not self.constants


MAGNITUDE = Planting()
DEAD_UNITS = Planting(constants=True, dead=True)


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # batch 1
    layout: str             # "nchw", "nhwc", "tokens" ([N, T, C]) or "flat" ([N, F])
    planted: np.ndarray     # per channel: every producer coupled so far writes it with zero weights
    dead: np.ndarray        # per channel: weight consumers built on this tensor read it with zero weights

    @property
    def axis(self) -> int:
        return len(self.shape) - 1 if self.layout in ("nhwc", "tokens") else 1

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def spatial(self) -> tuple[int, int]:
        return (self.shape[2], self.shape[3]) if self.layout == "nchw" else (self.shape[1], self.shape[2])


@dataclass
class Example:
    model: onnx.ModelProto
    planting: Planting
    ops: list[str] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)  # sizes of the input's symbolic dims besides the batch


def none(size: int) -> np.ndarray:
    """No channel selected."""
    return np.zeros(size, dtype=bool)


class Builder:
    """Nodes, initializers and tensors of one graph under construction; the op functions (tests/fuzz/ops.py,
    tests/fuzz/graphs.py) add to it."""

    def __init__(self, chooser: Chooser, planting: Planting, opset: int, seed: int) -> None:
        self.chooser, self.planting, self.opset = chooser, planting, opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.tensors: list[Tensor] = []
        self.ops: list[str] = []
        self.count = 0
        self.weights: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
        self.tie = False  # the next producer reuses the latest weight of its shape

    # -- plumbing --------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, values: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, **attrs: object) -> list[str]:
        names = [self.fresh("t") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.fresh(op.lower() + "_"), **attrs))
        return names

    def tensor(self, name: str, shape: tuple[int, ...], layout: str, planted: np.ndarray,
               dead: np.ndarray | None = None) -> Tensor:
        channels = shape[len(shape) - 1 if layout in ("nhwc", "tokens") else 1]
        made = Tensor(name, tuple(int(d) for d in shape), layout, planted.copy(),
                      none(channels) if dead is None else dead.copy())
        self.tensors.append(made)
        return made

    def weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)

    def bias(self, size: int) -> np.ndarray:
        return (0.1 * self.rng.standard_normal(size)).astype(np.float32)

    def subset(self, size: int, percent: int) -> np.ndarray:
        return np.array([chance(self.chooser, percent) for _ in range(size)], dtype=bool)

    def rows(self, size: int, must: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(zero weight rows, those of them that keep their bias, channels consumers will not read)."""
        rows = none(size) if must is None else must.copy()
        if chance(self.chooser, 50):
            rows |= self.subset(size, 40)
        constant = rows & self.subset(size, 50) if self.planting.constants else none(size)
        dead = self.subset(size, 30) if self.planting.dead and chance(self.chooser, 40) else none(size)
        return rows, constant, dead

    def shared(self, weight: np.ndarray, axis: int) -> tuple[str, np.ndarray]:
        """The initializer of a new producer weight, or sometimes an earlier one of the same shape (exporters
        tie weights); its name and its all-zero slices along the output `axis`."""
        earlier = self.weights.setdefault(weight.shape, [])
        if earlier and (self.tie or chance(self.chooser, 10)):
            name, weight = earlier[-1] if self.tie else pick(self.chooser, earlier)
        else:
            name = self.const(weight, "w")
            earlier.append((name, weight))
        rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        return name, ~np.any(rows != 0, axis=1)

    def keeps_zero(self, values: np.ndarray, planted: np.ndarray) -> np.ndarray:
        """`values` (per channel) with zeros on planted channels when planted zeros must stay zero."""
        if self.planting.guard:
            values = values.copy()
            values[planted] = 0.0
        return values

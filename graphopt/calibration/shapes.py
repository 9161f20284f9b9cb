"""Every tensor's concrete shape for one batch-1 sample, and the cost counted on those shapes.

ONNX shape inference runs first on a copy with the inputs fixed; shapes it leaves unknown (a Reshape
whose target is computed from `Shape` at run time, for instance) come from one onnxruntime run on
zeros with those tensors exposed as outputs. The MAC and parameter formulas live in
graphopt.analysis.macs, which reads shapes and never runs a model.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.analysis.macs import CostReport, cost_from_shapes, needed_shapes
from graphopt.calibration.session import observed_shapes
from graphopt.ir.shapes import input_specs, tensor_shapes, with_fixed_inputs


def batch1_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                  wanted: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor (or of `wanted` at least) with the inputs at `input_shapes`."""
    fixed = with_fixed_inputs(model, input_shapes)
    shapes = tensor_shapes(fixed)
    produced = {name for node in fixed.graph.node for name in node.output if name}
    missing = sorted((produced if wanted is None else wanted & produced) - set(shapes))
    if missing:
        feed = {s.name: np.zeros(input_shapes[s.name], dtype=s.dtype) for s in input_specs(model)}
        shapes.update(observed_shapes(model, feed, missing))
    return shapes


def count_cost(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
               shapes: dict[str, tuple[int, ...]] | None = None) -> CostReport:
    """MACs and parameters; `shapes` (batch-1 tensor shapes) saves a shape inference when known."""
    if shapes is None:
        shapes = batch1_shapes(model, input_shapes, needed_shapes(model))
    return cost_from_shapes(model, shapes)

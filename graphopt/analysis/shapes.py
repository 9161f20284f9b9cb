"""Every tensor's concrete shape for one batch-1 sample.

ONNX shape inference runs first on a copy with the inputs fixed; shapes it leaves unknown (a Reshape
whose target is computed from `Shape` at run time, for instance) come from one onnxruntime run on
zeros with those tensors exposed as outputs.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.ir.shapes import tensor_shapes, with_fixed_inputs


def batch1_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                  wanted: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    from graphopt.calibration.data import input_specs
    from graphopt.calibration.session import observed_shapes

    fixed = with_fixed_inputs(model, input_shapes)
    shapes = tensor_shapes(fixed)
    produced = {name for node in fixed.graph.node for name in node.output if name}
    missing = sorted((produced if wanted is None else wanted & produced) - set(shapes))
    if missing:
        feed = {s.name: np.zeros(input_shapes[s.name], dtype=s.dtype) for s in input_specs(model)}
        shapes.update(observed_shapes(model, feed, missing))
    return shapes

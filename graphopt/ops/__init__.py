"""graphopt's custom ONNX operators: schemas, function bodies, native kernels and their builder."""

from __future__ import annotations

from typing import Any


def session_options(library: Any = None) -> Any:
    """onnxruntime SessionOptions with graphopt's native kernels registered where built (graphopt.ops.native)."""
    from graphopt.ops.native import session_options as build_options

    return build_options(library)

"""graphopt: structured compression of ONNX models, verified against onnxruntime."""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.api import OptimizeResult, methods, optimize  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402

__all__ = ["GraphoptError", "OptimizeResult", "__version__", "methods", "optimize"]

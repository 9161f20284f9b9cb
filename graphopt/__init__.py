"""graphopt: structured compression of ONNX models, verified against onnxruntime."""

from __future__ import annotations

from graphopt._version import __version__
from graphopt.api import OptimizeResult, methods, optimize
from graphopt.errors import GraphoptError

__all__ = ["GraphoptError", "OptimizeResult", "__version__", "methods", "optimize"]

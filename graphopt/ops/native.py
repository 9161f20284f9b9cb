"""Loading graphopt's native kernel library into onnxruntime sessions (graphopt.calibration.session calls it).

The library is the one `graphopt ops build` wrote: $GRAPHOPT_OPS_LIBRARY if set, else the user-cache
path of the current kernel sources (graphopt.ops.build.default_library). When it is absent every model
still runs, through the graphopt functions' standard-op bodies. When registered, onnxruntime (checked
on 1.32) runs the kernel instead of the model-local function body of the same domain and name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from graphopt.ir.graph import subgraphs
from graphopt.ops.functions import DOMAIN


def library_path() -> Path | None:
    """The built kernel library, or None."""
    configured = os.environ.get("GRAPHOPT_OPS_LIBRARY")
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    from graphopt.ops.build import default_library

    path = default_library()
    return path if path.is_file() else None


def uses_graphopt_ops(model: onnx.ModelProto) -> bool:
    """Whether a node of the graph or of any control-flow body (an If's branch) is a graphopt op."""
    return _uses(model.graph)


def _uses(graph: onnx.GraphProto) -> bool:
    return any(node.domain == DOMAIN or any(_uses(body) for body in subgraphs(node)) for node in graph.node)


_loaded: dict[str, Any] = {}

CONV_KERNEL = "graphopt_exprune_conv_calls"  # the call counter graphopt.ExPruneConvRelu's kernel exports


def has_kernel(counter: str) -> bool:
    """Whether the built library has the kernel exporting the call counter `counter` (a library named by
    $GRAPHOPT_OPS_LIBRARY may come from older sources that lack it)."""
    library = library_path()
    return library is not None and hasattr(_opened(library), counter)


def _opened(library: Path) -> Any:
    """The library, opened once and never closed."""
    if str(library) not in _loaded:
        import ctypes

        _loaded[str(library)] = ctypes.CDLL(str(library))
    return _loaded[str(library)]


def register(options: Any, library: Path | None = None) -> bool:
    """Register the kernel library (default: `library_path()`) on onnxruntime SessionOptions; whether it was.

    The library is also opened once here and never closed, so it stays mapped however onnxruntime
    releases the handle it takes with the SessionOptions."""
    library = library or library_path()
    if library is None:
        return False
    _opened(library)
    options.register_custom_ops_library(str(library))
    return True

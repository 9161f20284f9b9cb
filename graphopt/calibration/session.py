"""onnxruntime sessions for graphopt: exact reference runs, benchmarks, and exposed intermediates.

`make_session(model, optimize=False)` disables every graph optimisation, so the rewritten model is
compared with the original on exactly the arithmetic the graph states; benchmarks use full
optimisation, as a deployment would. onnxruntime is imported lazily so that `onnxruntime` and
`onnxruntime-gpu` are interchangeable (they install the same `onnxruntime` module).
"""

from __future__ import annotations

import logging
import re
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.ir import weights
from graphopt.ops import native
from graphopt.ops.native import register, uses_graphopt_ops

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

_PLACEHOLDER = "graphopt-shared-weights.bin"


def runtime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise GraphoptError("onnxruntime is not installed: pip install 'graphopt[cpu]' "
                            "(or 'graphopt[gpu]' for onnxruntime-gpu)") from exc
    return onnxruntime


def providers(device: str = "cpu") -> list[str]:
    """Execution providers for `device` ("cpu" or "cuda"); CUDA falls back to CPU with a warning."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise GraphoptError(f"unknown device '{device}' (use cpu or cuda)")
    available = runtime().get_available_providers()
    if "CUDAExecutionProvider" not in available:
        log.warning("CUDA requested but onnxruntime offers %s; running on CPU", available)
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _with_options(names: list[str], exact: bool) -> list[Any]:
    """`names` with provider options: an exact session (no graph optimisation: reference runs, fidelity
    checks) computes in full float32 on CUDA, where onnxruntime would otherwise use TF32 tensor cores
    (10-bit mantissa products, about 1e-3 relative error) for MatMul and Conv."""
    return [(name, {"use_tf32": "0"}) if exact and name == "CUDAExecutionProvider" else name for name in names]


def make_session(model: onnx.ModelProto | str, *, optimize: bool = False, device: str = "cpu",
                 threads: int = 0, spinning: bool = True) -> "onnxruntime.InferenceSession":
    """An onnxruntime session; `spinning=False` stops idle intra-op threads from busy-waiting (two sessions
    timed side by side would otherwise take CPU from each other)."""
    ort = runtime()
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    _register_kernels(options, model)
    chosen = _with_options(providers(device), exact=not optimize)
    try:
        if isinstance(model, onnx.ModelProto) and any(True for _ in weights.referenced(model.graph)):
            return _shared_weights_session(model, options, chosen)
        source = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(source, options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the model: {first_line}") from exc


def _shared_weights_session(model: onnx.ModelProto, options: Any, chosen: list[Any]) -> Any:
    """A session of a model held by reference (graphopt.ir.weights): its referenced weights are handed to
    onnxruntime as shared initializers, which it uses in place (no copy, and no pre-packed copy: prepacking
    is off for these sessions), and the model it parses names them as external data in a sparse
    placeholder file that is never read; when the session is collected, the mapped files' resident pages
    are released (graphopt.ir.weights.release_mappings). Such sessions run without graph optimisation,
    whatever was asked: onnxruntime's optimisers would fold the placeholders' zeros into the weights they
    rewrite."""
    ort = runtime()
    light = onnx.ModelProto()
    light.CopyFrom(model)  # the references are small: this copies no weight
    longest, shared = 0, []
    for tensor in weights.referenced(light.graph):
        array = np.ascontiguousarray(weights.array_of(tensor))
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(tensor.name, value)
        shared.append((array, value))
        length = int(next(e.value for e in tensor.external_data if e.key == "length"))
        del tensor.external_data[:]
        for key, text in (("location", _PLACEHOLDER), ("offset", "0"), ("length", str(length))):
            tensor.external_data.add(key=key, value=text)
        longest = max(longest, length)
    options.add_session_config_entry("session.disable_prepacking", "1")
    # onnxruntime's graph optimisers (Conv+BN/activation fusion, NCHWc reordering, constant folding) read
    # initializers from the parsed model, where these weights are placeholders, not from the shared values
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="graphopt-session-") as folder:
        with open(Path(folder) / _PLACEHOLDER, "wb") as placeholder:
            placeholder.truncate(longest)  # sparse: takes no disk space
        path = Path(folder) / "model.onnx"
        path.write_bytes(light.SerializeToString())
        session = ort.InferenceSession(str(path), options, providers=chosen)
    session._graphopt_shared_weights = shared  # onnxruntime reads these buffers for the session's lifetime
    # once the session is gone, the weight file pages it read stop counting in this process's memory (they stay
    # in the page cache): calibration, paired statistics and the fidelity check each read every weight
    weakref.finalize(session, weights.release_mappings)
    return session


def session_options(library: Path | None = None) -> Any:
    """onnxruntime SessionOptions with graphopt's kernel library (default: the one `graphopt ops build`
    wrote) registered where it has been built."""
    options = runtime().SessionOptions()
    if not register(options, library):
        log.info("graphopt kernels not built (graphopt ops build): graphopt ops run as function bodies")
    return options


def _register_kernels(options: Any, model: onnx.ModelProto | str) -> None:
    """Load graphopt's native kernel library where the model has graphopt ops and it has been built."""
    proto = onnx.load(model, load_external_data=False) if isinstance(model, str) else model
    if uses_graphopt_ops(proto) and register(options):
        log.info("graphopt native kernels registered")


def failure_text(error: BaseException) -> str:
    """onnxruntime's run error in one line: the node, its op and the reason, without the source location."""
    text = str(error).strip()
    found = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", text, re.S)
    if found is None:
        return text.splitlines()[0] if text else type(error).__name__
    reason = found.group(3).strip().splitlines()[0].split(" was false. ")[-1].strip()
    node = f"node '{found.group(2)}' ({found.group(1)})" if found.group(2) else f"a {found.group(1)} node"
    return f"{node}: {reason}"


def run_failure(session: Any, feed: dict[str, Any]) -> str | None:
    """None when `session` runs on `feed`, else onnxruntime's reason in one line (`failure_text`); onnxruntime
    logs nothing of it, so the caller reports it once."""
    quiet = runtime().RunOptions()
    quiet.log_severity_level = 4
    try:
        session.run(None, feed, quiet)
    except Exception as error:  # onnxruntime raises its own exception types for a failing run
        return failure_text(error)
    return None


def observed_shapes(model: onnx.ModelProto, feed: dict[str, Any], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Run `model` once on `feed` with `names` exposed as outputs; return their concrete shapes."""
    return {name: tuple(value.shape) for name, value in observed_values(model, feed, names).items()}


def observed_values(model: onnx.ModelProto, feed: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    """Run `model` once on `feed` with `names` exposed as outputs; return their values."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = make_session(exposed)
    quiet = runtime().RunOptions()
    quiet.log_severity_level = 4  # a refused feed is raised to the caller, not logged as well
    return dict(zip(names, session.run(names, feed, quiet)))


def native_conv_kernel() -> bool:
    """Whether the built kernel library has graphopt.ExPruneConvRelu's kernel (graphopt.ops.native)."""
    return native.has_kernel(native.CONV_KERNEL)

"""The native kernel library for the op tests: the one `graphopt ops build` wrote, else built here."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphopt.ops.build import build_library, default_library

    if default_library().is_file():
        return default_library()
    built = build_library(tmp_path_factory.mktemp("ops") / "libgraphopt_ops.so", download=False)
    if built.library is None:
        pytest.skip(f"native kernel not built: {built.reason}")
    return built.library


def kernel_session(model: onnx.ModelProto, library: Path, optimize: bool, threads: int = 0) -> ort.InferenceSession:
    from graphopt.calibration.session import session_options

    options = session_options(library)
    options.intra_op_num_threads = threads
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

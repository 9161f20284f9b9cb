"""One-shot statistics for the calibration tests: a fresh Calibrator per call."""

from __future__ import annotations

from typing import Any

import onnx

from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import DataSource, load_data
from graphopt.calibration.stats import StatRequest, TensorStats


def collect(model: onnx.ModelProto, data: DataSource, requests: list[StatRequest],
            **options: Any) -> dict[str, TensorStats]:
    """`requests` measured on `model` over `data`; `options` are Calibrator's keywords."""
    return Calibrator(load_data(data, model), **options).statistics(model, requests)

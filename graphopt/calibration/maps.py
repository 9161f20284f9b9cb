"""Whole intermediate tensors of the first few calibration samples, for methods that need spatial structure
(ExPrune on convolutions scores every output position of a feature map, so rows are not enough).

Only the ancestor cone of the requested tensors runs (graphopt.calibration.capture.exposing_model), and
batches stop as soon as `max_items` samples are in: memory is max_items · the tensors' per-sample sizes
plus one batch. Values keep the tensors' dtype. Deterministic for a given model and data order.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.capture import tensor_batches
from graphopt.calibration.data import Dataset


def sample_maps(model: onnx.ModelProto, data: Dataset, names: list[str], max_items: int = 64,
                batch_size: int = 32) -> dict[str, np.ndarray]:
    """The first `max_items` samples (axis 0) of each tensor in `names`: name -> [r, ...], r <= max_items."""
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    names = sorted(set(names))
    if not names:
        return {}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    held = 0
    for values in tensor_batches(model, data, names, min(batch_size, max_items)):
        take = min(max_items - held, next(iter(values.values())).shape[0])
        for name in names:
            parts[name].append(np.array(values[name][:take]))
        held += take
        if held >= max_items:
            break
    return {name: np.concatenate(parts[name]) for name in names}

"""A bounded uniform sample of the rows of intermediate tensors, for methods that need activations
themselves rather than their moments (L1-PCA).

Rows are read as in graphopt.calibration.stats (every axis but the channel axis indexes a row). Each row
gets a seeded uniform random key; after every batch only the `max_rows` rows with the smallest keys are
kept, so the result is a uniform sample without replacement of all rows, and memory stays at
`max_rows` rows per tensor plus one batch's activations. Only the cone of the requested tensors runs.
Deterministic for a given model, data order, batch size and seed.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.capture import tensor_batches
from graphopt.calibration.data import Dataset
from graphopt.calibration.stats import channel_rows


def sample_rows(model: onnx.ModelProto, data: Dataset, tensors: dict[str, int], *, max_rows: int = 4096,
                batch_size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to `max_rows` rows (float64, rows x channels) of each tensor in `tensors` (name -> channel axis)."""
    names = sorted(tensors)
    if not names:
        return {}
    rng = np.random.default_rng(seed)
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for values in tensor_batches(model, data, names, batch_size):
        for name in names:
            value = values[name]
            rows, _ = channel_rows(value, tensors[name], None)
            keys = rng.random(rows.shape[0])
            if name in kept:
                rows, keys = np.concatenate([kept[name][0], rows]), np.concatenate([kept[name][1], keys])
            if rows.shape[0] > max_rows:
                chosen = np.argpartition(keys, max_rows - 1)[:max_rows]
                rows, keys = rows[chosen], keys[chosen]
            kept[name] = (np.array(rows, dtype=np.float64), keys)
    return {name: kept[name][0] for name in names}

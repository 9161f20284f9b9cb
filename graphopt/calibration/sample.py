"""A bounded uniform sample of the rows of intermediate tensors, for methods that need activations
themselves rather than their moments (L1-PCA, ExPrune).

Rows are read as in graphopt.calibration.stats (every axis but the channel axis indexes a row). Each row
gets a uniform random key, drawn per batch from a generator seeded with (seed, the batch's index in the
data set), tensor by tensor in name order; after every batch only the `max_rows` rows with the smallest
keys are kept, so the result is a uniform sample without replacement of all rows, and memory stays at
`max_rows` rows per tensor plus one batch's activations. Only the cone of the requested tensors runs.
Rows come out in key order. Deterministic for a given model, data order, batch size and seed.

Because a row's key depends only on its batch's index and its place in the batch, the sample of a data
set cut into contiguous parts of whole batches is the `max_rows` smallest keys over the parts' own
samples (`keyed_rows` with each part's `first_batch`, then `merge_rows`): the same rows, in the same
order, as one pass over the whole data set.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

from graphopt.calibration.capture import tensor_batches
from graphopt.calibration.data import Dataset
from graphopt.calibration.stats import channel_rows

Keyed = tuple[np.ndarray, np.ndarray]  # (rows x channels float64, one key per row)


def sample_rows(model: onnx.ModelProto, data: Dataset, tensors: dict[str, int], *, max_rows: int = 4096,
                batch_size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to `max_rows` rows (float64, rows x channels) of each tensor in `tensors` (name -> channel axis)."""
    return finish_rows(keyed_rows(model, data, tensors, max_rows=max_rows, batch_size=batch_size, seed=seed))


def keyed_rows(model: onnx.ModelProto, data: Dataset, tensors: dict[str, int], *, max_rows: int, batch_size: int,
               seed: int, first_batch: int = 0) -> dict[str, Keyed]:
    """The kept rows of each tensor with their keys; `data`'s first batch is batch `first_batch` of the
    data set the sample is of."""
    names = sorted(tensors)
    if not names:
        return {}
    kept: dict[str, Keyed] = {}
    for offset, values in enumerate(tensor_batches(model, data, names, batch_size)):
        rng = np.random.default_rng([seed, first_batch + offset])
        for name in names:
            rows, _ = channel_rows(values[name], tensors[name], None)
            fresh = (np.array(rows, dtype=np.float64), rng.random(rows.shape[0]))
            kept[name] = _smallest([kept[name], fresh] if name in kept else [fresh], max_rows)
    return kept


def merge_rows(parts: Iterable[dict[str, Keyed]], max_rows: int) -> dict[str, Keyed]:
    """The `max_rows` smallest keys of each tensor over `parts` (samples of disjoint batches)."""
    gathered: dict[str, list[Keyed]] = {}
    for part in parts:
        for name, keyed in part.items():
            gathered.setdefault(name, []).append(keyed)
    return {name: _smallest(keyed, max_rows) for name, keyed in gathered.items()}


def finish_rows(kept: dict[str, Keyed]) -> dict[str, np.ndarray]:
    """The rows of each tensor in key order."""
    return {name: rows[np.argsort(keys, kind="stable")] for name, (rows, keys) in kept.items()}


def _smallest(parts: list[Keyed], max_rows: int) -> Keyed:
    rows = np.concatenate([part[0] for part in parts]) if len(parts) > 1 else parts[0][0]
    keys = np.concatenate([part[1] for part in parts]) if len(parts) > 1 else parts[0][1]
    if rows.shape[0] > max_rows:
        chosen = np.argpartition(keys, max_rows - 1)[:max_rows]
        rows, keys = rows[chosen], keys[chosen]
    return rows, keys

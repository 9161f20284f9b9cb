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

from graphopt.calibration.capture import describe, exposing_model
from graphopt.calibration.data import Dataset
from graphopt.calibration.session import make_session
from graphopt.calibration.stats import channel_rows


def sample_rows(model: onnx.ModelProto, data: Dataset, tensors: dict[str, int], *, max_rows: int = 4096,
                batch_size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to `max_rows` rows (float64, rows x channels) of each tensor in `tensors` (name -> channel axis)."""
    names = sorted(tensors)
    if not names:
        return {}
    graph_inputs = {v.name for v in model.graph.input}
    computed = [n for n in names if n not in graph_inputs]  # graph inputs are read from the data itself
    session, feeds = None, set()
    if computed:
        infos = describe(model, computed, next(iter(data.batches(1))))
        session = make_session(exposing_model(model, computed, {n: infos[n].elem_type for n in computed}))
        feeds = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for batch in data.batches(batch_size):
        values = dict(zip(computed, session.run(computed, {k: v for k, v in batch.items() if k in feeds}))) \
            if session is not None else {}
        values.update({n: np.asarray(batch[n]) for n in names if n in graph_inputs})
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

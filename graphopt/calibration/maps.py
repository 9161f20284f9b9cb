"""Whole intermediate tensors of the first few calibration samples, for methods that need spatial structure
(ExPrune on convolutions scores every output position of a feature map, so rows are not enough).

Only the ancestor cone of the requested tensors runs (graphopt.calibration.capture.exposing_model), and
batches stop as soon as `max_items` samples are in: memory is max_items · the tensors' per-sample sizes
plus one batch. Values keep the tensors' dtype. Deterministic for a given model and data order.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.capture import describe, exposing_model
from graphopt.calibration.data import Dataset
from graphopt.calibration.session import make_session


def sample_maps(model: onnx.ModelProto, data: Dataset, names: list[str], max_items: int = 64,
                batch_size: int = 32) -> dict[str, np.ndarray]:
    """The first `max_items` samples (axis 0) of each tensor in `names`: name -> [r, ...], r <= max_items."""
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    names = sorted(set(names))
    if not names:
        return {}
    graph_inputs = {v.name for v in model.graph.input}
    computed = [n for n in names if n not in graph_inputs]  # graph inputs are read from the data itself
    session, feeds = None, set()
    if computed:
        infos = describe(model, computed, next(iter(data.batches(1))))
        session = make_session(exposing_model(model, computed, {n: infos[n].elem_type for n in computed}))
        feeds = {i.name for i in session.get_inputs()}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    held = 0
    for batch in data.batches(min(batch_size, max_items)):
        values = dict(zip(computed, session.run(computed, {k: v for k, v in batch.items() if k in feeds}))) \
            if session is not None else {}
        values.update({n: np.asarray(batch[n]) for n in names if n in graph_inputs})
        take = min(max_items - held, next(iter(values.values())).shape[0])
        for name in names:
            parts[name].append(np.array(values[name][:take]))
        held += take
        if held >= max_items:
            break
    return {name: np.concatenate(parts[name]) for name in names}

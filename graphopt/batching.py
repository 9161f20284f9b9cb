"""Whether the input model runs in onnxruntime on several samples at once.

A model may declare a dynamic batch axis and still fix the batch inside: an exporter writes a Reshape target
with the batch of the example it traced (torch's dynamo exporter does so around LSTM layers), and the model
then runs on one sample only. Everything graphopt runs batches samples (`--batch-size`, 32 by default), so
before any work the original model runs once on two samples (`batch_that_runs`): where that fails and one
sample runs, the whole job runs one sample at a time and says why; where one sample fails too, the model
cannot run on these inputs, which is the user's to see (a DataError naming the node and onnxruntime's
reason). Models that fix their batch, data given as a stream of feeds (the user batches those) and a
batch size of 1 are not probed.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.session import make_session, run_failure
from graphopt.errors import DataError
from graphopt.evaluate import random_feed
from graphopt.ir.shapes import batch_axes

log = logging.getLogger(__name__)


def _first(feeds: Any) -> dict[str, Any] | None:
    return next(iter(feeds), None)


def batch_that_runs(model: onnx.ModelProto, dataset: Dataset | None, shapes: dict[str, tuple[int, ...]],
                    batch_size: int, device: str = "cpu") -> tuple[int, str | None]:
    """(batch size to use, why it is smaller than `batch_size` or None, also logged as a warning). Runs `model`
    on two samples of `dataset` (seeded random inputs without data) and, where that fails, on one."""
    if batch_size <= 1 or all(axis is None for axis in batch_axes(model).values()):
        return batch_size, None
    if dataset is not None and (dataset.arrays is None or dataset.unit or (dataset.num_samples or 0) < 2):
        return batch_size, None
    where = "the calibration data" if dataset is not None else "seeded random inputs"
    pair = _first(dataset.batches(2, trimmed=False)) if dataset is not None else random_feed(model, shapes, batch=2)
    session = make_session(model, device=device)
    failed = run_failure(session, pair)
    if failed is None:
        return batch_size, None
    one = _first(dataset.batches(1, trimmed=False)) if dataset is not None else random_feed(model, shapes, batch=1)
    alone = run_failure(session, one)
    if alone is not None:
        raise DataError(f"the model fails in onnxruntime on {where}: {alone}")
    reason = (f"the model declares a dynamic batch but fails in onnxruntime on 2 samples at once ({failed}); "
              f"it runs one sample at a time (--batch-size 1)")
    log.warning("%s", reason)
    return 1, reason

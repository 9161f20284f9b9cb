"""Calibration sharded over Ray tasks (graphopt.calibration.cluster), merged exactly in shard order.

Each shard task deserialises the model from the object store (put there once per call), runs
onnxruntime over its shard only and returns float64 sufficient statistics; the driver merges them in
shard order, so the result does not depend on which task finishes first:
- `gather_statistics`: every round of the plan (graphopt.calibration.capture.plan_rounds) on every
  shard, each returning one `TensorStats` per tensor (shifted sums, Gram matrices or their diagonal, |x|
  sums, negative counts, row counts), merged by `TensorStats.merge`. Shards hold whole batches of the
  calibration batch size, so each runs exactly the batches one process runs, and the merged statistics
  differ from one process's by float64 summation order only (relative 1e-12 and below on the tests'
  models). (A round the memory bound gives a smaller batch may cut batches differently at shard edges;
  values then also differ by onnxruntime's dependence on the batch size, float32 rounding.)
- `gather_rows`: the keyed row samples of graphopt.calibration.sample, merged to the same rows in the
  same order as one pass;
- `gather_maps`: the first samples' whole tensors (graphopt.calibration.maps), from as many leading
  shards as hold them, concatenated in order.
Without a cluster each function runs in this process. A shard task runs onnxruntime with `threads`
intra-op threads (0: one, as each task holds one Ray CPU) and accumulates on one thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx

from graphopt.calibration.accumulate import RunSettings, run_rounds
from graphopt.calibration.capture import Round, TensorInfo
from graphopt.calibration.data import Dataset
from graphopt.calibration.maps import sample_maps
from graphopt.calibration.sample import Keyed, finish_rows, keyed_rows, merge_rows, sample_rows
from graphopt.calibration.stats import TensorStats
from graphopt.errors import OptionError
from graphopt.ir import weights

if TYPE_CHECKING:
    from graphopt.calibration.cluster import Cluster, Shard

log = logging.getLogger(__name__)


def _shipped(model: onnx.ModelProto) -> bytes:
    """The model as Ray tasks receive it: one serialized message, its weights inline (graphopt.ir.weights)."""
    if weights.referenced_bytes(model) > weights.BY_REFERENCE_BYTES:
        raise OptionError("--workers/--ray-address ship the model to each task as one message, which cannot hold "
                          "a model over 1 GiB of weights: calibrate this model in one process (drop --workers)")
    return weights.materialized(model).SerializeToString()


def gather_statistics(cluster: Cluster, model: onnx.ModelProto, data: Dataset, rounds: list[Round],
                      infos: dict[str, TensorInfo], stats: dict[str, TensorStats], settings: RunSettings,
                      batch_size: int) -> dict[str, TensorStats]:
    """`stats` (empty accumulators) filled from every shard of `data`, merged in shard order."""
    empty = {name: entry.meta() for name, entry in stats.items()}
    shard_settings = RunSettings(settings.device, settings.threads or 1, 1, settings.mask)
    results = cluster.map(_shard_statistics, data, batch_size, _shipped(model), rounds, infos, empty,
                          shard_settings)
    for _, part in results:
        for name, entry in stats.items():
            entry.merge(part[name])
    log.info("calibration: %d tensors merged from %d shards", len(stats), len(results))
    return stats


def _shard_statistics(data: Dataset, shard: Shard, model_bytes: bytes, rounds: list[Round],
                      infos: dict[str, TensorInfo], empty: dict[str, dict],
                      settings: RunSettings) -> dict[str, TensorStats]:
    """One shard task: the planned rounds over the shard's data, into fresh accumulators."""
    model = onnx.ModelProto.FromString(model_bytes)
    stats = {name: TensorStats.empty(meta["tensor"], frozenset(meta["kinds"]), meta["channel_axis"], meta["rank"],
                                     meta["channels"], meta["masked"], meta["positions"])
             for name, meta in empty.items()}
    run_rounds(model, data, rounds, infos, stats, settings)
    log.info("calibration %s: %d tensors", shard.describe(), len(stats))
    return stats


def gather_rows(cluster: Cluster | None, model: onnx.ModelProto, data: Dataset, tensors: dict[str, int], *,
                max_rows: int = 4096, batch_size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """`sample_rows` of `data`, on the cluster's shards when there is one (the same rows, in the same order)."""
    if cluster is None or not tensors:
        return sample_rows(model, data, tensors, max_rows=max_rows, batch_size=batch_size, seed=seed)
    results = cluster.map(_shard_rows, data, batch_size, _shipped(model), tensors, max_rows, batch_size,
                          seed)
    return finish_rows(merge_rows((part for _, part in results), max_rows))


def _shard_rows(data: Dataset, shard: Shard, model_bytes: bytes, tensors: dict[str, int], max_rows: int,
                batch_size: int, seed: int) -> dict[str, Keyed]:
    return keyed_rows(onnx.ModelProto.FromString(model_bytes), data, tensors, max_rows=max_rows,
                      batch_size=batch_size, seed=seed, first_batch=shard.first_batch)


def gather_maps(cluster: Cluster | None, model: onnx.ModelProto, data: Dataset, names: list[str],
                max_items: int = 64, batch_size: int = 32) -> dict[str, np.ndarray]:
    """`sample_maps` of `data`, on the cluster's leading shards when there is one."""
    if cluster is None or not names:
        return sample_maps(model, data, names, max_items=max_items, batch_size=batch_size)
    results = cluster.map(_shard_maps, data, batch_size, _shipped(model), sorted(set(names)), max_items,
                          batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    for _, part in results:
        for name, values in part.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values)[:max_items] for name, values in parts.items()}


def _shard_maps(data: Dataset, shard: Shard, model_bytes: bytes, names: list[str], max_items: int,
                batch_size: int) -> dict[str, np.ndarray]:
    if shard.unit == "samples" and shard.start >= max_items:  # the shards before hold enough samples
        return {}
    return sample_maps(onnx.ModelProto.FromString(model_bytes), data, names, max_items=max_items,
                       batch_size=batch_size)

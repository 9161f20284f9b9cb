"""Statistics of intermediate tensors from onnxruntime runs over calibration data, in bounded memory.

`Calibrator` owns the data and run settings and answers `statistics(model, requests)`:
1. requests on the same tensor merge (union of kinds); two channel axes for one tensor are refused;
2. a cache keyed by each tensor's cone fingerprint (capture.py) answers every request whose axis
   and kinds an entry covers, whatever the tensor is called now; so a pass calling again on a model
   where only later layers changed (sequential mode: layer k measured on the model with layers < k
   rewritten, as SparseGPT and SliceGPT do) reruns only the tensors downstream of its change, and a
   statistics file preloads the cache;
3. the misses are planned into rounds (capture.py) under `memory_limit` bytes, which covers the
   accumulators (C² float64 per Gram), the captured activations of one batch and the float64 working
   chunks; each round runs only the cone of its tensors in onnxruntime over every batch and feeds
   each captured tensor into its `TensorStats` at once, so no activation outlives its batch.
Sessions use full graph optimisation: exposing post-activation tensors (the inputs of Conv/Gemm/MatMul)
leaves Conv+activation fusions intact, and on ResNet-18 the exposed cone ran within ~5% of plain
inference at that level, while the unoptimised or basic levels ran ~1.8x slower.
Data given as a stream of feed dicts is taken one feed per batch, as given: the bound then holds for
feeds of at most the planned batch size.
Accumulation runs on `threads` workers (default: the available cores), one tensor per task with BLAS
single-threaded, so each tensor sees its batches in order whatever the thread count. Results depend
only on the model, the data and its order, the batch size and the memory limit (which fixes rounds and
batch sizes), and onnxruntime's kernels, not on timing: the same call gives bit-identical statistics.
`context_calibrator` builds the calibrator behind a pass context's statistics from its data and options.
`paired(reference, model, requests)` measures moments tying a tensor of a reference model to a tensor of a
rewritten one on the same samples (graphopt.calibration.paired), under the same bound; never cached.
`keep_outputs(cones)` asks the first measurement of a model whose graph outputs have those cone
fingerprints to keep the outputs too (graphopt.calibration.reference), for a fidelity check that then
need not run that model again; `kept_outputs` holds them.

With a `cluster` (graphopt.calibration.cluster, `--workers` / `--ray-address`), the planned rounds run on
Ray tasks, one per shard of the data, and their statistics are merged in shard order
(graphopt.calibration.distributed); caching, preloading and planning stay here, so sequential mode
measures each stage on the cluster. The memory bound then holds per task.

Attention masks: token tensors skip the rows of padded positions when a mask input is chosen
(graphopt.calibration.mask: found in the model by default, `mask_input` NAME or "none" otherwise, a
statistics file's own choice kept when none is given, so its statistics stay valid).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import onnx
from tqdm.auto import tqdm

from graphopt.calibration.accumulate import RunSettings, run_rounds
from graphopt.calibration.capture import TensorInfo, cone_fingerprints, describe, plan_rounds
from graphopt.calibration.data import Dataset, DataSource, load_data
from graphopt.calibration.distributed import gather_statistics
from graphopt.calibration.mask import MaskChoice, choose_mask
from graphopt.calibration.paired import PairedStats, PairRequest, paired_statistics
from graphopt.calibration.reference import KeptOutputs, output_cones
from graphopt.calibration.staged import Stages
from graphopt.calibration.stats import StatRequest, TensorStats, sampled_positions
from graphopt.errors import DataError, OptionError

if TYPE_CHECKING:
    from graphopt.calibration.cluster import Cluster
    from graphopt.calibration.store import StatsFile

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 2 * 1024**3
DEFAULT_ROWS_PER_CHANNEL = 1024  # Grams of wide maps from about this many rows per channel (stats.py)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(value: int | str) -> int:
    """2147483648, '2GB', '512MiB', '1.5g' -> bytes (binary units)."""
    if isinstance(value, int):
        amount = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise OptionError(f"--calib-memory expects a size such as 2GB or 512MB, got '{value}'")
        amount = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if amount <= 0:
        raise OptionError(f"--calib-memory must be positive, got '{value}'")
    return amount


class Calibrator:
    """Cached, memory-bounded statistics over one data set; see the module docstring.

    Sequential mode is repeated calls on the model as it is being rewritten::

        calibrator = Calibrator(load_data(data, model))
        for layer in layers_in_graph_order:
            stats = calibrator.statistics(model, [StatRequest(layer.input, frozenset({"mean", "gram"}))])
            model = rewrite(model, layer, stats[layer.input])  # later layers see this one rewritten

    Each call runs only the cone of the tensors not cached for the current graph, so L layers cost
    about L²/2 layer evaluations over the data (not L full-model runs); statistics of tensors above
    every rewrite so far are reused as they are.
    """

    def __init__(self, data: Dataset | None, *, batch_size: int = 32, memory_limit: int | str = DEFAULT_MEMORY,
                 device: str = "cpu", threads: int = 0, progress: bool = False,
                 mask_input: str | MaskChoice | None = None, cluster: Cluster | None = None,
                 rows_per_channel: int = DEFAULT_ROWS_PER_CHANNEL) -> None:
        if batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
        if threads < 0:
            raise OptionError(f"--threads must be 0 (onnxruntime's default) or more, got {threads}")
        if rows_per_channel < 0:
            raise OptionError(f"--calib-rows-per-channel must be 0 (every position) or more, got {rows_per_channel}")
        if isinstance(mask_input, str):  # an input named directly: the graph still says which entries count
            mask_input = choose_mask(data.model, mask_input) if data is not None else MaskChoice(mask_input, "given")
        self.mask = mask_input if mask_input is not None else MaskChoice(None, "disabled")
        self.mask_input = self.mask.name
        self.data = data
        self.batch_size, self.memory_limit = batch_size, parse_bytes(memory_limit)
        self.device, self.threads, self.progress = device, threads, progress
        self.rows_per_channel = rows_per_channel  # Grams from sampled positions of wide maps (stats.py); 0: all
        self.workers = threads or _available_cores()  # accumulation threads, one tensor each
        self.cluster = cluster  # None: measured in this process
        self.cache: dict[str, list[TensorStats]] = {}  # cone fingerprint -> statistics measured on it
        self.cones: dict[str, str] = {}  # tensor name -> cone fingerprint of the last model asked about
        self.computed = 0  # tensors measured by running the model (cache misses), for logs and tests
        self.preloaded: dict[str, str] = {}  # tensor name -> statistics file it was loaded from
        self._data_fingerprint: str | None = None
        self._spilled: tempfile.TemporaryDirectory | None = None  # Grams of calibrations measured in parts
        self._keep_cones: dict[str, str] | None = None  # graph output -> cone fingerprint to keep outputs of
        self.kept_outputs: KeptOutputs | None = None

    @property
    def data_fingerprint(self) -> str | None:
        if self._data_fingerprint is None and self.data is not None:
            from graphopt.calibration.store import data_fingerprint

            self._data_fingerprint = data_fingerprint(self.data)
        return self._data_fingerprint

    def preload(self, stats_file: StatsFile) -> None:
        """Seed the cache from a statistics file (computed on this data, when this calibrator has data)."""
        from graphopt.calibration.store import StaleStatsError

        if self.data is not None and stats_file.data_fingerprint != self.data_fingerprint:
            raise StaleStatsError(f"{stats_file.source} was computed on other calibration data than the data "
                                  "given now; recompute it with `graphopt calibrate` or drop --stats")
        if (stats_file.mask_input or None) != self.mask_input:
            def described(name: str | None) -> str:
                return f"mask input '{name}'" if name else "no mask"

            raise StaleStatsError(f"{stats_file.source} was computed with {described(stats_file.mask_input)}, this run "
                                  f"uses {described(self.mask_input)}: recompute it with `graphopt calibrate` or drop "
                                  "--mask-input")
        for name, stats in stats_file.stats.items():
            self.cache.setdefault(stats_file.cones[name], []).append(stats)
            self.preloaded[name] = stats_file.source

    def statistics(self, model: onnx.ModelProto, requests: Iterable[StatRequest]) -> dict[str, TensorStats]:
        """Statistics for `requests` on `model`, keyed by tensor name (shared with the cache: read-only)."""
        merged = _merge_requests(requests)
        self.cones = cone_fingerprints(model)
        missing = [name for name in merged if name not in self.cones]
        if missing:
            raise OptionError(f"no tensor named '{missing[0]}' in the model's main graph")
        found: dict[str, TensorStats] = {}
        wanted: dict[str, StatRequest] = {}
        for name, request in merged.items():
            hit = next((s for s in self.cache.get(self.cones[name], []) if s.covers(request)), None)
            if hit is not None:
                found[name] = replace(hit, tensor=name)
            else:
                wanted[name] = request
        if wanted:
            found.update(self._measure(model, wanted))
        return {name: found[name] for name in merged}

    def know(self, model: onnx.ModelProto, stats: dict[str, TensorStats]) -> None:
        """Record statistics of tensors of `model` known without measuring them (a pass that rotated a
        tensor knows its rotated statistics exactly): later requests on `model` read them like measured ones."""
        cones = cone_fingerprints(model)
        for name, known in stats.items():
            self.cache.setdefault(cones[name], []).append(replace(known, tensor=name))

    def keep_outputs(self, cones: dict[str, str]) -> None:
        """Keep the graph outputs of the first measured model whose outputs have these cone fingerprints."""
        self._keep_cones = dict(cones)

    def _keeper(self, model: onnx.ModelProto) -> KeptOutputs | None:
        """Where this measurement should keep `model`'s outputs: the model computes the outputs asked for,
        none are kept yet, and the run is local. The kept values take at most 1/64 of the memory bound, which
        their round's budget leaves free."""
        if self._keep_cones is None or self.kept_outputs is not None or self.cluster is not None:
            return None
        if output_cones(model, self.cones) != self._keep_cones:
            return None
        self.kept_outputs = KeptOutputs.for_model(model, self.memory_limit // 64)
        return self.kept_outputs

    def paired(self, reference: onnx.ModelProto, model: onnx.ModelProto,
               requests: Iterable[PairRequest], stages: Stages | None = None) -> dict[PairRequest, PairedStats]:
        """Paired statistics of tensors of `reference` beside tensors of `model` (graphopt.calibration.paired),
        measured on this calibrator's data with its batch size, memory bound, device, threads and mask."""
        if self.data is None:
            raise DataError("error-correcting reconstruction runs the pruned model beside the original: "
                            "give --calib DATA.npz (a statistics file cannot answer it)")
        return paired_statistics(self.data, reference, model, list(requests), batch_size=self.batch_size,
                                 memory_limit=self.memory_limit, device=self.device, threads=self.threads,
                                 mask=self.mask if self.mask_input is not None else None, stages=stages,
                                 rows_per_channel=self.rows_per_channel)

    def _measure(self, model: onnx.ModelProto, wanted: dict[str, StatRequest]) -> dict[str, TensorStats]:
        if self.data is None:
            name = next(iter(wanted))
            if name in self.preloaded:
                from graphopt.calibration.store import StaleStatsError

                raise StaleStatsError(f"statistics of tensor '{name}' in {self.preloaded[name]} are stale (the graph "
                                      "above it changed, or other kinds or axis were asked): give --calib to recompute")
            raise DataError(f"statistics of tensor '{name}' need calibration data: give --calib DATA.npz "
                            "(or --stats STATS.npz from `graphopt calibrate` on this model)")
        sample = next(iter(self.data.batches(1, trimmed=False)))  # shapes at full length
        infos = describe(model, list(wanted), sample)
        stats = {name: _empty(infos[name], wanted[name], self.mask_input is not None, self.data.num_samples,
                              self.rows_per_channel) for name in wanted}
        order = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
        ordered = sorted(infos.values(), key=lambda info: order.get(info.name, -1))
        sizes = {name: s.shifted_square.nbytes + 4 * s.shifted_sum.nbytes for name, s in stats.items()}
        largest = max(sizes.values())
        if largest >= self.memory_limit:
            raise OptionError(f"the statistics of one tensor alone need {largest / 2**20:.0f} MiB, more than "
                              f"--calib-memory {self.memory_limit / 2**20:.0f} MiB: raise --calib-memory")
        self._measure_parts(model, ordered, infos, stats, sizes)
        for name, result in stats.items():
            self.cache.setdefault(self.cones[name], []).append(result)
        self.computed += len(stats)
        return stats

    def _measure_parts(self, model: onnx.ModelProto, ordered: list[TensorInfo], infos: dict[str, TensorInfo],
                       stats: dict[str, TensorStats], sizes: dict[str, int]) -> None:
        """Fill `stats` at once where their accumulators take at most half the memory bound, else in parts that
        do, each part's Grams moved to disk once measured; the last part keeps the outputs `_keeper` asks for."""
        kept = self._keeper(model)
        whole = sum(sizes.values()) <= self.memory_limit // 2
        parts = [ordered] if whole else _parts(ordered, sizes, self.memory_limit // 2)
        for index, part in enumerate(parts):
            chosen = {info.name: stats[info.name] for info in part}
            keeping = kept if index == len(parts) - 1 else None
            budget = self.memory_limit - sum(sizes[n] for n in chosen) - (keeping.limit if keeping else 0)
            self._measure_part(model, part, infos, chosen, budget, keeping)
            for result in chosen.values() if not whole else ():
                result.spill(self._spill_folder())

    def release(self) -> None:
        """Forget every cached statistic and delete those kept on disk; the kept outputs stay. A later request
        measures again."""
        self.cache.clear()
        self.cones.clear()
        if self._spilled is not None:
            self._spilled.cleanup()
            self._spilled = None

    def _spill_folder(self) -> Path:
        if self._spilled is None:
            self._spilled = tempfile.TemporaryDirectory(prefix="graphopt-stats-")
        return Path(self._spilled.name)

    def _measure_part(self, model: onnx.ModelProto, ordered: list[TensorInfo], infos: dict[str, TensorInfo],
                      stats: dict[str, TensorStats], budget: int, kept: KeptOutputs | None = None) -> None:
        """Fill `stats` (the tensors of `ordered`, in graph order) in rounds under `budget` bytes; the last
        round also fills `kept`, where given."""
        rounds = plan_rounds(ordered, self.batch_size, budget, self.workers)
        total = self.data.num_samples
        settings = RunSettings(self.device, self.threads, self.workers, self.mask)
        if self.cluster is not None:
            gather_statistics(self.cluster, model, self.data, rounds, infos, stats, settings, self.batch_size)
        else:
            with tqdm(total=total * len(rounds) if total is not None else None, desc="calibrate", unit="sample",
                      disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
                run_rounds(model, self.data, rounds, infos, stats, settings, bar, kept)
        log.info("calibration: %d tensors in %d rounds over %s samples", len(stats), len(rounds), total)


def _parts(ordered: list[TensorInfo], sizes: dict[str, int], limit: int) -> list[list[TensorInfo]]:
    """`ordered` cut, in order, into parts whose accumulators take at most `limit` bytes (one tensor at least)."""
    parts: list[list[TensorInfo]] = [[]]
    used = 0
    for info in ordered:
        if parts[-1] and used + sizes[info.name] > limit:
            parts.append([])
            used = 0
        parts[-1].append(info)
        used += sizes[info.name]
    return parts


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _empty(info: TensorInfo, request: StatRequest, masked: bool, samples: int | None,
           rows_per_channel: int) -> TensorStats:
    rank = len(info.sample_shape)
    if not -rank <= request.channel_axis < rank:
        raise OptionError(f"channel axis {request.channel_axis} is out of range for tensor '{info.name}' "
                          f"of rank {rank}")
    axis = request.channel_axis % rank
    positions = sampled_positions(info.sample_shape, axis, samples, rows_per_channel)
    return TensorStats.empty(info.name, request.kinds, axis, rank, info.sample_shape[axis], masked, positions)


def _merge_requests(requests: Iterable[StatRequest]) -> dict[str, StatRequest]:
    merged: dict[str, StatRequest] = {}
    for request in requests:
        previous = merged.get(request.tensor)
        if previous is not None and previous.channel_axis != request.channel_axis:
            raise OptionError(f"tensor '{request.tensor}' requested with channel axes "
                              f"{previous.channel_axis} and {request.channel_axis}")
        kinds = request.kinds | (previous.kinds if previous is not None else frozenset())
        merged[request.tensor] = StatRequest(request.tensor, kinds, request.channel_axis)
    return merged


def context_calibrator(data: DataSource | Dataset | None, template: onnx.ModelProto, options: dict[str, Any],
                       progress: bool, cluster: Cluster | None = None) -> Calibrator:
    """The calibrator behind a pass context's statistics: `data` (validated against `template`), and
    `stats`, `calib_memory`, `calib_rows_per_channel`, `device`, `threads`, `batch_size` and `mask_input`
    from the method `options`
    (a None value means the default; for `mask_input`: the statistics file's mask, else the one found in
    the model)."""
    from graphopt.calibration.store import StatsFile, load_stats

    def option(key: str, default: Any = None) -> Any:
        value = options.get(key)
        return default if value is None else value

    source: Any = option("stats")
    stats_file = source if isinstance(source, StatsFile) or source is None else load_stats(source)
    dataset = data if data is None or isinstance(data, Dataset) else load_data(data, template)
    mask = choose_mask(template, options.get("mask_input"), from_file=stats_file is not None,
                       inherited=stats_file.mask_input if stats_file is not None else None)
    if mask.how != "disabled" or mask.name is not None:
        log.info("calibration mask: %s (%s) %s", mask.name, mask.how, mask.detail)
    calibrator = Calibrator(dataset, batch_size=int(option("batch_size", 32)),
                            memory_limit=option("calib_memory", DEFAULT_MEMORY), device=option("device", "cpu"),
                            threads=int(option("threads", 0)), progress=progress, mask_input=mask,
                            cluster=cluster,
                            rows_per_channel=int(option("calib_rows_per_channel", DEFAULT_ROWS_PER_CHANNEL)))
    if stats_file is not None:
        calibrator.preload(stats_file)
    return calibrator

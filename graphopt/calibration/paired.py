"""Paired statistics: a tensor of a reference model beside a tensor of a rewritten model, on the same samples.

Error-correcting reconstruction fits a layer of a partly pruned model to reproduce what the reference
(unpruned) model computes there, so it needs moments that tie the two models' activations row by row.
A `PairRequest` names tensor x of the reference and tensor y of the model, both read as rows along
their channel axis (stats.py); the two tensors must agree on every other axis (the same samples and
positions), which holds for a channel-pruned copy of the reference. For n rows (x_r, y_r) the
accumulators give

    μ_x, μ_y,   Σ_xy = (1/n) Σ (x_r − μ_x)(y_r − μ_y)ᵀ  (C_x × C_y),   Σ_yy = (1/n) Σ (y_r − μ_y)(y_r − μ_y)ᵀ,

summed in float64 about fixed shifts (the first chunk's means, as in stats.py), so the centring does not
cancel when |μ| ≫ σ. Σ_xx is not formed. With an attention mask, both tensors keep the same rows.

Work: batches alternate between `HALVES` accumulators per pair, each filled on a worker thread while
onnxruntime computes the next batch, and merged in order at the end (shifted sums move onto one shift
exactly, as in stats.py's merge), so the result does not depend on the threads' timing.

Memory: per round, the accumulators of its pairs (C_x·C_y + C_y² float64 each, per half), two batches of
both models' captured tensors and the float64 working chunks stay within `memory_limit`; pairs are packed
into rounds greedily in the given order, and a round whose single pair does not fit runs with a smaller
batch (down to one sample, with a warning). Each round runs only the cones of its tensors, once per model,
over every batch; results depend only on the models, the data, its order and the batch size.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from graphopt.calibration.capture import TensorInfo, describe, exposing_model, round_bytes
from graphopt.calibration.data import Dataset
from graphopt.calibration.mask import MaskChoice
from graphopt.calibration.session import make_session
from graphopt.calibration.staged import Stages
from graphopt.calibration.blas import add_shifted, single_threaded_blas, symmetric, syrk_update
from graphopt.calibration.stats import chunk_rows, row_blocks, sampled_positions
from graphopt.errors import OptionError

log = logging.getLogger(__name__)

# accumulators per pair: batches alternate between them (one accumulating on a worker thread while onnxruntime
# computes the next batch, or both at once) and they merge in order at the end, so the moments do not depend
# on the thread timing
HALVES = 2


@dataclass(frozen=True)
class PairRequest:
    """Tensor `reference` of the reference model beside tensor `tensor` of the model, both reduced over
    every axis but `channel_axis` (negative counts from the end)."""

    reference: str
    tensor: str
    channel_axis: int = 1


@dataclass(eq=False)  # arrays inside
class PairedStats:
    """Running paired moments of one `PairRequest`; see the module docstring."""

    request: PairRequest
    reference_channels: int
    channels: int
    count: int = 0
    reference_shift: np.ndarray | None = None
    shift: np.ndarray | None = None
    positions: int = 0  # rows kept per item along axis 0 (stats.sampled_positions); 0: every row
    reference_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    shifted_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cross: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))   # Σ (x − Kx)(y − Ky)ᵀ
    square: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # Σ (y − Ky)(y − Ky)ᵀ, upper triangle

    @classmethod
    def empty(cls, request: PairRequest, reference_channels: int, channels: int, positions: int = 0) -> PairedStats:
        return cls(request, reference_channels, channels, positions=positions,
                   reference_sum=np.zeros(reference_channels),
                   shifted_sum=np.zeros(channels), cross=np.zeros((reference_channels, channels)),
                   square=np.zeros((channels, channels), order="F"))

    @property
    def nbytes(self) -> int:
        return self.cross.nbytes + self.square.nbytes

    def update(self, reference_rows: np.ndarray, rows: np.ndarray) -> None:
        """Add aligned (rows, C_x) and (rows, C_y) blocks, in float64 chunks."""
        if reference_rows.shape[0] != rows.shape[0] or reference_rows.shape[1] != self.reference_channels \
                or rows.shape[1] != self.channels:
            raise ValueError(f"'{self.request.reference}' / '{self.request.tensor}': rows of shapes "
                             f"{reference_rows.shape} and {rows.shape} do not pair")
        step = chunk_rows(self.reference_channels + self.channels)
        for start in range(0, rows.shape[0], step):
            x = np.array(reference_rows[start:start + step], dtype=np.float64)
            y = np.array(rows[start:start + step], dtype=np.float64)
            if x.shape[0]:
                self._update_chunk(x, y)

    def _update_chunk(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.shift is None:
            self.reference_shift, self.shift = x.mean(axis=0), y.mean(axis=0)
        x -= self.reference_shift
        y -= self.shift
        self.count += x.shape[0]
        self.reference_sum += x.sum(axis=0)
        self.shifted_sum += y.sum(axis=0)
        self.cross += x.T @ y
        syrk_update(self.square, y)

    def fresh(self) -> PairedStats:
        """Empty accumulators for the same pair, channels and sampled positions."""
        return PairedStats.empty(self.request, self.reference_channels, self.channels, self.positions)

    def merge(self, other: PairedStats) -> None:
        """Add the moments of other rows of the same pair, in place: with d = K' − K per side,
        Σ (x − K_x)(y − K_y)ᵀ = S'_xy + s'_x d_yᵀ + d_x s'_yᵀ + n' d_x d_yᵀ, and Σ_yy as in stats.py."""
        if (other.reference_channels, other.channels, other.positions) != \
                (self.reference_channels, self.channels, self.positions):
            raise ValueError(f"paired statistics of '{self.request.tensor}' were taken differently: they do not merge")
        if other.count == 0:
            return
        if self.count == 0 or self.shift is None:
            self.reference_shift, self.shift = other.reference_shift.copy(), other.shift.copy()
        delta_x, delta_y = other.reference_shift - self.reference_shift, other.shift - self.shift
        self.cross += other.cross + np.outer(other.reference_sum, delta_y) + np.outer(delta_x, other.shifted_sum) \
            + other.count * np.outer(delta_x, delta_y)
        self.square += other.square
        add_shifted(self.square, other.shifted_sum, other.count, delta_y)
        self.reference_sum += other.reference_sum + other.count * delta_x
        self.shifted_sum += other.shifted_sum + other.count * delta_y
        self.count += other.count

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError(f"paired statistics of '{self.request.tensor}' have no rows")

    @property
    def reference_mean(self) -> np.ndarray:
        self._check()
        return self.reference_shift + self.reference_sum / self.count

    @property
    def mean(self) -> np.ndarray:
        self._check()
        return self.shift + self.shifted_sum / self.count

    def cross_covariance(self) -> np.ndarray:
        """Σ_xy, C_x × C_y."""
        self._check()
        return (self.cross - np.outer(self.reference_sum, self.shifted_sum) / self.count) / self.count

    def covariance(self) -> np.ndarray:
        """Σ_yy, C_y × C_y."""
        self._check()
        return (symmetric(self.square) - np.outer(self.shifted_sum, self.shifted_sum) / self.count) / self.count


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _runner(model: onnx.ModelProto, names: list[str], infos: dict[str, TensorInfo], device: str,
            threads: int) -> Runner:
    """A function from a batch to the values of `names` (graph inputs read from the batch)."""
    computed = [name for name in names if not infos[name].is_input]
    session = None
    if computed:
        exposed = exposing_model(model, computed, {name: infos[name].elem_type for name in computed})
        session = make_session(exposed, optimize=True, device=device, threads=threads, spinning=False)
    feeds = {i.name for i in session.get_inputs()} if session is not None else set()

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(computed, session.run(computed, {k: v for k, v in batch.items() if k in feeds}),
                          strict=True)) if session is not None else {}
        values.update({name: batch[name] for name in names if infos[name].is_input})
        return values
    return run


def _rounds(requests: list[PairRequest], infos: tuple[dict[str, TensorInfo], dict[str, TensorInfo]],
            accumulators: dict[PairRequest, int], batch_size: int, memory_limit: int) -> list[tuple[list[PairRequest], int]]:
    """Pairs packed in order into rounds (pairs, batch size) that fit `memory_limit`."""
    def cost(pairs: list[PairRequest], batch: int) -> int:
        captured = [info for p in pairs for info in (infos[0][p.reference], infos[1][p.tensor])]
        return sum(accumulators[p] * HALVES for p in pairs) + round_bytes(captured, batch, batches=HALVES)

    packed: list[list[PairRequest]] = []
    for request in requests:
        if packed and cost([*packed[-1], request], batch_size) <= memory_limit:
            packed[-1].append(request)
        else:
            packed.append([request])
    rounds = []
    for pairs in packed:
        batch = batch_size
        while batch > 1 and cost(pairs, batch) > memory_limit:
            batch = max(1, batch // 2)
        if cost(pairs, batch) > memory_limit:
            log.warning("paired statistics of '%s' need %d bytes for one sample, more than the calibration memory "
                        "budget (%d bytes); running them one sample at a time", pairs[0].tensor, cost(pairs, 1),
                        memory_limit)
        rounds.append((pairs, batch))
    return rounds


def paired_statistics(data: Dataset, reference: onnx.ModelProto, model: onnx.ModelProto,
                      requests: list[PairRequest], *, batch_size: int, memory_limit: int, device: str = "cpu",
                      threads: int = 0, mask: MaskChoice | None = None,
                      stages: Stages | None = None, rows_per_channel: int = 0) -> dict[PairRequest, PairedStats]:
    """Paired statistics of every request over all of `data` (see the module docstring). With `stages`
    (graphopt.calibration.staged), calls that fit in one round resume each model from what earlier calls
    with the same `stages` computed. Wide maps pair only sampled positions, the same in both tensors
    (`rows_per_channel`, as stats.sampled_positions)."""
    requests = list(dict.fromkeys(requests))
    if not requests:
        return {}
    sample = next(iter(data.batches(1, trimmed=False)))  # shapes at full length
    infos = (describe(reference, sorted({r.reference for r in requests}), sample),
             describe(model, sorted({r.tensor for r in requests}), sample))
    found = {r: _empty(r, infos[0][r.reference], infos[1][r.tensor], data.num_samples, rows_per_channel)
             for r in requests}
    rounds, stages = _staged_rounds(requests, infos, {r: s.nbytes for r, s in found.items()}, batch_size,
                                    memory_limit, stages)
    with single_threaded_blas(), ThreadPoolExecutor(HALVES, thread_name_prefix="paired") as pool:
        for pairs, batch_size_used in rounds:
            names = sorted({p.reference for p in pairs}), sorted({p.tensor for p in pairs})
            runners = _runners((reference, model), names, infos, batch_size_used, (device, threads), stages)
            _measure_round(pool, data.batches(batch_size_used), runners, {pair: found[pair] for pair in pairs}, mask)
    log.info("paired calibration: %d tensor pairs over %s samples", len(requests), data.num_samples)
    return found


def _measure_round(pool: ThreadPoolExecutor, batches: Iterable[dict[str, np.ndarray]],
                   runners: list[Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]],
                   found: dict[PairRequest, PairedStats], mask: MaskChoice | None) -> None:
    """Every batch of one round into `found`: batches alternate between the halves, each half's batches in
    order on the pool, and the halves merge into `found` in order at the end."""
    mask_name = mask.name if mask is not None else None
    halves = {pair: [stats, *(stats.fresh() for _ in range(HALVES - 1))] for pair, stats in found.items()}
    jobs: list[Future[None] | None] = [None] * HALVES
    for index, batch in enumerate(batches):
        half = index % HALVES
        if jobs[half] is not None:  # this half's previous batch is done: two batches alive at most
            jobs[half].result()
        reference_values, values = runners[0](index, batch), runners[1](index, batch)
        kept = mask.kept(batch[mask_name]) if mask is not None and mask_name is not None else None
        work = [(halves[pair][half], reference_values[pair.reference], values[pair.tensor]) for pair in found]
        jobs[half] = pool.submit(_accumulate_all, work, kept)
        del reference_values, values, work
    for job in jobs:
        if job is not None:
            job.result()
    for pair, stats in found.items():
        for other in halves[pair][1:]:
            stats.merge(other)


def _staged_rounds(requests: list[PairRequest], infos: tuple[dict[str, TensorInfo], dict[str, TensorInfo]],
                   sizes: dict[PairRequest, int], batch_size: int, memory_limit: int, stages: Stages | None
                   ) -> tuple[list[tuple[list[PairRequest], int]], Stages | None]:
    """The rounds, and the stages to resume from: kept frontiers share the memory bound and serve only calls
    that run every batch in one round; otherwise the rounds get the whole bound and no stages."""
    if stages is not None:
        rounds = _rounds(requests, infos, sizes, batch_size, memory_limit - stages.memory_limit)
        if len(rounds) == 1:
            return rounds, stages
    return _rounds(requests, infos, sizes, batch_size, memory_limit), None


def _runners(models: tuple[onnx.ModelProto, onnx.ModelProto], names: tuple[list[str], list[str]],
             infos: tuple[dict[str, TensorInfo], dict[str, TensorInfo]], batch_size: int, where: tuple[str, int],
             stages: Stages | None) -> list[Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """The reference's and the model's runners from (batch index, batch) to their round's tensors: resuming
    from `stages` when given, else full cones."""
    if stages is not None:
        return [stage.runner(model, wanted, batch_size, *where)
                for stage, model, wanted in zip((stages.reference, stages.model), models, names)]
    plain = [_runner(model, wanted, info, *where) for model, wanted, info in zip(models, names, infos)]
    return [(lambda run: lambda index, batch: run(batch))(run) for run in plain]


def _empty(request: PairRequest, reference: TensorInfo, info: TensorInfo, samples: int | None,
           rows_per_channel: int) -> PairedStats:
    rank = len(info.sample_shape)
    if len(reference.sample_shape) != rank or not -rank <= request.channel_axis < rank:
        raise OptionError(f"tensors '{request.reference}' and '{request.tensor}' do not pair along axis "
                          f"{request.channel_axis}")
    axis = request.channel_axis % rank
    wider = max((reference, info), key=lambda i: i.sample_shape[axis])  # enough rows for the wider side
    positions = sampled_positions(wider.sample_shape, axis, samples, rows_per_channel)
    return PairedStats.empty(request, reference.sample_shape[axis], info.sample_shape[axis], positions)


def _accumulate_all(work: list[tuple[PairedStats, np.ndarray, np.ndarray]], kept: np.ndarray | None) -> None:
    for stats, reference, values in work:
        _accumulate(stats, reference, values, kept)


def _accumulate(stats: PairedStats, reference: np.ndarray, values: np.ndarray, kept: np.ndarray | None) -> None:
    axis = stats.request.channel_axis
    rows = chunk_rows(stats.reference_channels + stats.channels)
    blocks = (row_blocks(reference, axis, kept, rows, stats.positions),
              row_blocks(values, axis, kept, rows, stats.positions))
    for x, y in zip(*blocks, strict=True):
        stats.update(x, y)

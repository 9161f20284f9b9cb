"""Running planned calibration rounds over a data set and feeding each captured tensor into its accumulator.

`run_rounds` is the measuring half of `graphopt.calibration.collect.Calibrator`, shared by the local run
and by each shard task of a distributed one (graphopt.calibration.distributed): for every round it runs
only the cone of the round's tensors in onnxruntime, batch by batch, and hands each captured tensor to
one accumulation task (`workers` threads, BLAS single-threaded), so each tensor sees its batches in
order whatever the thread count, and no activation outlives its batch. The statistics depend only on
the model, the data and its order, the rounds (tensors and batch sizes) and onnxruntime's kernels.
Given a `KeptOutputs` (graphopt.calibration.reference), the last round also exposes the graph outputs
and keeps them.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import onnx
from tqdm.auto import tqdm

from graphopt.calibration.capture import Round, TensorInfo, exposing_model
from graphopt.calibration.data import Dataset
from graphopt.calibration.mask import MaskChoice
from graphopt.calibration.reference import KeptOutputs
from graphopt.calibration.session import make_session
from graphopt.calibration.blas import single_threaded_blas
from graphopt.calibration.stats import TensorStats, chunk_rows, mask_applies, row_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """How rounds run: onnxruntime's device and intra-op `threads` (0: its default), `workers`
    accumulation threads, and the attention mask whose zero entries drop token rows (None: every row)."""

    device: str = "cpu"
    threads: int = 0
    workers: int = 1
    mask: MaskChoice | None = None


def run_rounds(model: onnx.ModelProto, data: Dataset, rounds: list[Round], infos: dict[str, TensorInfo],
               stats: dict[str, TensorStats], settings: RunSettings, bar: tqdm | None = None,
               kept: KeptOutputs | None = None) -> None:
    """Accumulate every round's tensors over all of `data` into `stats` (see the module docstring);
    the last round also fills `kept` with the graph outputs, where given."""
    with ThreadPoolExecutor(settings.workers, thread_name_prefix="calibrate") as pool, single_threaded_blas():
        for index, planned in enumerate(rounds):
            if bar is not None:
                bar.set_postfix_str(f"round {index + 1}/{len(rounds)}")
            _run_round(model, data, planned, infos, stats, settings, bar, pool,
                       kept if index == len(rounds) - 1 else None)
    if kept is not None and rounds:
        kept.finish()


def _run_round(model: onnx.ModelProto, data: Dataset, planned: Round, infos: dict[str, TensorInfo],
               stats: dict[str, TensorStats], settings: RunSettings, bar: tqdm | None,
               pool: ThreadPoolExecutor, outputs: KeptOutputs | None = None) -> None:
    """Run the round's cone batch by batch; each tensor is accumulated by one worker task (so in
    the same order whatever the threads), and dropped as soon as its task is done. The graph outputs
    `outputs` asks for are exposed too and handed over batch by batch."""
    names = planned.tensors
    computed = [name for name in names if not infos[name].is_input]
    extra = [name for name in outputs.names if name not in computed] if outputs is not None else []
    run = _runner(model, computed + extra, {**(outputs.infos if outputs is not None else {}), **infos}, settings)
    mask = settings.mask if settings.mask is not None and settings.mask.name is not None else None
    for batch in data.batches(planned.batch_size):
        values = run(batch)
        _hand_over(outputs, values, extra, planned.batch_size)
        values.update({name: batch[name] for name in names if infos[name].is_input})
        kept = mask.kept(batch[mask.name]) if mask is not None else None
        # largest first: the pool balances better; popped, so each activation dies with its task
        order = sorted(names, key=lambda name: -values[name].size)
        list(pool.map(partial(_accumulate_popped, stats, values, kept), order))
        if bar is not None:
            bar.update(data.feed_samples(batch))


def _hand_over(outputs: KeptOutputs | None, values: dict[str, np.ndarray], extra: list[str], batch_size: int) -> None:
    """Give `outputs` its values of this batch; those exposed for it alone (`extra`) leave `values`."""
    if outputs is None:
        return
    outputs.add(values, batch_size)
    for name in extra:
        del values[name]


def _runner(model: onnx.ModelProto, computed: list[str], infos: dict[str, TensorInfo],
            settings: RunSettings) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function from a batch to the `computed` tensors, running only their cone."""
    if not computed:
        return lambda batch: {}
    exposed = exposing_model(model, computed, {n: infos[n].elem_type for n in computed})
    # idle onnxruntime threads must not busy-wait: the accumulation workers run between its batches
    session = make_session(exposed, optimize=True, device=settings.device, threads=settings.threads, spinning=False)
    del exposed
    feeds = {i.name for i in session.get_inputs()}
    return lambda batch: dict(zip(computed, session.run(computed, {k: v for k, v in batch.items() if k in feeds}),
                                  strict=True))


def _accumulate_popped(stats: dict[str, TensorStats], values: dict[str, np.ndarray], mask: np.ndarray | None,
                       name: str) -> None:
    _accumulate(stats[name], values.pop(name), mask)


def _accumulate(stats: TensorStats, value: np.ndarray, mask: np.ndarray | None) -> None:
    if stats.masked and not mask_applies(value, stats.channel_axis, mask):
        log.info("tensor '%s' (shape %s) has no row per mask entry: all its rows count",
                 stats.tensor, list(value.shape))
        stats.masked = False
    for rows in row_blocks(value, stats.channel_axis, mask if stats.masked else None, chunk_rows(stats.channels),
                           stats.positions):
        stats.update(rows)

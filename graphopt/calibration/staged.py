"""Staged runs: a model evaluated a little further at each call, resuming from the tensors already computed.

Error-correcting reconstruction (graphopt.passes.snp.correct) asks, wave after wave, for tensors deeper and
deeper in two models: the original, which never changes, and the pruned model, whose layers are refitted
behind each wave. Running each wave's cone from the graph inputs costs about L²/2 layer evaluations for L
waves; resuming costs about L.

A `Stage` remembers, for one model, which tensors its earlier calls computed and, per calibration batch,
the values of the *frontier*: the computed tensors that some not yet computed node reads. A call for new
tensors runs only the nodes between the frontier and them (graphopt.calibration.capture's cone, stopped at
computed tensors, which become graph inputs), returns the tensors and moves the frontier on. Every frontier
tensor carries its cone fingerprint (capture.cone_fingerprints): when the model a call brings computes any
of them differently (a layer upstream of the frontier was rewritten), the stage starts again from the graph
inputs, so a resumed run always returns what a full run of that model would (up to onnxruntime's
floating-point reassociation across the cut).

Memory: the frontier stays in memory up to the stage's byte budget; batches beyond it are written to .npy files
in a temporary folder and read back memory-mapped (MiniLM's frontier over 1000 x 128 tokens outgrows the
512 MiB a stage gets from the default bound); a spilled tensor that stays on the frontier (a residual
stream across the waves of its block) keeps its file and is not written again, its pages released after
each call. A stage whose files would exceed SPILL_FACTOR times its budget drops its frontier and runs full
cones from then on (logged once), which is the cost it would have had anyway. Paired calibration
(graphopt.calibration.paired) plans its rounds within what the stages leave of its bound.
"""

from __future__ import annotations

import logging
import mmap
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx

from graphopt.calibration.capture import cone_fingerprints, node_reads, output_value, part_model, producer_index
from graphopt.calibration.session import make_session

log = logging.getLogger(__name__)

Runner = Callable[[int, Mapping[str, np.ndarray]], dict[str, np.ndarray]]

SPILL_FACTOR = 4  # frontier bytes on disk, at most, per byte of a stage's memory budget


def _cone(graph: onnx.GraphProto, names: list[str], computed: set[str]) -> set[int]:
    """Indices of the nodes `names` need, not crossing tensors in `computed`."""
    produced = producer_index(graph)
    kept: set[int] = set()
    pending = [produced[name] for name in names if name not in computed]
    while pending:
        index = pending.pop()
        if index in kept:
            continue
        kept.add(index)
        pending.extend(produced[read] for read in node_reads(graph.node[index])
                       if read in produced and read not in computed)
    return kept


def _computed_names(graph: onnx.GraphProto, names: list[str]) -> list[str]:
    """`names` without the graph inputs (a batch gives those)."""
    inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    return [name for name in names if name not in inputs]


def _frontier(graph: onnx.GraphProto, computed: set[str]) -> set[str]:
    """Computed node outputs that a node outside the computed part reads."""
    produced = producer_index(graph)
    done = {index for name, index in produced.items() if name in computed}
    return {read for index, node in enumerate(graph.node) if index not in done
            for read in node_reads(node) if read in computed and read in produced}


class Stage:
    """One model's computed tensors and frontier values across calls (see the module docstring)."""

    def __init__(self, memory_limit: int) -> None:
        self.memory_limit = memory_limit
        self.enabled = True
        self.resumed_calls = 0
        self._known: tuple[onnx.ModelProto, dict[str, str]] | None = None  # a model and its cone fingerprints
        self._reset()

    def know(self, model: onnx.ModelProto, prints: dict[str, str]) -> None:
        """The cone fingerprints of `model`, computed by the caller, so a call with this very (unchanged)
        model object need not hash its weights again."""
        self._known = (model, prints)

    def _fingerprints(self, model: onnx.ModelProto) -> dict[str, str]:
        if self._known is not None and self._known[0] is model:
            return self._known[1]
        return cone_fingerprints(model)

    def _reset(self) -> None:
        folder = getattr(self, "_folder", None)
        if folder is not None:
            folder.cleanup()
        self._computed: set[str] = set()
        self._prints: dict[str, str] = {}                     # frontier tensor -> cone fingerprint
        self._types: dict[str, int] = {}                      # frontier tensor -> elem_type
        self._values: dict[int, dict[str, np.ndarray]] = {}   # batch index -> frontier values
        self._batch_size: int | None = None
        self._overflow = False
        self._folder: tempfile.TemporaryDirectory | None = None  # spilled frontier batches
        self._files: dict[int, dict[str, tuple[Path, int]]] = {}  # batch index -> tensor -> its spilled file, bytes
        self._spilled = 0                          # bytes in those files
        self._written = 0                          # files written, for unique names

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.info("staged calibration runs: %s; running full cones from now on", why)
        self.enabled = False
        self._reset()

    def _resumable(self, wanted: list[str], batch_size: int, prints: dict[str, str]) -> bool:
        """Whether the kept frontier serves the model whose cone fingerprints are `prints`: the same batches,
        every frontier tensor computed as that model computes it, and every wanted tensor that an earlier call
        computed still at hand."""
        return (self._batch_size == batch_size and all(prints.get(n) == p for n, p in self._prints.items())
                and all(name in self._prints for name in wanted if name in self._computed))

    def runner(self, model: onnx.ModelProto, names: list[str], batch_size: int, device: str,
               threads: int) -> Runner:
        """A function from (batch index, batch) to the values of `names`, resuming from the frontier; the
        batches must come in the same order and sizes at every call."""
        part, outputs, frontier = self._part(model, names, batch_size)
        session = (make_session(part, optimize=True, device=device, threads=threads, spinning=False)
                   if outputs else None)
        feeds = {i.name for i in session.get_inputs()} if session is not None else set()

        def run(index: int, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            available = {**batch, **self._values.get(index, {})}
            if session is not None:
                available.update(zip(outputs, session.run(outputs, {k: v for k, v in available.items() if k in feeds}),
                                     strict=True))
            if self.enabled:
                self._keep(index, frontier, available)
            return {name: available[name] for name in names}

        return run

    def _part(self, model: onnx.ModelProto, names: list[str], batch_size: int
              ) -> tuple[onnx.ModelProto, list[str], set[str]]:
        """The part of `model` still to run for `names` (from the kept frontier where it serves, else from
        the graph inputs), its outputs, and the frontier it leaves; moves the stage on to it."""
        graph = model.graph
        wanted = _computed_names(graph, names)
        if self._overflow:
            self._disable(f"the frontier held more than its budget of {self.memory_limit} bytes")
        prints = self._fingerprints(model) if self.enabled else {}
        if self._computed and not self._resumable(wanted, batch_size, prints):
            self._reset()
        computed, starts = set(self._computed), sorted(self._types.items())
        nodes = _cone(graph, wanted, computed)
        reached = computed | {out for index in nodes for out in graph.node[index].output if out}
        frontier = _frontier(graph, reached) if self.enabled else set()
        outputs = list(dict.fromkeys([*(n for n in wanted if n not in computed), *sorted(frontier - computed)]))
        self.resumed_calls += bool(computed)
        if self.enabled:
            self._computed, self._batch_size = reached, batch_size
            self._prints = {name: prints[name] for name in frontier}
        given = [onnx.helper.make_tensor_value_info(name, elem_type, None) for name, elem_type in starts]
        return part_model(model, nodes, [output_value(name, 0) for name in outputs], given), outputs, frontier

    def _keep(self, index: int, frontier: set[str], values: Mapping[str, np.ndarray]) -> None:
        """Keep batch `index`'s new frontier, in memory within the budget, else on disk; past the disk bound,
        stop keeping (the batches still to come in this call keep their old frontier to resume from) and run
        full cones from the next call."""
        if self._overflow:
            return
        self._types = {name: self._types.get(name) or onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype)
                       for name in frontier}
        kept = {name: values[name] for name in frontier}
        reused = _still_spilled(self._values.pop(index, {}), kept)
        self._drop_files(index, keep=set(reused))
        for value in reused.values():  # read by this call: its pages leave the process's memory until the next one
            _release(value)
        fresh = {name: value for name, value in kept.items() if name not in reused}
        held = sum(v.nbytes for batch in self._values.values() for v in batch.values() if not _mapped(v))
        if held + sum(v.nbytes for v in fresh.values()) > self.memory_limit:
            fresh = self._spill(index, fresh)
        self._values[index] = {**reused, **fresh}
        self._overflow = self._spilled > SPILL_FACTOR * self.memory_limit

    def _spill(self, index: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="graphopt-frontier-", ignore_cleanup_errors=True)
            log.info("staged calibration runs: the frontier exceeds %d bytes; keeping it in %s", self.memory_limit,
                     self._folder.name)
        mapped = {}
        for name, value in values.items():
            path = Path(self._folder.name) / f"{self._written}.npy"
            self._written += 1
            np.save(path, np.ascontiguousarray(value))
            self._files.setdefault(index, {})[name] = (path, value.nbytes)
            self._spilled += value.nbytes
            mapped[name] = np.load(path, mmap_mode="r")
        return mapped

    def _drop_files(self, index: int, keep: set[str] = frozenset()) -> None:
        """Remove batch `index`'s spilled files but those of the tensors in `keep`."""
        kept = {}
        for name, (path, size) in self._files.pop(index, {}).items():
            if name in keep:
                kept[name] = (path, size)
                continue
            self._spilled -= size
            try:
                path.unlink()
            except OSError:  # still mapped where the system forbids removing it: the folder's cleanup takes it
                pass
        if kept:
            self._files[index] = kept


def _mapped(value: np.ndarray) -> bool:
    return isinstance(value, np.memmap)


def _still_spilled(previous: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of the new frontier `kept` that are the very mappings of the previous frontier's spilled
    files (a tensor that stayed on the frontier): they keep their files."""
    return {name: value for name, value in kept.items()
            if _mapped(value) and previous.get(name) is value}


def _release(value: np.ndarray) -> None:
    """Drop the resident pages of a spilled tensor's mapping (madvise DONTNEED; the next read maps them again
    from the file), so that a tensor kept on the frontier across calls does not stay counted in memory."""
    if isinstance(value.base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        value.base.madvise(mmap.MADV_DONTNEED)


class Stages:
    """A `Stage` for the reference model and one for the model being rewritten, as paired calibration uses them;
    their frontiers hold at most `memory_limit` bytes together."""

    def __init__(self, memory_limit: int) -> None:
        self.memory_limit = memory_limit
        self.reference = Stage(memory_limit // 2)
        self.model = Stage(memory_limit // 2)

"""Latency lookup tables (after HALP): each layer's measured time over a grid of channel counts, cached.

A layer (graphopt.calibration.layer_models.LayerSpec) is timed alone in onnxruntime with full graph
optimisation, the run's threads and provider, at the timed batch: after warm-up, the median over at
least `MIN_RUNS` runs and `MIN_SECONDS` of running. `LayerTable` predicts a layer's time at any
(input, output) channel count by bilinear interpolation on its grid, after taking the monotone envelope
t(i, o) <- max over grid points (i', o') <= (i, o) of the measured times: fewer channels never predict
a slower layer, so a budget that removes channels one at a time sees a cost that never rises (the
staircase of kernel tiling lies between grid points, which is where rounded channel counts do not go).

Cache: one JSON file per layer signature and runtime under `cache_dir()` (default
$XDG_CACHE_HOME/graphopt/latency, else ~/.cache/graphopt/latency). The runtime key holds the provider,
the CPU model (/proc/cpuinfo), the thread count and the onnxruntime version; the file name is a hash
of signature and runtime, and a file whose stored key differs from the one asked is never read, so a
changed key always re-measures. A file holds the points measured so far; new points are added and the
file rewritten atomically (graphopt.ir.files.write_atomic).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from graphopt.calibration.layer_models import LayerSpec
from graphopt.calibration.session import failure_text, make_session, providers, runtime
from graphopt.errors import GraphoptError
from graphopt.ir.files import write_atomic
from graphopt.ir.shapes import input_specs
from graphopt.ops.build import cache_dir as graphopt_cache_dir

log = logging.getLogger(__name__)

FORMAT = 1  # version of the cache files' layout
MIN_RUNS, MIN_SECONDS, MAX_RUNS, WARMUP = 5, 0.05, 50, 2
MIN_ROUNDS = 6  # paired_latency's fewest interleaved rounds

Point = tuple[int, int]
Timer = Callable[[LayerSpec, int, int], float]


def cache_dir() -> Path:
    return graphopt_cache_dir() / "latency"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    line = next((line for line in text.splitlines() if line.startswith(("model name", "Hardware"))), "")
    return line.partition(":")[2].strip() or platform.machine()


@dataclass(frozen=True)
class Runtime:
    """Where timings are valid: what every cache entry is keyed by besides the layer."""

    provider: str
    cpu: str
    threads: str   # "4", or "default:N" for onnxruntime's default on N logical CPUs
    onnxruntime: str
    device: str = "cpu"

    @classmethod
    def current(cls, device: str = "cpu", threads: int = 0) -> Runtime:
        threads_key = str(threads) if threads else f"default:{os.cpu_count()}"
        return cls(providers(device)[0], cpu_model(), threads_key, runtime().__version__, device)

    @property
    def threads_count(self) -> int:
        return 0 if self.threads.startswith("default") else int(self.threads)


def time_runs(run: Callable[[], Any], min_runs: int = MIN_RUNS, min_seconds: float = MIN_SECONDS,
              max_runs: int = MAX_RUNS, warmup: int = WARMUP) -> float:
    """Median milliseconds of `run()` after `warmup` calls, over at least `min_runs` runs and `min_seconds`."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - started < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles (linear interpolation between order statistics, so that
    p10 <= median <= p90 for any number of samples)."""
    p10, median, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def _timed(session: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return (time.perf_counter() - start) * 1e3 / runs


def interleaved(sessions: list[Any], feeds: list[dict[str, np.ndarray]], rounds: int, runs: int, warmup: int,
                progress: Callable[[range], Any] = lambda r: r) -> dict[str, float]:
    """Two sessions timed in one run, interleaved: each round times `runs` inferences of each, alternating
    which goes first. `speedup` is the median over rounds of the first's time / the second's (> 1: the
    second is faster), with the 10th and 90th percentiles of the per-round ratios; a ratio from the same
    rounds cancels most of the drift a noisy machine adds to two separate timings."""
    for session, feed in zip(sessions, feeds):
        _timed(session, feed, warmup)
    times: list[list[float]] = [[], []]
    for round_index in progress(range(rounds)):
        for which in ((0, 1) if round_index % 2 == 0 else (1, 0)):
            times[which].append(_timed(sessions[which], feeds[which], runs))
    ratios = [ref / cand for ref, cand in zip(*times) if cand > 0]
    first, second, ratio = spread(times[0]), spread(times[1]), spread(ratios)
    return {"reference_ms": first["median"], "candidate_ms": second["median"], "speedup": ratio["median"],
            "speedup_p10": ratio["p10"], "speedup_p90": ratio["p90"]}


def _runner(session: Any, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
    """One inference of `session` on `feed`; onnxruntime's failure to run it becomes a GraphoptError."""

    def run() -> Any:
        try:
            return session.run(None, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise GraphoptError(f"onnxruntime cannot run the model: {failure_text(exc)}") from exc

    return run


def layer_timer(where: Runtime) -> Timer:
    """Times one layer at (cin, cout) on `where`'s provider and threads."""

    def measure(spec: LayerSpec, cin: int, cout: int) -> float:
        model, feed = spec.build(cin, cout)
        session = make_session(model, optimize=True, device=where.device, threads=where.threads_count,
                               spinning=False)
        return time_runs(_runner(session, feed))

    return measure


def _seeded_feed(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for spec in input_specs(model):
        shape = shapes[spec.name]
        feed[spec.name] = (rng.standard_normal(shape).astype(spec.dtype) if spec.dtype.kind == "f"
                           else rng.integers(0, 2, size=shape).astype(spec.dtype))
    return feed


def model_latency(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], where: Runtime) -> float:
    """Median milliseconds of `model` on seeded inputs of `shapes` (full optimisation, `where`'s threads)."""
    feed = _seeded_feed(model, shapes)
    session = make_session(model, optimize=True, device=where.device, threads=where.threads_count, spinning=False)
    return time_runs(_runner(session, feed), min_runs=7, min_seconds=1.0, max_runs=30, warmup=3)


def paired_latency(reference: onnx.ModelProto, candidate: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                   where: Runtime, rounds: int = 12, round_ms: float = 20.0,
                   max_seconds: float = 4.0) -> dict[str, float]:
    """Both models on the same seeded inputs, timed in one run (`interleaved`: `speedup` > 1 when the candidate
    is faster, with its p10 and p90 over rounds), each round about `round_ms` of the reference; a model whose
    rounds would take more than `max_seconds` together runs fewer of them, at least MIN_ROUNDS (a BERT-base
    encoder at batch 8 takes 0.6 s a run: 12 rounds of both cost 15 s, where its timings vary little)."""
    sessions = [make_session(m, optimize=True, device=where.device, threads=where.threads_count, spinning=False)
                for m in (reference, candidate)]
    feeds = [_seeded_feed(m, shapes) for m in (reference, candidate)]
    single = time_runs(_runner(sessions[0], feeds[0]), min_runs=3, min_seconds=0.0, max_runs=3, warmup=1)
    _runner(sessions[1], feeds[1])()  # a candidate onnxruntime cannot run fails here, as a GraphoptError
    runs = min(50, max(1, round(round_ms / max(single, 1e-3))))
    rounds = max(min(rounds, MIN_ROUNDS), min(rounds, int(max_seconds * 1000.0 / (2.0 * runs * max(single, 1e-3)))))
    return interleaved(sessions, feeds, rounds, runs, warmup=2)


@dataclass
class LatencyCache:
    """Layer timings on disk, keyed by layer signature and `Runtime`; counts what it served and measured."""

    where: Runtime
    folder: Path = field(default_factory=cache_dir)
    timer: Timer | None = None
    entries_hit: int = 0       # layer signatures served entirely from disk
    entries_built: int = 0     # layer signatures that needed at least one new timing
    points_measured: int = 0
    build_seconds: float = 0.0

    def key(self, spec: LayerSpec) -> dict[str, Any]:
        return {"format": FORMAT, "layer": spec.signature(), "runtime": asdict(self.where)}

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return Path(self.folder) / f"{digest}.json"

    def _stored(self, path: Path, key: dict[str, Any]) -> dict[str, float]:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(stored, dict) or stored.get("key") != key:  # never reuse another key's timings
            return {}
        return {str(name): float(value) for name, value in stored.get("points", {}).items()}

    def points(self, spec: LayerSpec, wanted: list[Point]) -> dict[Point, float]:
        """Milliseconds of `spec` at each (cin, cout) of `wanted`: from disk, else measured and stored."""
        key = self.key(spec)
        path = self.path(key)
        stored = self._stored(path, key)
        missing = [point for point in dict.fromkeys(wanted) if f"{point[0]},{point[1]}" not in stored]
        if not missing:
            self.entries_hit += 1
        else:
            started = time.perf_counter()
            timer = self.timer or layer_timer(self.where)
            for cin, cout in missing:
                stored[f"{cin},{cout}"] = float(timer(spec, cin, cout))
            self.points_measured += len(missing)
            self.entries_built += 1
            self._write(path, key, stored)
            self.build_seconds += time.perf_counter() - started
        return {point: stored[f"{point[0]},{point[1]}"] for point in wanted}

    def _write(self, path: Path, key: dict[str, Any], stored: dict[str, float]) -> None:
        text = json.dumps({"key": key, "points": stored}, sort_keys=True).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda stream: stream.write(text))
        except (OSError, GraphoptError) as exc:  # an unwritable cache costs a rebuild next time, not this run
            log.warning("latency table not cached in %s: %s", path.parent, exc)


class LayerTable:
    """A layer's time over a grid of (input, output) channel counts; `depthwise`: over the input count
    alone (it is the output count too)."""

    def __init__(self, inputs: list[int], outputs: list[int], measured: dict[Point, float], depthwise: bool) -> None:
        self.inputs, self.outputs = sorted(inputs), [0] if depthwise else sorted(outputs)
        grid = np.array([[measured[(i, i if depthwise else o)] for o in self.outputs] for i in self.inputs])
        grid = np.maximum.accumulate(np.maximum.accumulate(grid, axis=0), axis=1)  # the monotone envelope
        self.grid = grid.tolist()

    @staticmethod
    def _bracket(axis: list[int], value: float) -> tuple[int, int, float]:
        if value <= axis[0] or len(axis) == 1:
            return 0, 0, 0.0
        if value >= axis[-1]:
            return len(axis) - 1, len(axis) - 1, 0.0
        high = bisect.bisect_left(axis, value)
        low = high - 1
        return low, high, (value - axis[low]) / (axis[high] - axis[low])

    def __call__(self, cin: float, cout: float) -> float:
        i0, i1, a = self._bracket(self.inputs, cin)
        o0, o1, b = self._bracket(self.outputs, cout)
        grid = self.grid
        return ((1 - a) * ((1 - b) * grid[i0][o0] + b * grid[i0][o1])
                + a * ((1 - b) * grid[i1][o0] + b * grid[i1][o1]))


def build_table(cache: LatencyCache, spec: LayerSpec, inputs: list[int], outputs: list[int]) -> LayerTable:
    """The table of `spec` over the grid `inputs` x `outputs` (depthwise: over `inputs` alone)."""
    wanted = [(i, i) for i in inputs] if spec.depthwise else [(i, o) for i in inputs for o in outputs]
    return LayerTable(inputs, outputs, cache.points(spec, wanted), spec.depthwise)

"""Ray as calibration's distributed engine: connecting, sharding the data, running shard tasks, failures.

`Cluster` is opened by `open_cluster(workers, address)` for one `calibrate` or `optimize` run:
- `workers` alone: a local Ray instance with `workers` CPUs, started on first use and shut down when
  the run ends;
- `address` ("host:port", "ray://host:port" or "auto"): an existing cluster, connected to on first use
  and disconnected from when the run ends (the cluster itself keeps running); `workers` then sets the
  number of shards, by default the cluster's CPU count;
- a Ray runtime the calling process already initialised (library use, tests) is used as it is and
  left running.
Ray is imported only here and only when a cluster is opened; without it, opening one is a one-line
`ClusterError` saying to install graphopt[ray].

Sharding (`shards`): a data set is cut into at most `shard_count` contiguous shards of whole batches
(arrays: runs of `batch` samples, or of the samples per run the model fixes; streams: whole feeds), so
every shard runs exactly the batches a single process runs, and each shard knows the global index of
its first batch. A shard's data go to Ray's object store once per data set and are reused by every
later call (sequential calibration measures each stage on the same shards).

Failures (`map`): shard tasks are retried by Ray `retries` times when their worker dies; a shard whose
task still fails, or whose result is lost, stops the run with a `ClusterError` naming the shard (its
index and sample range): results are never merged with a shard missing. A `GraphoptError` raised
inside a task (bad input found there) is raised as it is.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.errors import GraphoptError

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 3
CONNECT_TIMEOUT = 5.0  # seconds to wait for the cluster's port before calling the address unreachable
_ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


class ClusterError(GraphoptError):
    """Ray is missing, the cluster cannot be reached, or a shard of the calibration data was lost."""


@dataclass(frozen=True)
class Shard:
    """Contiguous part `index` of `count` of a data set: samples (or feeds) [start, stop), whose first
    batch is batch `first_batch` of the whole data set."""

    index: int
    count: int
    start: int
    stop: int
    first_batch: int
    unit: str = "samples"

    def describe(self) -> str:
        return f"shard {self.index + 1} of {self.count} ({self.unit} {self.start}-{self.stop - 1})"


def import_ray() -> Any:
    """The ray module, or a one-line `ClusterError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--workers and --ray-address run calibration on Ray, which is not installed: "
                           "pip install 'graphopt[ray]'") from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse, in one line, an address that is malformed or where nothing listens (before Ray would
    wait on it); "auto" is left to Ray."""
    if address == "auto":
        return
    match = _ADDRESS.fullmatch(address.strip())
    if match is None or not 0 < int(match.group("port")) < 65536:
        raise ClusterError(f"--ray-address expects host:port, ray://host:port or auto, got '{address}'")
    host = match.group("host").strip("[]")
    try:
        with socket.create_connection((host, int(match.group("port"))), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at '{address}': {exc.strerror or exc}") from None


@contextlib.contextmanager
def open_cluster(workers: int | None, address: str | None,
                 retries: int = DEFAULT_RETRIES) -> Iterator[Cluster | None]:
    """A `Cluster` for the run (None when neither option is given), closed when the run ends."""
    if workers is None and address is None:
        yield None
        return
    cluster = Cluster(workers, address, retries)
    try:
        yield cluster
    finally:
        cluster.close()


class Cluster:
    """Shard tasks on Ray; see the module docstring."""

    def __init__(self, workers: int | None, address: str | None, retries: int = DEFAULT_RETRIES) -> None:
        if workers is not None and workers < 1:
            raise ClusterError(f"--workers must be at least 1, got {workers}")
        self.ray = import_ray()
        if address is not None:
            check_address(address)
        self.workers, self.address, self.retries = workers, address, retries
        self._connected = False  # whether this object initialised Ray (and so shuts its driver down)
        self._shards: dict[tuple[int, int], tuple[Dataset, list[tuple[Shard, Any]]]] = {}
        self._remote: dict[Callable[..., Any], Any] = {}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        settings = {"logging_level": logging.ERROR, "log_to_driver": False}
        try:
            if self.address is not None:
                ray.init(address=self.address, **settings)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, **settings)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = f"the Ray cluster at '{self.address}'" if self.address else "a local Ray instance"
            reason = _first_line(exc.__cause__ or exc)  # Ray wraps the reason (e.g. a missing auth token)
            raise ClusterError(f"cannot start or reach {where}: {reason}") from exc
        self._connected = True
        log.info("calibration on Ray: %s, %d shards", self.address or "local instance", self.shard_count)

    @property
    def shard_count(self) -> int:
        if self.workers is not None:
            return self.workers
        self._connect()
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        """Drop the shards and, when this object connected, shut its Ray driver down (a local instance
        stops; a cluster given by address keeps running)."""
        self._shards.clear()
        self._remote.clear()
        if self._connected and self.ray.is_initialized():
            self.ray.shutdown()
        self._connected = False

    def shards(self, data: Dataset, batch: int) -> list[tuple[Shard, Any]]:
        """The shards of `data` for runs of `batch` samples, each with its object-store reference."""
        key = (id(data), batch)
        if key not in self._shards:
            self._connect()
            parts = split_shards(data, batch, self.shard_count)
            self._shards[key] = (data, [(shard, self.ray.put(part)) for shard, part in parts])
        return self._shards[key][1]

    def map(self, task: Callable[..., Any], data: Dataset, batch: int, *shared: Any) -> list[tuple[Shard, Any]]:
        """`task(shard_data, shard, *shared)` on every shard of `data`, results in shard order. Each of
        `shared` goes to the object store once; see the module docstring for failures."""
        shards = self.shards(data, batch)
        remote = self._remote.get(task)
        if remote is None:
            remote = self._remote[task] = self.ray.remote(task).options(max_retries=self.retries, num_cpus=1)
        shared_refs = [self.ray.put(value) for value in shared]
        pending = [remote.remote(ref, shard, *shared_refs) for shard, ref in shards]
        results = []
        try:
            for (shard, _), ref in zip(shards, pending):
                results.append((shard, self._result(shard, ref)))
        except BaseException:
            for ref in pending:
                with contextlib.suppress(Exception):  # already finished or gone: nothing to stop
                    self.ray.cancel(ref, force=True)
            raise
        return results

    def _result(self, shard: Shard, ref: Any) -> Any:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, GraphoptError):
                raise cause from None
            raise ClusterError(f"calibration {shard.describe()} failed: {_first_line(cause or exc)}") from exc
        except exceptions.RayError as exc:
            raise ClusterError(f"calibration {shard.describe()} was lost after {self.retries} retries "
                               f"({type(exc).__name__}: {_first_line(exc)}); no statistics were merged "
                               "without it") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def split_shards(data: Dataset, batch: int, count: int) -> list[tuple[Shard, Dataset]]:
    """`data` cut into at most `count` contiguous shards of whole runs (see the module docstring);
    each shard's Dataset carries the model's interface only, not its weights."""
    interface = interface_model(data.model)
    if data.arrays is not None:
        total = data.num_samples or 0
        size = data.unit or batch
        runs = -(-total // size)
        parts = []
        for index, (first, last) in enumerate(_even(runs, min(count, runs))):
            start, stop = first * size, min(last * size, total)
            arrays = {k: np.ascontiguousarray(data.layouts[k].take(v, slice(start, stop)))
                      if data.layouts[k].sample_axis is not None else v for k, v in data.arrays.items()}
            parts.append((start, stop, first, Dataset(arrays, None, interface, data.layouts, set(), data.unit)))
        return [(Shard(index, len(parts), start, stop, first), part)
                for index, (start, stop, first, part) in enumerate(parts)]
    feeds = list(data.feeds or ())
    shards, first = [], 0
    ranges = _even(len(feeds), min(count, len(feeds)))
    for index, (start, stop) in enumerate(ranges):
        part = Dataset(None, feeds[start:stop], interface)
        shards.append((Shard(index, len(ranges), start, stop, first, "feeds"), part))
        first += sum(1 for _ in Dataset(None, feeds[start:stop], data.model).batches(batch))
    return shards


def _even(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` contiguous ranges covering range(total), sizes differing by one at most."""
    bounds = [total * part // max(parts, 1) for part in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def interface_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's opsets, real inputs and outputs only: what a data set needs to batch and validate feeds."""
    weights = {t.name for t in model.graph.initializer}
    interface = onnx.ModelProto(ir_version=model.ir_version)
    interface.opset_import.extend(model.opset_import)
    interface.graph.name = model.graph.name
    interface.graph.input.extend(v for v in model.graph.input if v.name not in weights)
    interface.graph.output.extend(model.graph.output)
    return interface

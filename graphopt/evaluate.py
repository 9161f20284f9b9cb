"""Fidelity and latency of models in onnxruntime.

`verify` runs a reference and a candidate with graph optimisations disabled on the same batches and
compares every output they share (the first is required, and its measures head the report): max |a - b|,
relative L2 error ||a - b|| / ||a|| and cosine similarity of the flattened outputs, always; then what the
output's kind (graphopt.calibration.fidelity) makes meaningful: top-1 agreement for class scores [N, C],
position and greedy-CTC sequence agreement for sequences [N, T, C], nothing more for other outputs (their
`top1_agreement` is None). Sums accumulate in float64 (counts as integers) across batches. A user's
metric (graphopt.calibration.metric) is averaged over the batches, weighted by their samples.
Given the reference's outputs already computed on the same batches (`reference_outputs`, such as those
calibration kept: graphopt.calibration.reference, from an optimised session), only the candidate runs,
at full graph optimisation so that both sides ran alike.
`bench` times batch inference with full graph optimisation (as deployed), after warm-up, and reports
the median and percentiles of repeated runs; `compare_latency` times two models side by side in
interleaved rounds and reports the speedup as a per-round ratio with its spread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from tqdm.auto import tqdm

from graphopt.calibration.data import Dataset, DataSource, fixed_batch, load_data
from graphopt.calibration.fidelity import OutputKind, compare, output_kinds
from graphopt.calibration.metric import Metric, MetricMean, as_metric
from graphopt.calibration.latency import interleaved, spread as latency_spread
from graphopt.calibration.session import make_session, run_failure
from graphopt.errors import CandidateLoadError, DataError, ModelLoadError, OptionError
from graphopt.ir.shapes import batch_axes, input_specs, resolve_input_shapes


def input_names(model: onnx.ModelProto) -> list[str]:
    return [spec.name for spec in input_specs(model)]


@dataclass
class _Agreement:
    """Running sums for one output pair of kind `kind`."""

    kind: OutputKind
    blank: int = 0
    max_abs: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    dot: float = 0.0
    rows_same: int = 0
    rows: int = 0
    sequences_same: int = 0
    sequences: int = 0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        a, b = ref.astype(np.float64), cand.astype(np.float64)
        diff = a - b
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)
        self.diff_sq += float(np.sum(diff * diff))
        self.ref_sq += float(np.sum(a * a))
        self.cand_sq += float(np.sum(b * b))
        self.dot += float(np.sum(a * b))
        if self.kind.kind != "values":
            counts = compare(ref, cand, self.kind, self.blank)
            self.rows_same += int(counts.same.sum())
            self.rows += int(counts.rows.sum())
            if counts.sequence_same is not None:
                self.sequences_same += int(counts.sequence_same.sum())
                self.sequences += counts.sequence_same.size

    def summary(self) -> dict[str, Any]:
        norm = np.sqrt(self.ref_sq * self.cand_sq)
        agreement = self.rows_same / self.rows if self.rows else None
        sequence = self.kind.kind == "sequence"
        summary: dict[str, Any] = {
            "max_abs": self.max_abs,
            "rel_l2": float(np.sqrt(self.diff_sq / self.ref_sq)) if self.ref_sq > 0 else float(np.sqrt(self.diff_sq)),
            "cosine": float(self.dot / norm) if norm > 0 else (1.0 if self.diff_sq == 0 else 0.0),
            "top1_agreement": agreement if self.kind.kind == "classes" else None,
            "kind": self.kind.kind,
            "position_agreement": agreement if sequence else None,
            "sequence_agreement": self.sequences_same / self.sequences if sequence and self.sequences else None,
        }
        if sequence:
            summary["ctc_blank"] = self.blank
        return summary


@dataclass
class VerifyReport:
    first: dict[str, Any]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 0
    metric: dict[str, float] | None = None
    metric_name: str | None = None
    batch_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        found = {**self.first, "samples": self.samples, "outputs": self.outputs}
        if self.batch_size is not None:
            found["batch_size"] = self.batch_size
        if self.metric is not None:
            found.update({"metric": self.metric, "metric_name": self.metric_name})
        return found


def verify(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: DataSource | Dataset, *,
           batch_size: int = 32, progress: bool = False, metric: Metric | Callable[..., Any] | str | None = None,
           ctc_blank: int = 0, device: str = "cpu",
           reference_outputs: list[dict[str, np.ndarray]] | None = None) -> VerifyReport:
    """The candidate's outputs against the reference's on `data` (module docstring); `metric` (a callable,
    graphopt.calibration.metric) adds its averaged values; `ctc_blank` is the blank label of sequences.
    Both models run on `device` ("cuda": onnxruntime's CUDA provider) with graph optimisations disabled;
    with `reference_outputs` (every reference output, one dict per feed of `data.batches(batch_size)`)
    only the candidate runs, at full graph optimisation."""
    user_metric = as_metric(metric)
    dataset = load_data(data, reference)
    try:
        cand_session = make_session(candidate, device=device, optimize=reference_outputs is not None)
    except ModelLoadError as exc:
        raise CandidateLoadError(f"candidate: {exc}") from exc
    ref_names, reference_run = _reference_outputs(reference, reference_outputs, device)
    shared = _shared_outputs(ref_names, cand_session)
    cand_inputs = {i.name for i in cand_session.get_inputs()}
    agreements: dict[str, _Agreement] = {}
    mean = MetricMean(user_metric) if user_metric is not None else None
    samples = 0
    for index, feed in enumerate(tqdm(dataset.batches(batch_size), desc="verify", unit="batch", disable=not progress,
                                      total=_batch_count(dataset, batch_size), leave=False)):
        ref_out = reference_run(index, shared, feed)
        cand_out = cand_session.run(shared, {k: v for k, v in feed.items() if k in cand_inputs})
        count = dataset.feed_samples(feed)
        if not agreements:
            kinds = output_kinds(reference, {name: value.shape for name, value in zip(shared, ref_out)}, count)
            agreements = {name: _Agreement(kinds[name], ctc_blank) for name in shared}
        _add_batch(agreements, ref_out, cand_out)
        if mean is not None:
            mean.add(dict(zip(shared, ref_out)), dict(zip(shared, cand_out)), feed, count)
        samples += count
    if not agreements:
        raise DataError("no data to verify on: the data holds no samples")
    _check_covered(reference_outputs, index + 1)
    outputs = {name: agreement.summary() for name, agreement in agreements.items()}
    return VerifyReport(outputs[shared[0]], outputs, samples, mean.summary() if mean is not None else None,
                        user_metric.name if user_metric is not None else None)


def _reference_outputs(reference: onnx.ModelProto, kept: list[dict[str, np.ndarray]] | None,
                       device: str) -> tuple[list[str], Callable[[int, list[str], dict[str, np.ndarray]], list[np.ndarray]]]:
    """The reference's output names, and a function from (feed index, names, feed) to those outputs: an
    unoptimised session of the reference, or the given outputs of that feed."""
    if kept is None:
        session = make_session(reference, device=device)
        return [o.name for o in session.get_outputs()], lambda index, names, feed: session.run(names, feed)

    def given(index: int, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if index >= len(kept):
            raise DataError(f"the reference outputs given cover {len(kept)} batches; the data has more")
        return [kept[index][name] for name in names]

    return [o.name for o in reference.graph.output], given


def _check_covered(kept: list[dict[str, np.ndarray]] | None, batches: int) -> None:
    if kept is not None and len(kept) != batches:
        raise DataError(f"the reference outputs given cover {len(kept)} batches; the data has {batches}")


def _shared_outputs(ref_names: list[str], cand_session: Any) -> list[str]:
    """The reference's outputs that the candidate also has, in the reference's order; the first is required."""
    cand_names = {o.name for o in cand_session.get_outputs()}
    if ref_names[0] not in cand_names:
        raise DataError(f"candidate has no output '{ref_names[0]}' (it has {sorted(cand_names)})")
    return [n for n in ref_names if n in cand_names]


def _add_batch(agreements: dict[str, _Agreement], ref_out: list[np.ndarray], cand_out: list[np.ndarray]) -> None:
    """One batch of the shared outputs (in `agreements`' order) into their running sums."""
    for (name, agreement), ref_value, cand_value in zip(agreements.items(), ref_out, cand_out):
        if ref_value.shape != cand_value.shape:
            raise DataError(f"output '{name}' shape differs: {ref_value.shape} vs {cand_value.shape}")
        agreement.add(ref_value, cand_value)


def _batch_count(dataset: Dataset, batch_size: int) -> int | None:
    total = dataset.num_samples
    return None if total is None else -(-total // (dataset.fixed_batch or batch_size))


def random_feed(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats, small non-negative integers, random booleans.

    `batch` replaces the dynamic batch axis of each input (graphopt.ir.shapes.batch_axis, wherever it sits);
    a fixed batch (or a scalar) stays.
    """
    rng = np.random.default_rng(seed)
    axes = batch_axes(model)
    feed = {}
    for spec in input_specs(model):
        shape = shapes[spec.name]
        axis = axes[spec.name]
        if batch is not None and axis is not None:
            shape = (*shape[:axis], batch, *shape[axis + 1:])
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = rng.random(shape) < 0.5
        else:
            feed[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return feed


def bench_feed(model: onnx.ModelProto, data: DataSource | None, batch: int,
               shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """One batch of `batch` samples to time on: the first of `data`, else seeded random inputs."""
    if data is not None:
        dataset = load_data(data, model)
        feed = next(dataset.batches(batch))
        if next(iter(feed.values())).shape[0] < batch:
            raise DataError(f"data has fewer than --batch {batch} samples")
        return feed
    fixed = fixed_batch(model)
    if fixed is not None and fixed != batch:
        raise OptionError(f"the model's batch axis is fixed to {fixed}; --batch {batch} cannot apply")
    return random_feed(model, shapes or resolve_input_shapes(model), batch=batch)


def runs_at(session: Any, feed: dict[str, np.ndarray], batch: int) -> None:
    """One inference before timing; a model that fails at this batch (one that runs on one sample only,
    graphopt.batching) is the user's to see, in one line naming the node."""
    failed = run_failure(session, feed)
    if failed is not None:
        raise DataError(f"the model fails in onnxruntime at batch {batch}: {failed}")


def bench(model: onnx.ModelProto, *, data: DataSource | None = None, batch: int = 1, repeat: int = 50,
          warmup: int = 5, threads: int = 0, device: str = "cpu", shapes: dict[str, tuple[int, ...]] | None = None,
          progress: bool = False) -> dict[str, Any]:
    feed = bench_feed(model, data, batch, shapes)
    session = make_session(model, optimize=True, device=device, threads=threads)
    runs_at(session, feed, batch)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in tqdm(range(repeat), desc="bench", unit="run", disable=not progress, leave=False):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    spread = latency_spread(times)
    return {
        "median_ms": spread["median"],
        "p10_ms": spread["p10"],
        "p90_ms": spread["p90"],
        "batch": batch,
        "repeat": repeat,
        "samples_per_s": batch * 1e3 / spread["median"] if spread["median"] > 0 else None,
        "providers": session.get_providers(),
    }


def compare_latency(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, data: DataSource | None = None,
                    batch: int = 1, rounds: int = 30, runs: int = 3, warmup: int = 3, threads: int = 0,
                    device: str = "cpu", shapes: dict[str, tuple[int, ...]] | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Both models timed in one run, interleaved: each round times `runs` inferences of each, alternating
    which goes first, on the same batch and with the same threads (full graph optimisation, as deployed).

    `speedup` is the median over rounds of reference time / candidate time (> 1: the candidate is faster),
    with the 10th and 90th percentiles of the per-round ratios: a ratio from the same rounds cancels most of
    the drift a noisy machine adds to two separate timings. Idle threads do not spin, so neither session
    takes CPU from the other."""
    feed = bench_feed(reference, data, batch, shapes)
    cand_inputs = set(input_names(candidate))
    sessions = [make_session(model, optimize=True, device=device, threads=threads, spinning=False)
                for model in (reference, candidate)]
    feeds = [feed, {name: value for name, value in feed.items() if name in cand_inputs}]
    for session, one in zip(sessions, feeds):
        runs_at(session, one, batch)
    timing = interleaved(sessions, feeds, rounds, runs, warmup, lambda steps: tqdm(
        steps, desc=f"latency batch {batch}", unit="round", disable=not progress, leave=False))
    return {"batch": batch, "rounds": rounds, "runs_per_round": runs, "threads": threads,
            "providers": sessions[0].get_providers(), **timing}

"""The Python API; the CLI is a thin shell over it.

`optimize` loads the model, resolves batch-1 input shapes, runs the pre-passes and the chosen method
through the pass manager, re-infers shapes, checks the result with the ONNX checker, measures MACs,
parameters and fidelity against the original (on the calibration data, or on seeded random inputs;
`verify`: per output cosine, rel_l2 and the agreements its kind makes meaningful, with the user's
`metric`), and saves atomically when an output path is given. Its keyword options are those the methods declare
(graphopt.passes.methods): unknown names are refused, and the report lists the values the run used.
Asked for `target_macs`, the report says whether the model reached it (`target_reached`, within
`TARGET_TOLERANCE`); a missed target is reported, not raised. Asked for `target_latency`, the report's
`latency_target` holds the target, the latency the method predicted and the one the result measures
(solved again, up to three times in all, while a result misses by over 10%: graphopt.latency_target).
`calibrate` takes activation statistics on the same pre-passed graph and saves them for
`optimize(..., stats=path)`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.capture import linear_inputs, request_for
from graphopt.calibration.cluster import open_cluster
from graphopt.calibration.collect import DEFAULT_MEMORY, DEFAULT_ROWS_PER_CHANNEL, Calibrator
from graphopt.calibration.data import Dataset, DataSource, fixed_batch, load_data
from graphopt.calibration.mask import MaskChoice, choose_mask
from graphopt.calibration.quantize import refuse_quantized
from graphopt.calibration.metric import Metric
from graphopt.calibration.shapes import count_cost
from graphopt.calibration.store import StatsFile, save_stats
from graphopt.calibration.trim import TrimPlan, plan_trim
from graphopt.errors import DataError, ModelLoadError, OptionError
from graphopt import latency_target as latency_fit
from graphopt.batching import batch_that_runs
from graphopt.evaluate import VerifyReport, compare_latency, random_feed
from graphopt.evaluate import verify as compare_outputs
from graphopt.ir import graph as ir
from graphopt.ir import weights
from graphopt.ir.interface import interface_changes
from graphopt.ir.io import check_outputs, input_files, load_model, model_outputs, save_model
from graphopt.ir.sparse import to_sparse_initializers, weight_sparsity
from graphopt.ir.shapes import resolve_input_shapes
from graphopt.ops.lower import lower_rms_norms, rms_norm_names
from graphopt.passes import METHODS, Pass, PassContext, PassManager, PassRecord, get_pass, normalising_passes
from graphopt.passes.methods import Option, declared_options, json_value, resolve_options

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | onnx.ModelProto

TARGET_TOLERANCE = 0.02  # a MAC target counts as reached up to 2% (relative) above it


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    weights: list[np.ndarray] = field(default_factory=list, repr=False)  # what a model held by reference names


def methods() -> list[str]:
    """Names accepted by `optimize(method=...)`: "none" runs only the pre-passes."""
    return ["none", *sorted(name for name in METHODS if name != "none")]


def method_options() -> dict[str, Option]:
    """Every option a method declares (graphopt.passes.methods), by keyword: what `optimize` accepts
    besides its own arguments, and what `graphopt optimize`'s flags are built from."""
    return declared_options()


def parse_methods(method: str) -> list[str]:
    """The method names of `method` ("none", one name, or a comma-separated pipeline), in order."""
    names_given = [part.strip() for part in str(method).split(",")]
    unknown = [n for n in names_given if n not in methods()]
    if unknown or not all(names_given):
        raise OptionError(f"unknown method '{method}' (choose from {', '.join(methods())}, "
                          "or a comma-separated pipeline such as snp,exprune)")
    if "none" in names_given and len(names_given) > 1:
        raise OptionError(f"'none' cannot be part of a pipeline: '{method}'")
    return [n for n in names_given if n != "none"]


def as_model(source: ModelSource) -> onnx.ModelProto:
    return source if isinstance(source, onnx.ModelProto) else load_model(source)


def resolve_shapes(model: onnx.ModelProto, dataset: Dataset | None,
                   input_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    observed = dataset.first_sample_shapes() if dataset is not None else None
    return resolve_input_shapes(model, input_shapes, observed)


def _protected(model: ModelSource, inputs: list[Any], outputs: list[Path]) -> set[Path]:
    """Files the user gave as inputs (the model, its external data, the data and statistics files among
    `inputs`); refuses, before any work, `outputs` that would overwrite one of them or cannot be written."""
    protected = input_files(model) if not isinstance(model, onnx.ModelProto) else set()
    protected |= {Path(source).resolve() for source in inputs if isinstance(source, (str, os.PathLike))}
    check_outputs(outputs, protected, clash=OptionError)
    return protected


@weights.holding
def calibrate(model: ModelSource, data: DataSource, *, output: str | os.PathLike[str] | None = None,
              tensors: list[str] | None = None, batch_size: int = 32, memory_limit: int | str = DEFAULT_MEMORY,
              device: str = "cpu", threads: int = 0, mask_input: str | None = None,
              input_shapes: dict[str, tuple[int, ...]] | None = None, progress: bool = False,
              workers: int | None = None, ray_address: str | None = None,
              rows_per_channel: int = DEFAULT_ROWS_PER_CHANNEL, trim_padding: bool = True) -> StatsFile:
    """Statistics (all kinds) of `tensors`, by default the activation input of every Conv/Gemm/MatMul
    with a constant weight, on the model after the pre-passes: the graph `optimize` methods see, so
    `optimize(..., stats=...)` can reuse them. Saved to `output` when given. `workers` and `ray_address`
    shard the data over Ray tasks (graphopt.calibration.cluster); Grams of wide maps come from sampled
    positions, about `rows_per_channel` rows per channel (0: every position; graphopt.calibration.stats).
    `trim_padding`: token batches run up to their last counted position (graphopt.calibration.trim)."""
    protected = _protected(model, [data], [Path(output)] if output is not None else [])
    original = as_model(model)
    dataset = load_data(data, original)
    shapes = resolve_shapes(original, dataset, input_shapes)
    batch_size = batch_that_runs(original, dataset, shapes, batch_size, device)[0]
    graph = ir.import_graph(original)
    ctx = PassContext(template=original, input_shapes=shapes, progress=progress)
    PassManager(normalising_passes()).run(graph, ctx)
    normalized = ir.export_model(graph, original)
    requests = linear_inputs(normalized) if tensors is None else [request_for(normalized, t) for t in tensors]
    mask = choose_mask(original, mask_input)  # None: found in the model; "none": no mask
    whole = None if trim_padding else "--no-trim-padding"
    dataset = _trimmed(dataset, _padding(original, dataset, mask, whole, batch_size, device))
    with open_cluster(workers, ray_address) as cluster:
        calibrator = Calibrator(dataset, batch_size=batch_size, memory_limit=memory_limit, device=device,
                                threads=threads, progress=progress, mask_input=mask, cluster=cluster,
                                rows_per_channel=rows_per_channel)
        stats = calibrator.statistics(normalized, requests)
    stats_file = StatsFile.build(normalized, stats, dataset, mask.name)  # its data fingerprint reads whole feeds
    if output is not None:
        save_stats(stats_file, output, protected=protected)
        stats_file.source = str(output)
    return stats_file


def verify(reference: ModelSource, candidate: ModelSource, data: DataSource, *, batch_size: int | None = None,
           metric: Metric | Callable[..., Any] | str | None = None, ctc_blank: int = 0,
           progress: bool = False, device: str = "cpu") -> VerifyReport:
    """The candidate's fidelity to the reference on `data` (graphopt.evaluate.verify): per output cosine and
    rel_l2, the agreements its kind makes meaningful, and `metric`'s values (a callable
    `metric(reference_outputs, candidate_outputs, inputs) -> dict[str, float]`, or 'module:function').

    `batch_size` defaults to 32, or to one below the row count from which the candidate's ExPrune layers run
    dense (graphopt.passes.exprune.dispatch): the op decides per row, so a smaller batch measures what a
    single-row caller gets, where a larger one would measure the dense layers (a given size that large is
    warned about). A reference that runs on one sample only is verified one sample at a time (graphopt.batching)."""
    from graphopt.passes.exprune.dispatch import measuring_batch

    if int(ctc_blank) < 0:
        raise OptionError(f"--ctc-blank must be >= 0, got {ctc_blank}")
    if batch_size is not None and int(batch_size) < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    candidate_model = as_model(candidate)
    below = measuring_batch(candidate_model, 32 if batch_size is None else int(batch_size))
    if batch_size is None:
        batch_size = below
    elif below < batch_size:
        log.warning("the candidate's ExPrune layers run dense from %d rows: at batch %d their skipping is not "
                    "measured (leave --batch-size out to measure it)", below + 1, batch_size)
    reference_model = as_model(reference)
    dataset = load_data(data, reference_model)
    batch_size = batch_that_runs(reference_model, dataset, resolve_shapes(reference_model, dataset, None),
                                 int(batch_size), device)[0]
    report = compare_outputs(reference_model, candidate_model, dataset, batch_size=int(batch_size),
                             progress=progress, metric=metric, ctc_blank=int(ctc_blank), device=device)
    report.batch_size = int(batch_size)
    return report


@weights.holding
def optimize(model: ModelSource, *, method: str = "none", calib: DataSource | None = None,
             target_macs: float | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
             output: str | os.PathLike[str] | None = None, batch_size: int = 32, progress: bool = False,
             **options: Any) -> OptimizeResult:
    """Optimize `model` with `method`; return the new model and a JSON-ready report.

    `method` is one method name or a comma-separated pipeline run in order ("snp,exprune": static then
    dynamic pruning). `options` are the options the methods declare (`method_options()`); each applies to
    every method that reads it, the methods that run validate theirs, and a name no method declares is
    refused. The report's "options" holds every option the run read, defaults filled in."""
    pipeline = parse_methods(method)
    pruning, quantizing = _split_quantize(pipeline)
    resolved = resolve_options(pipeline, {"target_macs": target_macs, "batch_size": batch_size, **options})
    _require_data(pipeline, calib, resolved.get("stats"), resolved["repair"])
    outputs = model_outputs(output) if output is not None else []
    protected = _protected(model, [calib, resolved.get("stats")], outputs)
    original = as_model(model)
    if "quantize" in pipeline:
        refuse_quantized(original)  # before the pruning methods' work, not after it
    dataset, shapes, fallback, padding = _prepared_data(original, calib, input_shapes, resolved)
    batch_size = resolved["batch_size"]

    def run(options: dict[str, Any]) -> _Run:
        graph = ir.import_graph(original)
        with open_cluster(options["workers"], options["ray_address"]) as cluster:  # Ray: only where asked for
            ctx = PassContext(template=original, input_shapes=shapes, data=dataset, sample=_first(dataset),
                              progress=progress, options=options, cluster=cluster, pipeline=tuple(pipeline))
            if options.get("repair"):
                ctx.normalised_checks.append(lambda normalised: _trainable(normalised, original))
            records, pruned, repaired = _run_steps(graph, ctx, pruning, quantizing)  # repaired: {"repair": ...} or {}
            ctx.release_statistics()  # Gram matrices are no longer needed: the fidelity check runs without them
        optimized = ir.like_template_value_info(ir.export_model(graph, original), original)
        lower_rms_norms(optimized, keep=rms_norm_names(original))  # the norms a pass wrote, as onnxruntime fuses them
        _check(optimized)
        return _Run(ctx, records, pruned, repaired, optimized)

    attempts, timed = None, {}
    if resolved["target_latency"] is None:
        ctx, records, pruned, repaired, optimized = run(resolved)
    else:  # measured against the target, solved again while it misses (graphopt.latency_target)
        timing = latency_fit.timer(original, shapes, resolved, progress)
        attempts = latency_fit.fit(resolved["target_latency"],
                                   lambda fraction: run({**resolved, "target_latency": fraction}),
                                   lambda attempt: timing(attempt.optimized))
        kept = latency_fit.kept(resolved["target_latency"], attempts)
        ctx, records, pruned, repaired, optimized = kept.run
        timed = {f"batch_{kept.timing['batch']}": kept.timing}  # --bench does not time that batch again

    check_batch, check = _check_settings(ctx, original, optimized, resolved, batch_size)
    measured = _measure(original, optimized, shapes, dataset, check_batch, progress, **check)
    report: dict[str, Any] = {"method": ",".join(pipeline) or "none",
                              "options": {name: json_value(value) for name, value in resolved.items()},
                              **measured, "target_reached": target_reached(resolved["target_macs"],
                                                                           measured["macs_ratio"]),
                              "passes": [record.to_json() for record in records]}
    report.update(_data_notes(ctx, padding, fallback, batch_size))
    dynamic = _exprune_skipped(records, report["macs_after"])
    if dynamic is not None:
        report["exprune_macs_skipped"] = dynamic
    report["interface_changes"] = interface_changes(original, optimized)  # declared dims a pass changed
    report.update(repaired)
    report["weight_sparsity"] = weight_sparsity(optimized)
    report["steps"] = _steps(pruning, quantizing, [pruned, optimized], measured,  # at the batch of the kept outputs
                             lambda model: _measure(original, model, shapes, dataset, check_batch, progress, **check))
    report["bytes_before"] = (weights.model_bytes(original) if isinstance(model, onnx.ModelProto)
                              else sum(p.stat().st_size for p in input_files(model)))
    stored = optimized
    if resolved["sparse_storage"]:
        stored, report["sparse_storage"] = _sparse_storage(original, optimized, shapes)
    if resolved["bench"]:
        report["latency"] = measure_latency(original, optimized, shapes, resolved, progress, timed=timed)
    if attempts is not None:
        report["latency_target"] = latency_fit.report(resolved["target_latency"], attempts,
                                                      lambda attempt: _budget_stats(attempt.records))
    if output is not None:
        report.update(_save(stored, output, protected))
    return OptimizeResult(optimized, report, weights.arrays_of(optimized))


def _check(model: onnx.ModelProto) -> None:
    """The ONNX checker on the result; a model held by reference (graphopt.ir.weights) is checked once saved."""
    if not any(True for _ in weights.referenced(model.graph)):
        onnx.checker.check_model(model)


def _save(model: onnx.ModelProto, output: str | os.PathLike[str], protected: set[Path]) -> dict[str, Any]:
    """Write the result; a model held by reference (graphopt.ir.weights) is checked as the file it became.
    `bytes_after` counts the model file and its external data."""
    save_model(model, output, protected=protected)
    if any(True for _ in weights.referenced(model.graph)):
        onnx.checker.check_model(str(output))
    return {"output": str(output), "bytes_after": sum(p.stat().st_size for p in input_files(output))}


def target_reached(target: float | None, macs_ratio: float) -> bool | None:
    """Whether a run that asked for `target` (a fraction of the MACs) got it: a MAC ratio at most
    `TARGET_TOLERANCE` above the target, relative (0.5 accepts up to 0.51); a model smaller than asked is
    fine. None when no target was asked."""
    return None if target is None else macs_ratio <= target * (1 + TARGET_TOLERANCE)


def measure_latency(original: onnx.ModelProto, optimized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                    options: dict[str, Any], progress: bool = False, rounds: int = 30,
                    timed: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The optimized model's speedup over the original, timed side by side (`rounds` interleaved rounds,
    the same threads and seeded inputs) at batch 1 and at `bench_batch` (where the batch axis is free),
    except the batches `timed` already holds (`batch_N`: the latency target's timing of this result);
    `slower` lists the batches where the result is slower than the original."""
    batches = [1] if fixed_batch(original) is not None else sorted({1, int(options["bench_batch"])})
    timings = {f"batch_{batch}": (timed or {}).get(f"batch_{batch}") or compare_latency(
                   original, optimized, batch=batch, shapes=shapes, rounds=rounds,
                   threads=int(options.get("threads") or 0), device=options.get("device") or "cpu",
                   progress=progress)
               for batch in batches}
    return {**timings, "slower": [timing["batch"] for timing in timings.values() if timing["speedup"] < 1.0]}


class _Run(NamedTuple):
    """One run of a method's steps on a fresh copy of the graph."""
    ctx: PassContext
    records: list[PassRecord]
    pruned: onnx.ModelProto | None
    repaired: dict[str, Any]
    optimized: onnx.ModelProto


def _budget_stats(records: list[PassRecord]) -> dict[str, Any]:
    """The stats of the pass that budgeted predicted latency (the last one that did)."""
    return next((r.result.stats for r in reversed(records) if "predicted_latency_ratio" in r.result.stats), {})


def _split_quantize(pipeline: list[str]) -> tuple[list[str], list[str]]:
    """(the methods before quantization, ["quantize"] or []): quantization is the last step of a pipeline,
    since pruning leaves quantized layers alone."""
    if "quantize" in pipeline[:-1]:
        raise OptionError(f"quantize must be the last method of a pipeline (pruning leaves quantized layers "
                          f"alone): '{','.join(pipeline)}'")
    return (pipeline[:-1], ["quantize"]) if pipeline[-1:] == ["quantize"] else (pipeline, [])


def _run_steps(graph: gs.Graph, ctx: PassContext, pruning: list[str],
               quantizing: list[str]) -> tuple[list[PassRecord], onnx.ModelProto | None, dict[str, Any]]:
    """Run the pre-passes and `pruning`, the repair where asked, then `quantizing` as a step of its own; with
    the records, the model before quantization (None without it), which the report measures too, and the
    report's repair entry ({"repair": ...}, empty without a repair)."""
    records = PassManager(_sequence(pruning)).run(graph, ctx)
    repaired = _repair(graph, ctx)
    if not quantizing:
        return records, None, repaired
    pruned = ir.export_model(graph, ctx.template)
    after = [get_pass("shape_inference")] if pruning else []
    return records + PassManager([*after, get_pass("quantize")]).run(graph, ctx), pruned, repaired


def _trainable(graph: gs.Graph, template: onnx.ModelProto) -> None:
    """--repair's refusal of ops its torch interpreter cannot run, on the normalised graph (pruning adds none)."""
    from graphopt.torch.interpreter.module import refuse_unsupported

    refuse_unsupported(ir.export_model(graph, template, infer=False))


def _repair(graph: gs.Graph, ctx: PassContext) -> dict[str, Any]:
    """--repair STEPS: the pruned graph's weights distilled toward the original model's outputs on the
    calibration data (graphopt.torch.repair, imported only here: it trains with torch), written back into the
    graph by initializer name; the report's entry ({"repair": ...}, empty when no repair was asked for)."""
    if not ctx.options.get("repair"):
        return {}
    from graphopt.torch.repair import repair

    tensors = ctx.options.get("repair_tensors")
    found = repair(ctx.template, ir.export_model(graph, ctx.template), ctx.data, steps=int(ctx.options["repair"]),
                   lr=float(ctx.options["repair_lr"]), schedule=str(ctx.options["repair_schedule"]),
                   tensors=tensors.split(",") if tensors else (),
                   batch_size=int(ctx.options["batch_size"]), device=ctx.option("device", "cpu"),
                   threads=int(ctx.option("threads", 0)), mask=ctx.token_mask(), progress=ctx.progress)
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    for name, array in found.arrays.items():
        constants[name].values = array  # a new array: the old one may be shared or mapped read-only
    return {"repair": found.report}


def _steps(pruning: list[str], quantizing: list[str], models: list[onnx.ModelProto | None],
           measured: dict[str, Any], measure: Callable[[onnx.ModelProto], dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps of the run as the report lists them, each with its cost against the original model: the
    methods before quantization (the pre-passes alone: "none"), then quantization where it ran. `bytes` is
    the serialized model, the size of its file."""
    pruned, optimized = models
    named = [(",".join(pruning) or "none", pruned, None)] if pruned is not None else []
    named.append((",".join(quantizing or pruning) or "none", optimized, measured))
    return [{"step": name, "macs_ratio": found["macs_ratio"], "params": found["params_after"],
             "nodes": found["nodes_after"], "bytes": weights.model_bytes(model), "fidelity": found["fidelity"]}
            for name, model, known in named for found in [known or measure(model)]]


def _require_data(pipeline: list[str], calib: DataSource | None, stats: Any, repair: int = 0) -> None:
    """Refuse, before any work, a method that reads calibration data when neither data nor statistics are given,
    and a repair (which trains on samples) without data."""
    if repair and calib is None:
        raise DataError("--repair needs calibration data: give --calib DATA.npz (it trains on the samples; a "
                        "statistics file holds none)")
    if "quantize" in pipeline and calib is None:
        raise DataError("--method quantize needs calibration data: give --calib DATA.npz "
                        "(a statistics file holds no activation ranges)")
    hungry = [name for name in pipeline if METHODS[name].needs_data]
    if hungry and calib is None and stats is None:
        raise DataError(f"--method {hungry[0]} needs calibration data: give --calib DATA.npz "
                        "(or --stats from graphopt calibrate)")


def _data_notes(ctx: PassContext, padding: TrimPlan | None, fallback: str | None, batch_size: int) -> dict[str, Any]:
    """The report's keys on how the data ran: the mask input found, the padding cut, the batch size fallback."""
    notes: dict[str, Any] = {}
    if fallback is not None:
        notes["batch_fallback"] = {"batch_size": batch_size, "reason": fallback}
    if ctx.calibration_mask() is not None:
        notes["mask_input"] = ctx.calibration_mask()
    if padding is not None:
        notes["padding"] = padding.to_json()
    return notes


def _first(dataset: Dataset | None) -> dict[str, np.ndarray] | None:
    """The first calibration sample, what runs that observe shapes are fed (None without data)."""
    return dataset.first_sample() if dataset is not None else None


def _prepared_data(original: onnx.ModelProto, calib: DataSource | None, input_shapes: dict[str, tuple[int, ...]] | None,
                   resolved: dict[str, Any]) -> tuple[Dataset | None, dict[str, tuple[int, ...]], str | None,
                                                      TrimPlan | None]:
    """(the calibration data validated against the model and trimmed of padding where that changes nothing,
    the resolved input shapes, why the batch size fell to 1 or None, the padding plan); `resolved["batch_size"]`
    becomes the batch size the model runs at."""
    dataset = load_data(calib, original) if calib is not None else None
    shapes = resolve_shapes(original, dataset, input_shapes)
    batch_size, fallback = batch_that_runs(original, dataset, shapes, int(resolved["batch_size"]),
                                           resolved.get("device") or "cpu")
    resolved["batch_size"] = batch_size
    if fallback is not None:  # --bench times it at one sample only
        resolved["bench_batch"] = 1
    padding = _padding_plan(original, dataset, resolved, batch_size)
    return (_trimmed(dataset, padding) if dataset is not None else None), shapes, fallback, padding


def _padding_plan(original: onnx.ModelProto, dataset: Dataset | None, resolved: dict[str, Any],
                  batch_size: int) -> TrimPlan | None:
    """Where the calibration data's token batches are cut because that changes nothing
    (graphopt.calibration.trim)."""
    if dataset is None:
        return None
    whole = None if resolved["trim_padding"] else "--no-trim-padding"
    if whole is None and resolved.get("stats") is not None and resolved["mask_input"] is None:
        whole = "--stats: its statistics keep the file's own mask"  # a file with no mask counted padded rows
    return _padding(original, dataset, choose_mask(original, resolved["mask_input"]), whole, batch_size,
                    resolved.get("device") or "cpu")


def _padding(original: onnx.ModelProto, dataset: Dataset, mask: MaskChoice, whole: str | None, batch_size: int,
             device: str) -> TrimPlan | None:
    """Whether calibration batches run cut after their last counted token (None: the model has no mask);
    `whole`: why they run whole regardless, None to let graphopt.calibration.trim decide."""
    if mask.name is None:
        return None
    if whole is not None:
        return TrimPlan(None, reason=whole)
    return plan_trim(original, mask, dataset.batches(batch_size, trimmed=False), device)


def _trimmed(dataset: Dataset, padding: TrimPlan | None) -> Dataset:
    return dataset if padding is None or padding.trim is None else replace(dataset, trim=padding.trim)


def _check_settings(ctx: PassContext, original: onnx.ModelProto, optimized: onnx.ModelProto,
                    resolved: dict[str, Any], batch_size: int) -> tuple[int, dict[str, Any]]:
    """The fidelity check's batch size (that of the outputs calibration kept, where it kept them) and keywords.
    ExPrune layers that run dense from some row count (graphopt.passes.exprune.dispatch) are checked below it,
    as a caller sending fewer rows runs them: the op decides per row, so any smaller batch measures the same."""
    from graphopt.passes.exprune.dispatch import measuring_batch

    check_batch = measuring_batch(optimized, ctx.reference_batch_size() or batch_size)
    return check_batch, {"metric": resolved["metric"], "ctc_blank": int(resolved["ctc_blank"]),
                         "device": resolved.get("device") or "cpu",
                         "reference_outputs": ctx.reference_outputs(original, check_batch)}


def _sequence(pipeline: list[str]) -> list[Pass]:
    """The normalising pre-passes, then every method's passes in order."""
    sequence = normalising_passes()
    for index, name in enumerate(pipeline):
        if index:  # the next method sees shapes of the graph the previous one rewrote
            sequence.append(get_pass("shape_inference"))
        sequence.extend(get_pass(pass_name) for pass_name in METHODS[name].passes)
    return sequence


def _measure(original: onnx.ModelProto, optimized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
             dataset: Dataset | None, batch_size: int, progress: bool, metric: Metric | None = None,
             ctc_blank: int = 0, device: str = "cpu",
             reference_outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """MACs, parameters and nodes before and after, and the fidelity of `optimized` to `original` on the
    calibration data (else on seeded random inputs), with the user's `metric` where given. The original's
    outputs on the calibration data are those calibration kept where it did (graphopt.calibration.reference:
    the normalised graph at full optimisation, equal up to float rounding), else it runs again."""
    sample = _first(dataset)
    before = count_cost(original, shapes, sample=sample)
    fidelity_data = dataset if dataset is not None else [random_feed(original, shapes, batch=min(8, batch_size))]
    try:
        after = count_cost(optimized, shapes, sample=sample)
        fidelity = compare_outputs(original, optimized, fidelity_data, batch_size=batch_size, progress=progress,
                                   metric=metric, ctc_blank=ctc_blank, device=device,
                                   reference_outputs=reference_outputs if dataset is not None else None)
    except ModelLoadError as exc:  # graphopt wrote it: a bug, not the user's input (exit 1, not 2)
        raise RuntimeError(f"the rewritten model does not load in onnxruntime ({exc}); nothing was written") from exc
    return {
        "macs_before": before.macs, "macs_after": after.macs,
        "macs_ratio": after.macs / before.macs if before.macs else 1.0,
        "macs_uncounted": before.uncounted,
        "params_before": before.params, "params_after": after.params,
        "nodes_before": len(original.graph.node), "nodes_after": len(optimized.graph.node),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "fidelity": {**fidelity.to_json(), "data": "calibration" if dataset is not None else "random",
                     "batch_size": batch_size,
                     "reference_outputs": "calibration" if dataset is not None and reference_outputs else "run"},
    }


def _exprune_skipped(records: list[PassRecord], macs_after: int) -> dict[str, Any] | None:
    """The fraction of the remaining MACs ExPrune skips per input (the static count does not see it)."""
    dynamic = [r.result.stats for r in records if r.name == "exprune" and r.result.modified]
    if not dynamic or not macs_after:
        return None
    stats = dynamic[-1]
    skipped = stats.get("held_out_macs_skipped_per_sample", stats["macs_skipped_per_sample"])
    return {"fraction_of_model": skipped / macs_after,
            "data": "held-out" if "held_out_macs_skipped_per_sample" in stats else "calibration",
            "dense_from_rows": stats.get("dense_rows") or None}


def _sparse_storage(original: onnx.ModelProto, optimized: onnx.ModelProto,
                    shapes: dict[str, tuple[int, ...]]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model to save under `sparse_storage`: sparse initializers where the file gets smaller and
    onnxruntime loads it with the same outputs (bit-identical weights), else the dense model and why."""
    sparse, moved = to_sparse_initializers(optimized)
    dense_bytes, sparse_bytes = weights.model_bytes(optimized), weights.model_bytes(sparse)
    info: dict[str, Any] = {"used": False, "tensors": moved, "bytes_dense": dense_bytes, "bytes_sparse": sparse_bytes}
    if not moved or sparse_bytes >= dense_bytes:
        info["reason"] = "no weight is sparse enough to store smaller (needs < 1/3 nonzero for float32)"
        return optimized, info
    try:
        check = compare_outputs(optimized, sparse, [random_feed(original, shapes, batch=2)], batch_size=2,
                                progress=False)
    except Exception as exc:  # onnxruntime refusing the file is an answer here, not a bug
        info["reason"] = f"onnxruntime cannot run the sparse file: {type(exc).__name__}: {exc}"
        return optimized, info
    worst = max(float(output["max_abs"] or 0.0) for output in check.outputs.values())
    if worst != 0.0:
        info["reason"] = f"outputs differ from the dense model (max_abs {worst})"
        return optimized, info
    info["used"] = True
    return sparse, info

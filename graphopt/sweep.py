"""Sweeps: one model compressed by several methods at several targets, side by side, to pick an
operating point.

For every (method, target) pair `sweep` runs `graphopt.api.optimize` and records one row: the MACs and
parameter ratios, the serialized size, the speedup over the original at batch 1 and `bench_batch`
(`api.measure_latency`: interleaved rounds, median of per-round ratios with p10/p90), the fidelity on
held-out calibration samples and whether the target was reached.

Data: the calibration samples are split once, seeded (`Dataset.split`), into a fit part and a held-out
`held_out` fraction. Activation statistics are measured once on the fit part (`api.calibrate`) and
handed to every run of a method that reads data, so every target of every method sees the same
statistics; fidelity (`graphopt.evaluate.verify`: cosine and rel_l2 of the first output, with the
agreements its kind makes meaningful, and the values of a user's `metric`) is measured on the held-out
samples, which no run calibrated on.

Targets are fractions of the original's MACs (`target_macs`: reached within `api.TARGET_TOLERANCE`,
relative) or of its measured latency at `bench_batch` (`target_latency`: reached when the measured
latency is at most 10%, relative, above it: `graphopt.latency_target.reached`). A missed target is a row with
`target_reached` false and the reason; a run refused with a `GraphoptError` (the method declines the
model or an option) is a row with `refused` true and the reason; a pass that fails (`PassFailedError`, a
bug) is a row with `failed` true too, and the other runs go on. Outputs never overwrite inputs.

sweep.json is written atomically after every run with the rows finished so far (`complete` false, `runs`
the number planned), so an interrupted sweep keeps what it measured; `resume` (`--resume`) starts from such
a file, running only the (method, target) pairs it lacks, and refuses a file written with other settings
(`resumed` counts the rows taken over). The last write adds the rows of every run, `complete` true and the
plot (sweep.png, when matplotlib is installed).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx
from tqdm.auto import tqdm

from graphopt import api
from graphopt._version import __version__
from graphopt.batching import batch_that_runs
from graphopt.calibration.data import Dataset, DataSource, load_data
from graphopt.calibration.metric import as_metric
from graphopt.calibration.store import StatsFile
from graphopt.errors import GraphoptError, OptionError, OutputPathError, PassFailedError
from graphopt.evaluate import verify
from graphopt.passes.exprune.dispatch import measuring_batch
from graphopt.ir.files import check_outputs, same_file, write_atomic
from graphopt.ir import weights
from graphopt.ir.io import input_files
from graphopt.latency_target import reached as latency_reached
from graphopt.passes import METHODS
from graphopt.passes.methods import json_value, resolve_options

log = logging.getLogger(__name__)

KINDS = {"macs": "target_macs", "latency": "target_latency"}
FIDELITY_KEYS = ("cosine", "rel_l2", "top1_agreement", "max_abs", "samples", "kind", "position_agreement",
                 "sequence_agreement", "metric", "metric_name")


def parse_alternatives(text: str) -> list[str]:
    """The methods a sweep compares, from "snp,magnitude,snp+exprune": a comma list of alternatives, each one
    method or a '+'-joined pipeline, returned in optimize's comma form ("snp,exprune")."""
    alternatives = [part.strip() for part in str(text).split(",")]
    if not all(alternatives):
        raise OptionError(f"--method expects methods separated by commas, such as snp,magnitude,snp+exprune, "
                          f"got '{text}'")
    return [",".join(api.parse_methods(alternative.replace("+", ","))) or "none" for alternative in alternatives]


def parse_targets(text: str) -> list[float]:
    """Fractions in (0, 1] from "0.9,0.8,0.7", in the order given."""
    try:
        targets = [float(part) for part in str(text).split(",")]
    except ValueError:
        targets = []
    if not targets or not all(0.0 < target <= 1.0 for target in targets):
        raise OptionError(f"targets must be fractions in (0, 1] separated by commas, such as 0.9,0.7,0.5, "
                          f"got '{text}'")
    return targets


def output_files(output_dir: str | os.PathLike[str], model: api.ModelSource, calib: DataSource) -> tuple[Path, Path]:
    """(sweep.json, sweep.png) in `output_dir`; refused, before any work, when the folder is an input (the
    model, its external data, the calibration file) or not a folder, or when a file would replace an input."""
    folder = Path(output_dir)
    protected = input_files(model) if isinstance(model, (str, os.PathLike)) else set()
    protected |= {Path(calib).resolve()} if isinstance(calib, (str, os.PathLike)) else set()
    clash = next((source for source in protected if same_file(folder, source)), None)
    if clash is not None:
        raise OptionError(f"refusing to write into an input: output folder {folder} is the input {clash}")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"-o must be a folder, and {folder} is a file")
    if not folder.parent.is_dir():
        raise OutputPathError(f"output directory does not exist: {folder.parent}")
    files = (folder / "sweep.json", folder / "sweep.png")
    if folder.is_dir():
        check_outputs(files, protected, clash=OptionError)
    return files


def sweep(model: api.ModelSource, calib: DataSource, *, methods: list[str], targets: list[float],
          kind: str = "macs", output_dir: str | os.PathLike[str] | None = None, held_out: float = 0.25,
          seed: int = 0, bench: bool = True, bench_batch: int = 8, threads: int = 0, repeat: int = 30,
          input_shapes: dict[str, tuple[int, ...]] | None = None, batch_size: int = 32, progress: bool = False,
          resume: bool = False, **options: Any) -> dict[str, Any]:
    """Run every method of `methods` (optimize's comma form) at every target of `kind` ("macs" or
    "latency") and return the report: the settings and one row per run (module docstring). With
    `output_dir`, sweep.json and the plot (`plot`) are written there, sweep.json also after each run (with
    `complete` false); with `resume`, the runs a sweep.json there already holds, written with the same
    settings, are kept and not run again. `options` (optimize's keyword options) go to every run."""
    options = _with_metric(options)
    _check_settings(methods, targets, kind, held_out, repeat, options)
    files = output_files(output_dir, model, calib) if output_dir is not None else None
    original = api.as_model(model)
    data = load_data(calib, original)
    fit, held = data.split(held_out, seed=seed)
    shapes = api.resolve_shapes(original, fit, input_shapes)
    batch_size, bench_batch = _batches(original, data, shapes, batch_size, bench_batch)
    timing = {"bench_batch": bench_batch, "threads": threads} if bench else None
    runs = [(method, target) for method in methods for target in targets]
    report = _header(model, calib, original, methods, targets, kind, (held_out, seed, fit, held), timing, repeat,
                     options)
    done = _finished_rows(files[0], report) if files is not None and resume else {}
    todo = [run for run in runs if run not in done]
    report["resumed"] = len(runs) - len(todo)
    if files is not None:
        files[0].parent.mkdir(exist_ok=True)
    stats = _statistics(original, fit, [method for method, _ in todo], shapes, threads, batch_size, progress)
    common = {"calib": fit, "input_shapes": shapes, "batch_size": batch_size, "threads": threads,
              "bench_batch": bench_batch, **options, **({"stats": stats} if stats is not None else {})}
    for method, target in tqdm(todo, desc="sweep", unit="run", disable=not progress):
        done[(method, target)] = _run(original, method, target, kind, common, held, timing, repeat)
        _write_partial(report, runs, done, files)
    report.update({"rows": [done[run] for run in runs], "complete": True})
    if files is not None:
        _finish(report, files)
    return report


def _header(model: api.ModelSource, calib: DataSource, original: onnx.ModelProto, methods: list[str],
            targets: list[float], kind: str, split: tuple[float, int, Dataset, Dataset],
            timing: dict[str, Any] | None, repeat: int, options: dict[str, Any]) -> dict[str, Any]:
    """The report's settings, before any row: `split` is (held-out fraction, seed, fit part, held-out part)."""
    held_out, seed, fit, held = split
    return {"graphopt": __version__, "model": str(model) if not isinstance(model, onnx.ModelProto) else None,
            "calib": str(calib) if isinstance(calib, (str, os.PathLike)) else None, "methods": methods,
            "targets": targets, "target_kind": kind,
            "held_out": {"fraction": held_out, "seed": seed, "samples": held.num_samples,
                         "fit_samples": fit.num_samples},
            "bench": {**timing, "rounds": repeat} if timing else None,
            "options": {name: json_value(value) for name, value in options.items()},
            "bytes_before": weights.model_bytes(original), "runs": len(methods) * len(targets), "complete": False,
            "resumed": 0, "rows": []}


def _write_partial(report: dict[str, Any], runs: list[tuple[str, float]], done: dict[tuple[str, float], Any],
                   files: tuple[Path, Path] | None) -> None:
    """sweep.json with the rows finished so far, while runs remain: what is finished survives an interrupt."""
    if files is not None and len(done) < len(runs):
        _write({**report, "rows": [done[run] for run in runs if run in done]}, files[0])


def _finish(report: dict[str, Any], files: tuple[Path, Path]) -> None:
    """The plot, then the complete report written over the partial one."""
    skipped = plot(report, files[1])
    report.update({"plot": None if skipped else str(files[1]), "plot_skipped": skipped, "output": str(files[0])})
    _write(report, files[0])


RESUME_KEYS = ("graphopt", "methods", "targets", "target_kind", "held_out", "bench", "options", "bytes_before")


def _finished_rows(path: Path, report: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    """The rows of the sweep.json at `path` by (method, target), where it was written by a sweep with the
    settings of `report` (the same graphopt version, model and calibration files, methods, targets, held-out
    split, timing and options), except runs that failed with an internal error (they run again); none where
    there is no file. Refused (exit 2) where the settings differ or the file is not a sweep's."""
    if not path.exists():
        log.info("--resume: no %s yet, every run starts", path)
        return {}
    try:
        earlier = json.loads(path.read_text())
        rows = {(row["method"], row["target"]): row for row in earlier["rows"] if not row["failed"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise OptionError(f"cannot resume from {path}: not a sweep's report ({exc})") from exc
    changed = [key for key in RESUME_KEYS if json.dumps(earlier.get(key), sort_keys=True, default=str) !=
               json.dumps(report[key], sort_keys=True, default=str)]
    changed += [key for key in ("model", "calib") if not _same_path(earlier.get(key), report[key])]
    if changed:
        raise OptionError(f"cannot resume from {path}: it was written with other settings ({', '.join(changed)}); "
                          f"run without --resume to start again, or give another -o")
    return rows


def _same_path(first: str | None, second: str | None) -> bool:
    return first == second or (first is not None and second is not None and same_file(Path(first), Path(second)))


def _write(report: dict[str, Any], path: Path) -> None:
    text = json.dumps(report, indent=2, default=str).encode()
    write_atomic(path, lambda stream: stream.write(text))


def _with_metric(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with a given metric as a `Metric`, which the report names."""
    return {**options, "metric": as_metric(options["metric"])} if options.get("metric") is not None else options


def _check_settings(methods: list[str], targets: list[float], kind: str, held_out: float, repeat: int,
                    options: dict[str, Any]) -> None:
    """Refuse, before any work, settings no run could use: an unknown kind, method or option, a bad value."""
    if kind not in KINDS:
        raise OptionError(f"target kind must be {' or '.join(KINDS)}, got '{kind}'")
    if not methods or not targets:
        raise OptionError("a sweep needs at least one method and one target")
    if not 0.0 < held_out < 1.0:
        raise OptionError(f"--held-out must be in (0, 1), got {held_out}")
    if repeat < 2:
        raise OptionError(f"--repeat must be >= 2, got {repeat}")
    for method in methods:
        resolve_options(api.parse_methods(method), {**options, KINDS[kind]: targets[0]})


def _needs_data(method: str) -> bool:
    return any(METHODS[name].needs_data for name in api.parse_methods(method))


def _batches(original: onnx.ModelProto, data: Dataset, shapes: dict[str, tuple[int, ...]], batch_size: int,
             bench_batch: int) -> tuple[int, int]:
    """(batch size, timed batch size): both 1 where the model runs on one sample only (graphopt.batching)."""
    return (1, 1) if batch_that_runs(original, data, shapes, batch_size)[1] is not None else (batch_size, bench_batch)


def _statistics(original: onnx.ModelProto, fit: Dataset, methods: list[str], shapes: dict[str, tuple[int, ...]],
                threads: int, batch_size: int, progress: bool) -> StatsFile | None:
    """Activation statistics on the fit samples, measured once for every run that reads data (None when
    no method does)."""
    if not any(_needs_data(method) for method in methods):
        return None
    stats = api.calibrate(original, fit, batch_size=batch_size, threads=threads, input_shapes=shapes,
                          progress=progress)
    stats.source = "sweep: measured once on the fit samples"
    return stats


def _run(original: onnx.ModelProto, method: str, target: float, kind: str, options: dict[str, Any],
         held: Dataset, timing: dict[str, Any] | None, repeat: int) -> dict[str, Any]:
    """One row: the optimized model measured, or the reason the run was refused. `options` are the runs'
    common options (the statistics too, given to the methods that read data)."""
    options = {**{name: value for name, value in options.items() if name != "stats" or _needs_data(method)},
               KINDS[kind]: target}
    row = _measured(original, method, target, kind, options, held, timing, repeat)
    log.info("sweep %s at %s: %s", method, target, row["reason"] or "reached")
    return row


def _measured(original: onnx.ModelProto, method: str, target: float, kind: str, options: dict[str, Any],
              held: Dataset, timing: dict[str, Any] | None, repeat: int) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "target": target, "target_kind": kind, "refused": False, "failed": False,
                           "target_reached": None, "reason": None, "macs_ratio": None, "params_ratio": None,
                           "bytes": None, "bytes_ratio": None, "latency": None, "fidelity": None}
    try:
        result = api.optimize(original, method=method, **options)
    except GraphoptError as exc:
        return {**row, "refused": True, "target_reached": False, "reason": str(exc)}
    except PassFailedError as exc:  # a bug in one method: the other runs of the sweep still count
        log.error("sweep %s at %s: %s", method, target, exc)
        return {**row, "refused": True, "failed": True, "target_reached": False, "reason": f"internal error: {exc}"}
    report, optimized = result.report, result.model
    row.update({"macs_ratio": report["macs_ratio"],
                "params_ratio": report["params_after"] / report["params_before"] if report["params_before"] else 1.0,
                "bytes": weights.model_bytes(optimized),
                "bytes_ratio": weights.model_bytes(optimized) / weights.model_bytes(original)})
    fidelity = verify(original, optimized, held, batch_size=measuring_batch(optimized, int(options["batch_size"])),
                      metric=options.get("metric"),
                      ctc_blank=int(options.get("ctc_blank") or 0)).to_json()
    row["fidelity"] = {key: fidelity.get(key) for key in FIDELITY_KEYS if key in fidelity}
    if timing is not None:
        shapes = options["input_shapes"]
        row["latency"] = api.measure_latency(original, optimized, shapes, timing, rounds=repeat)
    if kind == "latency":
        row["latency_target"] = report.get("latency_target")
    row["target_reached"] = _reached(kind, target, report)
    if not row["target_reached"]:
        row["reason"] = _missed(kind, target, report)
    return row


def _reached(kind: str, target: float, report: dict[str, Any]) -> bool:
    if kind == "macs":
        return bool(report["target_reached"])
    return latency_reached(target, (report.get("latency_target") or {}).get("measured"))


def _missed(kind: str, target: float, report: dict[str, Any]) -> str:
    """Why a run missed its target, in one line: what it reached, the floor a pass reported, the method's
    first reason for leaving something alone."""
    if kind == "macs":
        text = f"keeps {report['macs_ratio']:.1%} of the MACs, more than 2% above the {target:.1%} asked"
    else:
        found = report.get("latency_target") or {}
        measured = found.get("measured")
        predicted = found.get("predicted")
        text = (f"measured latency {measured:.1%} of the original at batch {found.get('batch')} (predicted "
                f"{'n/a' if predicted is None else format(predicted, '.1%')}), more than 10% above the "
                f"{target:.1%} asked" if measured is not None else "latency was not measured")
    floors = [p["stats"]["min_macs_ratio"] for p in report["passes"] if "min_macs_ratio" in p["stats"]]
    if floors:
        text += f"; the smallest reachable is {min(floors):.1%} of the MACs"
    names = report["method"].split(",")
    reasons = [f"{p['pass']}: {reason}" for p in report["passes"] if p["pass"] in names for reason in p["skipped"]]
    return text + (f"; {reasons[0]}" if reasons else "")


def table(report: dict[str, Any]) -> list[str]:
    """The rows as lines of a fixed-width table, then one line per row with a reason."""
    bench = report["bench"]
    batches = sorted({1, int(bench["bench_batch"])}) if bench else []
    head = f"{'method':<14} {'target':>6} {'MACs':>6} {'params':>6} {'size':>6}"
    head += "".join(f" {'speedup b' + str(b):>22}" for b in batches)
    lines = [head + f" {'cosine':>8} {'rel_l2':>7} {'top1':>6}  reached"]
    for row in report["rows"]:
        line = f"{row['method']:<14} {row['target']:>6.2f} {_ratio(row['macs_ratio'])} {_ratio(row['params_ratio'])} "
        line += _ratio(row["bytes_ratio"])
        for batch in batches:
            timing = (row["latency"] or {}).get(f"batch_{batch}")
            line += f" {_speedup(timing):>22}"
        fidelity = row["fidelity"] or {}
        line += f" {_number(fidelity.get('cosine'), '8.5f')} {_number(fidelity.get('rel_l2'), '7.4f')}"
        line += f" {_number(fidelity.get('top1_agreement'), '6.3f')}  "
        status = ("failed" if row["failed"] else "refused" if row["refused"]
                  else "yes" if row["target_reached"] else "no")
        lines.append(line + status)
    lines += [f"  {row['method']} at {row['target']:g}: {row['reason']}" for row in report["rows"] if row["reason"]]
    return lines + [f"  {row['method']} at {row['target']:g}: {slower}" for row in report["rows"]
                    if (slower := slower_than_original(row)) is not None]


def slower_than_original(row: dict[str, Any]) -> str | None:
    """Where a row's model ran slower than the original (median speedup below 1), in words, or None."""
    latency = row["latency"] or {}
    batches = [f"{batch} ({_speedup(latency[f'batch_{batch}'])})" for batch in latency.get("slower", [])]
    return f"slower than the original at batch {', '.join(batches)}" if batches else None


def _ratio(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{value:>6.1%}"


def _number(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'n/a':>{width}}" if value is None else format(value, spec)


def _speedup(timing: dict[str, Any] | None) -> str:
    if timing is None:
        return "n/a"
    return f"{timing['speedup']:.2f}x ({timing['speedup_p10']:.2f}-{timing['speedup_p90']:.2f})"


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> str | None:
    """Fidelity (top-1 agreement, else sequence agreement, else cosine) against speedup, one line per method
    through its targets in order, one panel per timed batch (without timings: against the MAC reduction),
    written atomically to `path` as PNG. Returns why the plot was skipped (matplotlib missing), else None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'graphopt[plot]')"
    rows = [row for row in report["rows"] if row["fidelity"] is not None]
    measure = next((key for key in ("top1_agreement", "sequence_agreement")
                    if any(row["fidelity"].get(key) is not None for row in rows)), "cosine")
    bench = report["bench"]
    panels = [f"batch_{b}" for b in sorted({1, int(bench["bench_batch"])})] if bench else [None]
    figure = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        _panel(axes, report["methods"], rows, panel, measure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomic(path, lambda stream: stream.write(buffer.getvalue()))
    return None


def _panel(axes: Any, methods: list[str], rows: list[dict[str, Any]], panel: str | None, measure: str) -> None:
    """One panel: a line per method through its targets in order, each point labelled with its target."""
    for method in methods:
        chosen = [row for row in rows if row["method"] == method and _x(row, panel) is not None]
        if not chosen:
            continue
        points = [(_x(row, panel), row["fidelity"][measure]) for row in chosen]
        line = axes.plot(*zip(*points), marker="o", label=method)[0]
        for row, point in zip(chosen, points):
            axes.annotate(f"{row['target']:g}", point, fontsize=7, color=line.get_color(),
                          textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel(f"measured speedup at {panel.replace('_', ' ')}" if panel else "MAC reduction (x)")
    axes.set_ylabel(f"{measure.replace('_', ' ')} on held-out samples")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()


def _x(row: dict[str, Any], panel: str | None) -> float | None:
    if panel is None:
        return 1.0 / row["macs_ratio"] if row["macs_ratio"] else None
    timing = (row["latency"] or {}).get(panel)
    return None if timing is None else timing["speedup"]

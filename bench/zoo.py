"""Every method on every graph of the zoo, and what SNP costs against plain inference.

Sweep: every model of the chosen sets runs every method configuration of
tests/passes/test_zoo_methods.RUNS (magnitude, random, snp with and without reconstruction, with the
output criterion and sequential, cob (also with l1pca), omp with dead-unit elimination, dead-units,
exprune, the pipelines snp,exprune, cob,snp (also sequential) and magnitude,snp) at every target, through
`outcome`, which classifies each run as pruned-on-target, refused-with-reason, pruned/unchanged (methods
without a target) or FAIL:<kind> (see that module).
Calibration data are seeded Gaussian samples (16 by default). Sets:

- tiny: the torch zoo of graphopt.torch.zoo (20 architectures, 8-64 channels), both exporters, opset 17,
  BatchNorm kept as nodes (the pre-passes fold it);
- light: the onnx package's light model zoo (onnx/backend/test/data/light: ImageNet topologies at 224 px
  with constant-filled weights, opset 9), where the installed wheel ships it;
- samples: samples/*.onnx;
- tf2onnx: the graphs tests/passes/test_tf2onnx_graphs.py writes the way tf2onnx and Paddle export them
  (NHWC transposes around convolutions, Tensordot reshapes, channel reductions, decomposed LayerNorm);
- large: ImageNet-sized architectures written in bench/zoo_architectures.py (random init, 224 px), both
  exporters; by default only the runs --large-runs names at --large-targets (magnitude and snp at 0.5 of
  the MACs), which keeps the whole sweep near half an hour on 2 cores;
- wild: small models in the forms users write in torch (bench/zoo_wild.py: GRU, ConvNeXt and Mixer blocks,
  PixelShuffle, GroupNorm, nn.MultiheadAttention, tied embeddings, weight norm, PReLU, ...), both exporters,
  opset 17;
- qdq: the tiny zoo from both exporters as users ship it quantized: onnxruntime's `quantize_static` in QDQ
  form (int8 weights per output channel, uint8 activations), calibrated on 16 Gaussian samples of its own;
- dynamic: the tiny zoo from both exporters quantized by onnxruntime's `quantize_dynamic` (DynamicQuantizeLinear,
  ConvInteger and MatMulInteger with int8 weights).

Per run: the status, the MAC ratio reached, the seconds `graphopt.optimize` took and the peak RSS the
run added (optimize and the checks of its output). Runs above --slow seconds are listed at the end.

Cost: SNP end to end (calibration, ordering, reconstruction, rewrite, the report's fidelity check) on
ResNet-50 at 224 px with --cost-samples Gaussian samples against plain onnxruntime inference over the
same samples (full graph optimisation, batches of 32, a fresh session), interleaved, median of
--cost-repeats; the ratio is the goal's measure (<= 3x). Two SNP runs: `snp` with
--criterion variance --reconstruct-target self (one-shot, the defaults the goal was set against) and
`snp_defaults` (today's defaults with data: the output criterion and the error-correcting refit).

    python bench/zoo.py                                   # everything (long: run it on a quiet machine)
    python bench/zoo.py --sets tiny samples --no-cost     # the quick part (a few minutes)
    python bench/zoo.py --sets large --large-runs all --large-targets 0.7 0.5
Results: bench/results/zoo.json (every run) and bench/results/zoo.md (the tables the README quotes).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import graphopt  # noqa: E402
from calibration import peak_added  # noqa: E402
from common import SNP_EARLIER, machine  # noqa: E402
from graphopt.calibration.collect import DEFAULT_ROWS_PER_CHANNEL  # noqa: E402
from graphopt.calibration.session import make_session  # noqa: E402
from graphopt.torch import export, zoo  # noqa: E402
from tests.conftest import quantize_dynamic, quantize_qdq  # noqa: E402
from tests.passes.test_zoo_methods import RUNS, TARGETS, Outcome, calibration, outcome  # noqa: E402
from zoo_architectures import ARCHITECTURES, build  # noqa: E402
import zoo_wild  # noqa: E402

MIB = 1024**2
RESULTS = REPO / "bench" / "results"
SETS = ("samples", "tiny", "large", "light", "tf2onnx", "wild", "qdq", "dynamic")


def models(sets: list[str], folder: Path) -> list[tuple[str, str, Path]]:
    """(set, label, path) of every model of `sets`, exporting the torch ones into `folder`."""
    found: list[tuple[str, str, Path]] = []
    builders = ([("tiny", name, zoo.ZOO[name]) for name in zoo.ZOO] if "tiny" in sets else []) + \
               ([("large", name, lambda name=name: build(name)) for name in ARCHITECTURES] if "large" in sets else []) + \
               ([("wild", name, lambda name=name: zoo_wild.build(name)) for name in zoo_wild.ARCHITECTURES]
                if "wild" in sets else [])
    for exporter in export.EXPORTERS:
        for kind, name, builder in builders:
            model, example = builder()
            path = export.export_onnx(model, example, folder / f"{name}_{exporter}.onnx", exporter=exporter,
                                      opset=17, fold_bn=False)
            found.append((kind, f"{name} ({exporter})", path))
    if "qdq" in sets:
        found += [("qdq", f"{label} (qdq)", quantized(path, folder)) for _, label, path in models(["tiny"], folder)]
    if "dynamic" in sets:
        found += [("dynamic", f"{label} (dynamic)", quantize_dynamic(path, folder / f"{path.stem}_dynamic.onnx"))
                  for _, label, path in models(["tiny"], folder)]
    if "light" in sets:
        light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
        paths = sorted(light.glob("*.onnx"))
        print(f"light model zoo: {len(paths)} models in {light}" if paths else
              f"light model zoo: not shipped by onnx {onnx.__version__} (no {light})")
        found += [("light", path.stem.removeprefix("light_"), path) for path in paths]
    if "samples" in sets:
        found += [("samples", Path(path).name, Path(path)) for path in sorted(glob.glob(str(REPO / "samples" / "*.onnx")))]
    if "tf2onnx" in sets:
        from tests.passes.test_tf2onnx_graphs import GRAPHS

        for name, builder in GRAPHS.items():
            path = folder / f"{name}.onnx"
            onnx.save(builder(), path)
            found.append(("tf2onnx", name, path))
    return found


def quantized(path: Path, folder: Path) -> Path:
    """`path` quantized statically by onnxruntime into QDQ form, calibrated on 16 Gaussian samples of its own."""
    feeds = calibration(onnx.load(str(path)), 16, seed=5)
    batches = [{name: value[i:i + 1] for name, value in feeds.items()} for i in range(16)]
    return quantize_qdq(path, folder / f"{path.stem}_qdq.onnx", batches)


def sweep(entries: list[tuple[str, str, Path]], args: argparse.Namespace, folder: Path,
          found: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run on every model; the results are saved after each model (a long sweep keeps what it did)."""
    rows = found.setdefault("rows", [])
    written = folder / "written"
    written.mkdir(exist_ok=True)
    for kind, label, path in entries:
        large = kind == "large"
        chosen = args.large_runs if large else args.runs
        for run in (RUNS[r] for r in (list(RUNS) if chosen == ["all"] else chosen)):
            targets = (args.large_targets if large else args.targets) if run.target != "none" else [None]
            for target in targets:
                holder: dict[str, Outcome] = {}
                _, peak = peak_added(lambda: holder.setdefault("o", outcome(path, run, target, written, args.samples)))
                result = holder["o"]
                rows.append({"set": kind, "model": label, "run": run.id, "target": target, "status": result.kind,
                             "macs_ratio": result.macs_ratio, "seconds": round(result.seconds, 2),
                             "peak_mib": round(peak / MIB, 1) if peak >= 0 else None, "detail": result.detail})
                ratio = "-" if result.macs_ratio is None else f"{result.macs_ratio:.3f}"
                print(f"{label:34s} {run.id:18s} {target or '-':>4} {result.kind:22s} {ratio:>6s} "
                      f"{result.seconds:7.1f} s {rows[-1]['peak_mib'] or 0:7.0f} MiB  {result.detail[:160]}", flush=True)
                for model in written.iterdir():
                    model.unlink()
        save(found, args)
    return rows


def save(found: dict[str, Any], args: argparse.Namespace) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(found, indent=1, default=float) + "\n")
    args.output.with_suffix(".md").write_text(tables(found["rows"], args.slow) + "\n")


def cost(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """SNP end to end on ResNet-50 against plain onnxruntime inference over the same samples."""
    module, example = build("resnet50")
    path = export.export_onnx(module, example, folder / "resnet50_cost.onnx", exporter="legacy", opset=17,
                              fold_bn=False)
    model = onnx.load(str(path))
    data = calibration(model, args.cost_samples, seed=3)

    def infer() -> None:
        session = make_session(model, optimize=True)
        for start in range(0, args.cost_samples, 32):
            session.run(None, {name: value[start:start + 32] for name, value in data.items()})

    def prune(options: dict[str, Any]) -> Callable[[], None]:
        return lambda: graphopt.optimize(path, method="snp", target_macs=0.5, calib=data, batch_size=32,
                                         calib_rows_per_channel=args.cost_rows_per_channel, **options)

    runs = {"inference": infer, "snp": prune(SNP_EARLIER), "snp_defaults": prune({})}
    timings: dict[str, list[tuple[float, int]]] = {key: [] for key in runs}
    for _ in range(args.cost_repeats):
        for key, run in runs.items():
            timings[key].append(peak_added(run))
    median = {key: statistics.median(t for t, _ in values) for key, values in timings.items()}
    found = {"model": "ResNet-50 (legacy export, 224 px)", "samples": args.cost_samples,
             "repeats": args.cost_repeats, "rows_per_channel": args.cost_rows_per_channel,
             "inference_s": round(median["inference"], 2),
             "snp_s": round(median["snp"], 2), "ratio": round(median["snp"] / median["inference"], 2),
             "snp_defaults_s": round(median["snp_defaults"], 2),
             "ratio_defaults": round(median["snp_defaults"] / median["inference"], 2),
             "peak_mib": {key: round(max(p for _, p in values) / MIB) for key, values in timings.items()}}
    print(f"\ncost: SNP at 0.5 on {found['model']}, {args.cost_samples} samples: {found['snp_s']} s "
          f"({found['ratio']}x; --criterion variance --reconstruct-target self) and {found['snp_defaults_s']} s "
          f"({found['ratio_defaults']}x; defaults) against {found['inference_s']} s of plain inference; "
          f"peak RSS added {found['peak_mib']}")
    return found


MARK = {"pruned-on-target": "✓", "refused-with-reason": "R", "pruned": "✓", "unchanged": "="}


def _cell(rows: list[dict[str, Any]]) -> str:
    """One table cell: per target, ✓ with the MAC ratio, R (refused, reason in zoo.json), = (nothing to
    change) or the FAIL kind."""
    parts = []
    for row in rows:
        mark = MARK.get(row["status"], row["status"].replace("FAIL:", "✗ "))
        ratio = row["macs_ratio"]
        parts.append(mark + (f" {ratio:.2f}" if mark == "✓" and ratio is not None and ratio < 0.995 else ""))
    return " / ".join(parts)


def tables(rows: list[dict[str, Any]], slow: float) -> str:
    runs = [r for r in RUNS if any(row["run"] == r for row in rows)]
    lines = ["| model | " + " | ".join(runs) + " | slowest run | peak RSS |", "|---" * (len(runs) + 3) + "|"]
    for label in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == label]
        cells = [_cell([row for row in mine if row["run"] == run]) or "" for run in runs]
        slowest = max(mine, key=lambda row: row["seconds"])
        peak = max((row["peak_mib"] or 0) for row in mine)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {slowest['seconds']:.1f} s ({slowest['run']}) | "
                     f"{peak:.0f} MiB |")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append("\n" + ", ".join(f"{key}: {value}" for key, value in sorted(counts.items())) + f" ({len(rows)} runs)")
    over = [row for row in rows if row["seconds"] > slow]
    lines.append(f"runs above {slow:.0f} s: " + ("; ".join(f"{r['model']} {r['run']} {r['target']}: "
                                                          f"{r['seconds']:.0f} s" for r in over) or "none"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=[*SETS, "none"], default=list(SETS),
                        help="model sets to sweep ('none': only the SNP cost measurement)")
    parser.add_argument("--runs", nargs="+", default=["all"], help=f"run ids ({', '.join(RUNS)}) or all")
    parser.add_argument("--models", nargs="+", default=None,
                        help="only these models of the sets (names without the exporter, e.g. resnext)")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--large-runs", nargs="+", default=["magnitude", "snp"])
    parser.add_argument("--large-targets", nargs="+", type=float, default=[0.5])
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per run")
    parser.add_argument("--slow", type=float, default=300.0, help="report runs above this many seconds")
    parser.add_argument("--cost-samples", type=int, default=256)
    parser.add_argument("--cost-repeats", type=int, default=1)
    parser.add_argument("--cost-rows-per-channel", type=int, default=DEFAULT_ROWS_PER_CHANNEL,
                        help="--calib-rows-per-channel of the cost runs (0: Grams from every position)")
    parser.add_argument("--no-cost", action="store_true", help="skip the SNP cost measurement")
    parser.add_argument("--output", type=Path, default=RESULTS / "zoo")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the passes' warnings are in each run's report; the table is the output
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    found: dict[str, Any] = {"machine": info, "command": sys.argv, "rows": []}
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        if not args.no_cost:
            found["cost"] = cost(args, folder)
        start = time.perf_counter()
        for kind in [kind for kind in args.sets if kind != "none"]:  # one set at a time, exported when it starts
            chosen = [entry for entry in models([kind], folder)
                      if args.models is None or entry[1].split(" (")[0] in args.models]
            sweep(chosen, args, folder, found)
        found["sweep_s"] = round(time.perf_counter() - start)
    save(found, args)
    print("\n" + tables(found["rows"], args.slow))
    print(f"\nwrote {args.output.with_suffix('.json')} and {args.output.with_suffix('.md')}; sweep {found['sweep_s']} s")


if __name__ == "__main__":
    sys.exit(main())

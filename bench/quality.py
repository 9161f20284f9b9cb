"""Quality under deep cuts: SNP's reconstruction targets side by side with magnitude, no retraining.

The digits ResNet and the pre-norm transformer of bench/snp_curves.py (trained here, seeded, offline) are
pruned to 0.7, 0.5 and 0.3 of their MACs by
  magnitude          L1 magnitude;
  snp-self           SNP, one-shot, each consumer reconstructing its own pruned units (--reconstruct-target self);
  snp-sequential     SNP --sequential: groups cut one at a time, re-measured on the partly pruned model, each
                     still reconstructing its own activations;
  snp-original       SNP with error-correcting reconstruction (--reconstruct-target original): every consumer
                     refitted, in topological order, to the original model's pre-activation from the pruned
                     model's input;
  snp-output-*       the same two reconstruction targets with the output criterion (--criterion output);
  snp-*sensitivity   snp-self and snp-original with sensitivity-aware budgets (--budget-by sensitivity): each
                     group's cut weighed by its probed effect on the model's output;
  *-repair           the same, then --repair STEPS (default 1000, --repair-steps): the pruned weights distilled
                     toward the dense model's logits on the calibration samples (Adam, lr 1e-3, a tenth of them
                     held out to keep the best weights); its cost is reported beside the wall time.
Channel counts use the default rounding (--round-to auto). Calibration data are the first --calib training
samples; accuracy and the relative L2 error of the logits are measured on the held-out test split (never the
calibration samples) in onnxruntime. Per call the wall time of `graphopt.optimize` is reported (one call per
method and target, the method order rotating between targets; not a timing benchmark).

    python bench/quality.py                    # both models, targets 0.7,0.5,0.3; results in bench/results/
    python bench/quality.py --quick            # fewer epochs and sequences (a smoke run)
    python bench/quality.py --targets 0.5,0.3 --methods snp-self,snp-self-repair,snp-original,snp-original-repair,\
        snp-original-sensitivity,snp-original-sensitivity-repair   # repair beside one-shot SNP
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import graphopt
from common import SNP_EARLIER, accuracy, methods_and_targets, predict, start_run
from snp_curves import RESULTS, Task, add_task_arguments, build_task, quick_training

METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    "snp-self": {"method": "snp", **SNP_EARLIER},
    "snp-sequential": {"method": "snp", "sequential": True, **SNP_EARLIER},
    "snp-original": {"method": "snp", **SNP_EARLIER, "reconstruct_target": "original"},
    "snp-output-self": {"method": "snp", "criterion": "output", "reconstruct_target": "self"},
    "snp-output-original": {"method": "snp", "criterion": "output", "reconstruct_target": "original"},
    "snp-sensitivity": {"method": "snp", "budget_by": "sensitivity", **SNP_EARLIER},
    "snp-original-sensitivity": {"method": "snp", **SNP_EARLIER, "reconstruct_target": "original",
                                 "budget_by": "sensitivity"},
}
REPAIR_STEPS = 1000
METHODS.update({f"{name}-repair": {**METHODS[name], "repair": REPAIR_STEPS}
                for name in ("snp-self", "snp-original", "snp-original-sensitivity")})
MODELS = ("resnet-digits", "transformer")
TARGETS = (0.7, 0.5, 0.3)


def run_one(task: Task, method: str, target: float, threads: int) -> dict[str, Any]:
    start = time.perf_counter()
    result = graphopt.optimize(task.model, target_macs=target, calib=task.calib, threads=threads, **METHODS[method])
    seconds = time.perf_counter() - start
    logits = predict(result.model, task.test)
    stats = result.report["passes"][-1].get("stats", {})
    repair = result.report.get("repair", {})
    return {"model": task.name, "method": method, "target": target, "accuracy": accuracy(logits, task.labels),
            "macs_ratio": result.report["macs_ratio"],
            "test_rel_l2": float(np.linalg.norm(logits - task.dense_logits) / np.linalg.norm(task.dense_logits)),
            "consumers_error_corrected": stats.get("consumers_error_corrected"), "seconds": seconds,
            "repair_seconds": repair.get("seconds"), "repair": repair or None}


def run_task(task: Task, targets: tuple[float, ...], methods: list[str], threads: int) -> None:
    task.dense_logits = predict(task.model, task.test)
    task.dense_accuracy = accuracy(task.dense_logits, task.labels)
    for index, target in enumerate(targets):
        for name in methods[index % len(methods):] + methods[:index % len(methods)]:
            task.rows.append(run_one(task, name, target, threads))


def row(task: Task, method: str, target: float) -> dict[str, Any]:
    return next(r for r in task.rows if r["method"] == method and r["target"] == target)


def print_task(task: Task, targets: tuple[float, ...], methods: list[str]) -> None:
    print(f"\n## {task.name}: {task.description}")
    print(f"dense test accuracy {task.dense_accuracy:.4f} on {len(task.labels)} test samples "
          f"(calibration {len(next(iter(task.calib.values())))} training samples)")
    for title, cell in (("test accuracy (MACs ratio reached)", lambda r: f"{r['accuracy']:.4f} ({r['macs_ratio']:.3f})"),
                        ("relative L2 error of the test logits", lambda r: f"{r['test_rel_l2']:.4f}"),
                        ("optimize wall time, s", lambda r: f"{r['seconds']:.2f}"),
                        ("of which repair, s",
                         lambda r: "-" if r["repair_seconds"] is None else f"{r['repair_seconds']:.2f}")):
        print(title)
        print("target | " + " | ".join(f"{m:>19s}" for m in methods))
        for target in targets:
            print(f"{target:6.2f} | " + " | ".join(f"{cell(row(task, m, target)):>19s}" for m in methods))


def _cell(found: dict[str, Any], errors: bool) -> str:
    """Accuracy %; with `errors` also the relative L2 error of the test logits, and a repair's seconds."""
    if not errors:
        return f"{100 * found['accuracy']:.1f}"
    cost = "" if found["repair_seconds"] is None else f"; {found['repair_seconds']:.1f} s"
    return f"{100 * found['accuracy']:.1f} ({found['test_rel_l2']:.3f}{cost})"


def readme_table(tasks: list[Task], targets: tuple[float, ...], methods: list[str]) -> str:
    lines = ["| model | dense | MACs | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for task in tasks:
        for target in targets:
            cells = [_cell(row(task, m, target), any("repair" in METHODS[m] for m in methods)) for m in methods]
            lines.append(f"| {task.name} | {100 * task.dense_accuracy:.1f} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated MAC ratios")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    add_task_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for quality.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: epoch scale 0.3, 2000 sequences")
    parser.add_argument("--repair-steps", type=int, default=REPAIR_STEPS, help="--repair STEPS of the *-repair methods")
    args = parser.parse_args()
    for name in METHODS:
        if "repair" in METHODS[name]:
            METHODS[name]["repair"] = args.repair_steps
    if args.quick:
        quick_training(args)
    return args


def main() -> int:
    args = parse_args()
    methods, listed = methods_and_targets(args.methods, args.targets, METHODS)
    targets = tuple(listed)
    info = start_run(args)
    start = time.perf_counter()
    tasks = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            task = build_task(name, args, Path(workdir))
            run_task(task, targets, methods, args.ort_threads)
            print_task(task, targets, methods)
            tasks.append(task)
    table = readme_table(tasks, targets, methods)
    print("\n## README table (held-out test accuracy %)\n" + table)
    total = time.perf_counter() - start
    print(f"\ntotal runtime {total:.1f} s")
    if args.quick:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "total_seconds": total,
               "methods": METHODS, "targets": targets, "readme_table": table,
               "models": [{"name": t.name, "description": t.description, "dense_accuracy": t.dense_accuracy,
                           "test_samples": len(t.labels), "rows": t.rows} for t in tasks]}
    (args.out / "quality.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

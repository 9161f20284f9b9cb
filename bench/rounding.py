"""Does `--round-to auto` cost fidelity? The same method and MAC target with exact channel counts
(`--round-to 1`) and with the default block rounding, on models trained here and on the committed sample.

Models: the committed digits CNN (samples/, test split shipped with it) and the four models
bench/snp_curves.py trains (MLPs on breast cancer and wine, a ResNet-style CNN on digits, a pre-norm
transformer encoder on a synthetic sequence task), each calibrated on training samples and scored on its
held-out test split. Per (model, method, target, rounding): test accuracy, relative L2 error of the test
logits against the dense model's, the MACs reached and the largest channel multiple the run used (auto
relaxes its blocks where they would miss the target). Output: a Markdown table and
bench/results/rounding.json.

    python bench/rounding.py            # about 2 minutes on 2 cores
    python bench/rounding.py --quick    # fewer training epochs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, predict, start_run  # noqa: E402
from snp_curves import Task, add_task_arguments, build_task, quick_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("digits-cnn", "mlp-cancer", "mlp-wine", "resnet-digits", "transformer")


def digits_sample() -> Task:
    samples = ROOT / "samples"
    test = dict(np.load(samples / "digits_eval.npz"))
    return Task("digits-cnn", "the committed digits CNN (samples/)", onnx.load(samples / "digits_cnn.onnx"),
                dict(np.load(samples / "digits_calib.npz")), test, np.load(samples / "digits_eval_labels.npy"), 0.0)


def largest_multiple(report: dict[str, Any]) -> int | None:
    values = [p.get("stats", {}).get("channel_multiple_max") for p in report["passes"]]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def run(task: Task, method: str, target: float, rounding: str, threads: int) -> dict[str, Any]:
    result = graphopt.optimize(task.model, method=method, target_macs=target, calib=task.calib,
                               round_to=rounding, threads=threads)
    logits = predict(result.model, task.test)
    dense = task.dense_logits
    return {"model": task.name, "method": method, "target": target, "round_to": rounding,
            "macs_ratio": result.report["macs_ratio"], "multiple": largest_multiple(result.report),
            "accuracy": accuracy(logits, task.labels),
            "test_rel_l2": float(np.linalg.norm(logits - dense) / np.linalg.norm(dense))}


def table(rows: list[dict[str, Any]], dense: dict[str, float]) -> str:
    lines = ["| model | method | target | exact: MACs / acc % / rel_l2 | auto: MACs / acc % / rel_l2 (multiple) |",
             "|---|---|---|---|---|"]
    keyed = {(r["model"], r["method"], r["target"], r["round_to"]): r for r in rows}
    for (model, method, target, rounding), exact in keyed.items():
        if rounding != "1":
            continue
        auto = keyed[(model, method, target, "auto")]
        cell = lambda r: f"{r['macs_ratio']:.3f} / {100 * r['accuracy']:.1f} / {r['test_rel_l2']:.3f}"  # noqa: E731
        lines.append(f"| {model} (dense {100 * dense[model]:.1f}) | {method} | {target} | {cell(exact)} | "
                     f"{cell(auto)} ({auto['multiple']}) |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="snp,magnitude")
    parser.add_argument("--targets", default="0.7,0.5")
    add_task_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="epoch scale 0.3, 2000 sequences")
    parser.add_argument("--output", type=Path, default=RESULTS / "rounding.json")
    args = parser.parse_args()
    if args.quick:
        quick_training(args)
    return args


def main() -> int:
    args = parse_args()
    info = start_run(args)
    rows: list[dict[str, Any]] = []
    dense: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            task = digits_sample() if name == "digits-cnn" else build_task(name, args, Path(workdir))
            task.dense_logits = predict(task.model, task.test)
            dense[name] = accuracy(task.dense_logits, task.labels)
            for method in args.methods.split(","):
                for target in (float(t) for t in args.targets.split(",")):
                    for rounding in ("1", "auto"):
                        rows.append(run(task, method, target, rounding, args.ort_threads))
                        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, dense)
    print("\n" + text)
    worse = [(e, a) for e in rows if e["round_to"] == "1" for a in rows
             if a["round_to"] == "auto" and (a["model"], a["method"], a["target"]) == (e["model"], e["method"], e["target"])
             and a["test_rel_l2"] > e["test_rel_l2"] * 1.05]
    print(f"\nauto worse than exact (test rel_l2 more than 5% higher): {len(worse)} of {len(rows) // 2}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": info, "dense_accuracy": dense, "rows": rows,
                                                        "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does ExPrune's default tolerance search keep its promise on unseen data? Many seeds, with and without
the confidence margin.

For each seed (a new stratified 70/30 split of scikit-learn's digits and a new initialisation), the digits
MLP and CNN of bench/exprune_digits.py are trained, exported (legacy exporter, opset 17) and pruned by SNP
to `--snp-target` of their MACs; on each of the 4 bases, for each rule (threshold, sequential, auto: 12 settings),
graphopt.optimize(method="exprune") runs with the training split as calibration data and default options
(tolerance top1=0.99 checked on a seeded held-out quarter, 314 samples) at `exprune_confidence` 0.95 (the
default: a Clopper-Pearson lower bound on held-out agreement) and at 0 (the held-out value itself, the
search's behaviour before the margin). On the test split (540 samples) it measures the top-1 agreement
with the base model (the tolerance: >= 0.99 holds), the accuracy drop against the base (<= 1 point is the
practical promise; agreement >= 0.99 implies it), and the MACs skipped per input as a fraction of the whole
base model (graphopt's reference helpers on the ExPrune nodes' real inputs, as in bench/exprune_digits.py).

    python bench/exprune_margin.py --calibration unseen --held-out 0.5 --models mlp cnn   # 20 seeds x 12 x 2, ~25 min
    python bench/exprune_margin.py --calibration train                   # the training split, ~20 min
    python bench/exprune_margin.py --seeds 3                             # a quick look
    python bench/exprune_margin.py --replot bench/results/exprune_margin_unseen.json   # redraw the PNG

`unseen` trains on a stratified half of the training split and calibrates on the other half; digits is small,
so `--held-out 0.5` holds out 314 of those 629 samples (a quarter, 157, cannot certify top1=0.99 at 95%).
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
import onnx
import torch
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphopt  # noqa: E402
from common import SNP_EARLIER, accuracy, add_thread_arguments, start_run, train  # noqa: E402
from exprune_digits import MODELS, RULES, data, model_macs, predictions, test_skips  # noqa: E402
from graphopt.torch.export import export_onnx  # noqa: E402

CONFIDENCES = (0.95, 0.0)
RESULTS = Path(__file__).resolve().parent / "results"


def splits(name: str, seed: int, calibration: str) -> tuple[np.ndarray, ...]:
    """(x_fit, y_fit, x_calib, x_test, y_test): `train` calibrates on the training split itself; `unseen`
    trains on a stratified half of it and calibrates on the other half, which the model never saw."""
    x_train, x_test, y_train, y_test = data(name, seed)
    if calibration == "train":
        return x_train, y_train, x_train, x_test, y_test
    x_fit, x_calib, y_fit, _ = train_test_split(x_train, y_train, test_size=0.5, stratify=y_train,
                                                random_state=seed)
    return x_fit, y_fit, x_calib, x_test, y_test


def bases(name: str, seed: int, calibration: str, snp_target: float, threads: int,
          tmp: Path) -> tuple[dict, dict[str, Any]]:
    """The trained dense model and its SNP-pruned copy, with the seed's split."""
    title, build, options = MODELS[name]
    x_fit, y_fit, x_calib, x_test, y_test = splits(name, seed, calibration)
    torch.manual_seed(seed)
    module = build()
    train(module, x_fit, y_fit, seed=seed, **options)
    dense = onnx.load(export_onnx(module, torch.from_numpy(x_fit[:2]), tmp / f"{name}_{seed}.onnx",
                                  exporter="legacy", opset=17))
    calib = {dense.graph.input[0].name: x_calib}
    snp = graphopt.optimize(dense, method="snp", target_macs=snp_target, calib=calib, threads=threads,
                            **SNP_EARLIER).model
    return {"dense": dense, "snp": snp}, {"calib": calib, "x_test": x_test, "y_test": y_test}


def run_setting(base: onnx.ModelProto, split: dict[str, Any], rule: str, confidence: float, seed: int,
                threads: int, held_out: float | None) -> dict[str, Any]:
    x_test, y_test = split["x_test"], split["y_test"]
    base_logits = predictions(base, x_test)
    extra = {} if held_out is None else {"exprune_held_out": held_out}
    result = graphopt.optimize(base, method="exprune", calib=split["calib"], exprune_rule=rule, seed=seed,
                               threads=threads, exprune_confidence=confidence, exprune_layers="all",
                               exprune_dense_rows=0, **extra)  # the op at every batch: the test set is batched
    stats = result.report["passes"][-1]["stats"]
    logits = predictions(result.model, x_test)
    base_macs, _ = model_macs(base, x_test)
    skipped = test_skips(result.model, x_test)["skipped_macs"] if result.report["passes"][-1]["modified"] else 0.0
    agreement = float(np.mean(logits.argmax(axis=1) == base_logits.argmax(axis=1)))
    drop = accuracy(base_logits, y_test) - accuracy(logits, y_test)
    return {"confidence": confidence, "fnr": stats.get("fnr_level"), "fnr_rejected": stats.get("fnr_rejected"),
            "held_out_top1": stats.get("held_out_top1"), "held_out_bound": stats.get("held_out_top1_lower_bound"),
            "test_agreement": agreement, "test_disagreements": int(round((1 - agreement) * len(x_test))),
            "accuracy_drop": drop, "macs_skipped": skipped / base_macs,
            "tolerance_holds": agreement >= 0.99 - 1e-12, "drop_within_1": drop <= 0.01 + 1e-9}


def summarise(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": []}
    keys = sorted({(r["model"], r["base"], r["rule"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0]), k[1:]))
    for model, base, rule in keys:
        entry: dict[str, Any] = {"model": model, "base": base, "rule": rule}
        for confidence in CONFIDENCES:
            sub = [r for r in rows if (r["model"], r["base"], r["rule"], r["confidence"]) ==
                   (model, base, rule, confidence)]
            entry[str(confidence)] = {
                "seeds": len(sub), "tolerance_holds": sum(r["tolerance_holds"] for r in sub),
                "drop_within_1": sum(r["drop_within_1"] for r in sub),
                "macs_skipped_mean": float(np.mean([r["macs_skipped"] for r in sub])),
                "worst_agreement": min(r["test_agreement"] for r in sub),
                "worst_drop": max(r["accuracy_drop"] for r in sub),
                "fnr_median": float(np.median([r["fnr"] if r["fnr"] is not None else 0.0 for r in sub])),
                "nothing_replaced": sum(r["fnr"] is None for r in sub)}
        out["settings"].append(entry)
    for confidence in CONFIDENCES:
        sub = [r for r in rows if r["confidence"] == confidence]
        out[str(confidence)] = {"runs": len(sub), "tolerance_holds": sum(r["tolerance_holds"] for r in sub),
                                "drop_within_1": sum(r["drop_within_1"] for r in sub),
                                "macs_skipped_mean": float(np.mean([r["macs_skipped"] for r in sub]))}
    return out


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{'model':5}{'base':7}{'rule':11}| {'confidence 0.95: holds / <=1pt / skipped / worst':50}"
          f"| {'confidence 0: holds / <=1pt / skipped / worst':48}")
    for s in summary["settings"]:
        cells = []
        for confidence in CONFIDENCES:
            c = s[str(confidence)]
            cells.append(f"{c['tolerance_holds']:2}/{c['seeds']} {c['drop_within_1']:2}/{c['seeds']} "
                         f"{100 * c['macs_skipped_mean']:5.1f}% agree>={100 * c['worst_agreement']:5.1f}% "
                         f"drop<={100 * c['worst_drop']:4.2f} fnr~{c['fnr_median']:g}")
        print(f"{s['model']:5}{s['base']:7}{s['rule']:11}| {cells[0]:50}| {cells[1]:48}")
    for confidence in CONFIDENCES:
        c = summary[str(confidence)]
        print(f"confidence {confidence}: tolerance held in {c['tolerance_holds']}/{c['runs']} runs "
              f"({100 * c['tolerance_holds'] / c['runs']:.1f}%), drop <= 1 point in {c['drop_within_1']}/{c['runs']}, "
              f"mean MACs skipped {100 * c['macs_skipped_mean']:.2f}% of the whole model")


def plot(payload: dict[str, Any], path: Path) -> None:
    """Test agreement against MACs skipped, one point per run, by confidence and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for confidence, colour in zip(CONFIDENCES, ("C0", "C3")):
        for model, marker in zip(MODELS, ("o", "s")):
            sub = [r for r in payload["rows"] if r["confidence"] == confidence and r["model"] == model]
            ax.scatter([100 * r["macs_skipped"] for r in sub], [100 * r["test_agreement"] for r in sub], s=14,
                       marker=marker, color=colour, alpha=0.6, label=f"{model}, confidence {confidence:g}")
    ax.axhline(99.0, color="grey", linewidth=0.8)
    ax.set_xlabel("MACs skipped on the test split (% of the whole base model)")
    ax.set_ylabel("top-1 agreement with the base model on the test split (%)")
    ax.set_title(f"ExPrune default search, {len(payload['seeds'])} seeds x 8 settings, calibration: "
                 f"{payload['calibration']} (grey: the tolerance, 99%)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--snp-target", type=float, default=0.7)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--calibration", choices=("unseen", "train"), default="unseen",
                        help="unseen: train on half the training split, calibrate on the other half; train: "
                             "calibrate on the training split itself")
    parser.add_argument("--held-out", type=float, default=None,
                        help="exprune_held_out (default: the pass's default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of a results JSON")
    add_thread_arguments(parser)
    args = parser.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    info = start_run(args)
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for name in args.models:
                models, split = bases(name, seed, args.calibration, args.snp_target, args.ort_threads, Path(tmp))
                for label, base in models.items():
                    for rule in RULES:
                        for confidence in CONFIDENCES:
                            row = {"seed": seed, "model": name, "base": label, "rule": rule,
                                   **run_setting(base, split, rule, confidence, seed, args.ort_threads,
                                                 args.held_out)}
                            rows.append(row)
                            print(f"seed {seed:2} {name:4} {label:6} {rule:10} c={confidence:<5g} fnr {row['fnr']!s:6} "
                                  f"held-out {row['held_out_top1']!s:.6} test agree {100 * row['test_agreement']:6.2f}% "
                                  f"drop {100 * row['accuracy_drop']:+5.2f} skipped {100 * row['macs_skipped']:5.1f}%"
                                  + ("" if row["tolerance_holds"] else "  <- tolerance missed"), flush=True)
    summary = summarise(rows)
    print_summary(summary)
    seconds = time.perf_counter() - started
    print(f"\nwall time {seconds:.0f} s")
    out = args.out or RESULTS / f"exprune_margin_{args.calibration}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": " ".join(["python", *sys.argv]), "calibration": args.calibration,
               "held_out": args.held_out, "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
               "snp_target": args.snp_target, "wall_seconds": seconds, "summary": summary, "rows": rows}
    out.write_text(json.dumps(payload, indent=1, default=float))
    plot(payload, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

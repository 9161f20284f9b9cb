"""Accuracy against MACs kept for SNP and the baselines, without retraining, on models trained here.

Four models are trained in this script, seeded and offline, on data that ships with scikit-learn or is
generated here: an MLP on breast cancer, an MLP on wine, a ResNet-style CNN with BatchNorm on the 8x8
digits, and a two-block pre-norm transformer encoder (hand-written attention, LayerNorm, GELU FFN) on a
synthetic sequence task (label = [count(a) > count(b)] XOR [count(c) > count(d)], which the attention
and the FFN must solve together). Each is exported with the legacy torch exporter (BN kept as nodes;
graphopt's pre-passes fold it) and pruned to each MAC target by every method, interleaved per target
(the method order rotates between repeats): random (seed 0), magnitude (L1), snp (ZCA ordering + LDL
cut + least-squares reconstruction of each consumer's own units, --reconstruct-target self), snp without
reconstruction, and snp with the output criterion (bench/quality.py compares the reconstruction targets).
Calibration data are the first --calib samples of the training split; accuracy is measured on the
held-out test split with onnxruntime. Reported per call: test accuracy, the MACs actually reached
(report macs_ratio) and the median wall time of `graphopt.optimize`.

    python bench/snp_curves.py                      # full run, results in bench/results/
    python bench/snp_curves.py --quick              # fewer epochs, targets 0.7 and 0.5, one repeat
    python bench/snp_curves.py --models mlp-wine,transformer --targets 0.5 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split
from torch import nn

import graphopt
from common import SNP_EARLIER, BasicBlock, accuracy, add_thread_arguments, predict, start_run, train
from graphopt.torch.export import export_onnx

METHODS: dict[str, dict[str, Any]] = {
    "random": {"method": "random", "seed": 0},
    "magnitude": {"method": "magnitude"},
    "snp": {"method": "snp", **SNP_EARLIER},
    "snp-norecon": {"method": "snp", "reconstruct": False, **SNP_EARLIER},
    "snp-output": {"method": "snp", "criterion": "output", "reconstruct_target": "self"},
}
TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
MODELS = ("mlp-cancer", "mlp-wine", "resnet-digits", "transformer")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Task:
    name: str
    description: str
    model: onnx.ModelProto
    calib: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    labels: np.ndarray
    train_seconds: float
    dense_accuracy: float = 0.0
    dense_logits: np.ndarray | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- models


def digits_resnet(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + FFN(LN(x)) with a GELU FFN (or `activation`'s)."""

    def __init__(self, d_model: int, heads: int, d_ff: int, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.k, self.v, self.out = (nn.Linear(d_model, d_model) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), activation(), nn.Linear(d_ff, d_model))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, d_model = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        query, key, value = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_dim)
        context = torch.matmul(scores.softmax(dim=-1), value)
        return self.out(context.transpose(1, 2).reshape(batch, tokens, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class SequenceClassifier(nn.Module):
    def __init__(self, vocab: int, tokens: int, d_model: int, heads: int, d_ff: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(tokens, d_model) * 0.1)
        self.blocks = nn.Sequential(*(EncoderBlock(d_model, heads, d_ff) for _ in range(blocks)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(ids) + self.position)
        return self.head(self.norm(x).mean(dim=1))


# ---------------------------------------------------------------- data and training


def sequence_task(samples: int, tokens: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int64) and labels [count(2) > count(3)] XOR [count(4) > count(5)], ties resampled."""
    rng = np.random.default_rng(seed)
    ids = np.empty((0, tokens), np.int64)
    while len(ids) < samples:
        draw = rng.integers(0, vocab, size=(2 * samples, tokens))
        counts = np.stack([(draw == t).sum(axis=1) for t in (2, 3, 4, 5)], axis=1)
        clear = (counts[:, 0] != counts[:, 1]) & (counts[:, 2] != counts[:, 3])
        ids = np.concatenate([ids, draw[clear]])
    ids = ids[:samples]
    counts = np.stack([(ids == t).sum(axis=1) for t in (2, 3, 4, 5)], axis=1)
    labels = ((counts[:, 0] > counts[:, 1]) ^ (counts[:, 2] > counts[:, 3])).astype(np.int64)
    return ids, labels


def standardised_split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32), \
        y_train.astype(np.int64), y_test.astype(np.int64)


def make_task(name: str, description: str, module: nn.Module, x_train: np.ndarray, y_train: np.ndarray,
              x_test: np.ndarray, y_test: np.ndarray, args: argparse.Namespace, workdir: Path,
              **train_options: Any) -> Task:
    torch.manual_seed(args.seed)
    seconds = train(module, x_train, y_train, seed=args.seed, **train_options)
    path = export_onnx(module, torch.from_numpy(x_train[:2]), workdir / f"{name}.onnx", exporter="legacy",
                       opset=17, fold_bn=False)
    return Task(name, description, onnx.load(path), {"input": x_train[:args.calib]}, {"input": x_test},
                y_test, seconds)


def epochs(base: int, args: argparse.Namespace) -> int:
    return max(1, round(base * args.epoch_scale))


def build_task(name: str, args: argparse.Namespace, workdir: Path) -> Task:
    torch.manual_seed(args.seed)
    if name in ("mlp-cancer", "mlp-wine"):
        loader, hidden = (load_breast_cancer, 128) if name == "mlp-cancer" else (load_wine, 64)
        data = loader()
        x_train, x_test, y_train, y_test = standardised_split(data.data, data.target, args.seed)
        classes = int(data.target.max()) + 1
        module = nn.Sequential(nn.Linear(x_train.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                               nn.ReLU(), nn.Linear(hidden, classes))
        description = f"MLP {x_train.shape[1]}-{hidden}-{hidden}-{classes} on {loader.__name__[5:]}"
        return make_task(name, description, module, x_train, y_train, x_test, y_test, args, workdir,
                         epochs=epochs(100, args), batch=32, lr=3e-3, weight_decay=1e-4)
    if name == "resnet-digits":
        data = load_digits()
        images = (data.images / 16.0).reshape(-1, 1, 8, 8)
        x_train, x_test, y_train, y_test = train_test_split(images, data.target, test_size=0.3,
                                                            stratify=data.target, random_state=args.seed)
        width = 24
        module = digits_resnet(width)
        return make_task(name, f"ResNet (BN, 2 basic blocks, {width}/{2 * width} ch) on digits 8x8", module,
                         x_train.astype(np.float32), y_train.astype(np.int64), x_test.astype(np.float32),
                         y_test.astype(np.int64), args, workdir, epochs=epochs(30, args), batch=64, lr=3e-3)
    if name == "transformer":
        tokens, vocab, d_model, d_ff, blocks = 16, 10, 32, 128, 2
        x_train, y_train = sequence_task(args.seq_train, tokens, vocab, args.seed)
        x_test, y_test = sequence_task(2000, tokens, vocab, args.seed + 1)
        module = SequenceClassifier(vocab, tokens, d_model, 4, d_ff, blocks)
        description = (f"pre-norm encoder ({blocks} blocks, d={d_model}, 4 heads, FFN {d_ff}, GELU) "
                       f"on synthetic count-XOR, {tokens} tokens")
        return make_task(name, description, module, x_train, y_train, x_test, y_test, args, workdir,
                         epochs=epochs(30, args), batch=64, lr=2e-3, weight_decay=1e-2)
    raise SystemExit(f"unknown model {name!r} (choose from {', '.join(MODELS)})")


# ---------------------------------------------------------------- measuring


def run_one(task: Task, method: str, target: float, threads: int) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    result = graphopt.optimize(task.model, target_macs=target, calib=task.calib, threads=threads, **METHODS[method])
    seconds = time.perf_counter() - start
    logits = predict(result.model, task.test)
    method_stats = result.report["passes"][-1].get("stats", {})
    row = {
        "model": task.name, "method": method, "target": target,
        "accuracy": accuracy(logits, task.labels),
        "macs_ratio": result.report["macs_ratio"],
        # relative L2 error of the test logits against the dense model's: finer than accuracy
        "test_rel_l2": float(np.linalg.norm(logits - task.dense_logits) / np.linalg.norm(task.dense_logits)),
        "calib_rel_l2": result.report["fidelity"].get("rel_l2"),
        "calib_top1_agreement": result.report["fidelity"].get("top1_agreement"),
        "channels_removed": method_stats.get("channels_removed"),
        "skipped": result.report["passes"][-1].get("skipped", []),
    }
    return row, seconds


def run_task(task: Task, targets: tuple[float, ...], repeats: int, threads: int) -> None:
    """All methods side by side at each target; the order rotates each repeat; times are medians."""
    task.dense_logits = predict(task.model, task.test)
    task.dense_accuracy = accuracy(task.dense_logits, task.labels)
    names = list(METHODS)
    for target in targets:
        rows: dict[str, dict[str, Any]] = {}
        times: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                row, seconds = run_one(task, name, target, threads)
                if name in rows and rows[name]["accuracy"] != row["accuracy"]:
                    raise RuntimeError(f"{task.name} {name} @ {target}: accuracy differs between repeats")
                rows[name] = row
                times[name].append(seconds)
        for name in names:
            rows[name].update(seconds=statistics.median(times[name]), seconds_all=times[name])
            task.rows.append(rows[name])


# ---------------------------------------------------------------- reporting


def lookup(task: Task, method: str, target: float) -> dict[str, Any] | None:
    return next((r for r in task.rows if r["method"] == method and r["target"] == target), None)


def print_tables(task: Task, targets: tuple[float, ...], repeats: int) -> None:
    names = list(METHODS)
    print(f"\n## {task.name}: {task.description}")
    print(f"dense test accuracy {task.dense_accuracy:.4f} on {len(task.labels)} test samples "
          f"(calibration {len(next(iter(task.calib.values())))} training samples; trained in {task.train_seconds:.1f} s)")
    print("accuracy (MACs ratio reached)")
    print("target | " + " | ".join(f"{n:>16s}" for n in names))
    for target in targets:
        cells = [f"{r['accuracy']:.4f} ({r['macs_ratio']:.3f})" for r in (lookup(task, n, target) for n in names)]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>16s}" for c in cells))
    print("relative L2 error of the test logits against the dense model")
    print("target | " + " | ".join(f"{n:>11s}" for n in names))
    for target in targets:
        cells = [f"{lookup(task, n, target)['test_rel_l2']:.4f}" for n in names]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>11s}" for c in cells))
    print(f"optimize wall time, s (median of {repeats})")
    print("target | " + " | ".join(f"{n:>11s}" for n in names))
    for target in targets:
        cells = [f"{lookup(task, n, target)['seconds']:.3f}" for n in names]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>11s}" for c in cells))


def drop_ratio(task: Task, method: str, target: float) -> float | None:
    """method's accuracy drop / magnitude's drop at `target` (None if magnitude did not drop)."""
    row, base = lookup(task, method, target), lookup(task, "magnitude", target)
    if row is None or base is None:
        return None
    base_drop = task.dense_accuracy - base["accuracy"]
    return (task.dense_accuracy - row["accuracy"]) / base_drop if base_drop > 0 else None


def _compare(task: Task, method: str, baseline: str, targets: tuple[float, ...]) -> dict[str, Any]:
    """Per target: accuracy win/tie/loss of `method` over `baseline`, and whether its test error is lower."""
    outcome: dict[str, Any] = {"accuracy_wins": [], "accuracy_ties": [], "accuracy_losses": [], "error_lower": []}
    for target in targets:
        row, base = lookup(task, method, target), lookup(task, baseline, target)
        difference = row["accuracy"] - base["accuracy"]
        key = "accuracy_wins" if difference > 0 else "accuracy_ties" if difference == 0 else "accuracy_losses"
        outcome[key].append({"target": target, method: row["accuracy"], baseline: base["accuracy"]})
        outcome["error_lower"].append(row["test_rel_l2"] < base["test_rel_l2"])
    outcome["mean_accuracy_difference"] = float(np.mean(
        [lookup(task, method, t)["accuracy"] - lookup(task, baseline, t)["accuracy"] for t in targets]))
    return outcome


def verdicts(tasks: list[Task], targets: tuple[float, ...]) -> dict[str, Any]:
    return {task.name: {
        "snp_vs_magnitude": _compare(task, "snp", "magnitude", targets),
        "output_vs_snp": _compare(task, "snp-output", "snp", targets),
        "drop_ratio_at_0.5": {m: drop_ratio(task, m, 0.5) for m in ("snp", "snp-norecon", "snp-output", "random")},
        "drop_at_0.5": {m: task.dense_accuracy - lookup(task, m, 0.5)["accuracy"]
                        for m in METHODS if lookup(task, m, 0.5) is not None},
    } for task in tasks}


def _describe(outcome: dict[str, Any], method: str, baseline: str) -> str:
    def cells(key: str) -> str:
        return ", ".join(f"{o['target']} ({o[method]:.4f} vs {o[baseline]:.4f})" for o in outcome[key]) or "none"
    lower = sum(outcome["error_lower"])
    return (f"accuracy higher at {len(outcome['accuracy_wins'])}, equal at {cells('accuracy_ties')}, "
            f"lower at {cells('accuracy_losses')}; mean difference {outcome['mean_accuracy_difference']:+.4f}; "
            f"test logit error lower at {lower}/{len(outcome['error_lower'])} targets")


def print_verdicts(summary: dict[str, Any]) -> None:
    print("\n## verdicts")
    for name, verdict in summary.items():
        ratios = ", ".join(f"{m} {'n/a (magnitude did not drop)' if r is None else f'{r:.3f}'}"
                           for m, r in verdict["drop_ratio_at_0.5"].items())
        drops = ", ".join(f"{m} {d:+.4f}" for m, d in verdict["drop_at_0.5"].items())
        print(f"{name}:")
        print(f"  snp vs magnitude: {_describe(verdict['snp_vs_magnitude'], 'snp', 'magnitude')}")
        print(f"  snp-output vs snp: {_describe(verdict['output_vs_snp'], 'snp-output', 'snp')}")
        print(f"  accuracy drop at 0.5 (dense - pruned): {drops}")
        print(f"  drop at 0.5 / magnitude's drop: {ratios}")


def readme_table(tasks: list[Task]) -> str:
    names = list(METHODS)
    lines = ["| model | dense | MACs | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for task in tasks:
        for target in (0.7, 0.5):
            rows = [lookup(task, n, target) for n in names]
            if any(r is None for r in rows):
                continue
            cells = [f"{100 * r['accuracy']:.1f}" for r in rows]
            lines.append(f"| {task.name} | {100 * task.dense_accuracy:.1f} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(tasks: list[Task], path: Path) -> None:
    """Top row: test accuracy against the MACs reached; bottom row: relative test logit error (log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.6), squeeze=False, sharex="col")
    styles = {"random": ":", "magnitude": "--", "snp": "-", "snp-norecon": "-.", "snp-output": "-"}
    for column, task in enumerate(tasks):
        top, bottom = axes[0][column], axes[1][column]
        for name in METHODS:
            rows = sorted((r for r in task.rows if r["method"] == name), key=lambda r: r["macs_ratio"])
            macs = [r["macs_ratio"] for r in rows]
            top.plot(macs, [r["accuracy"] for r in rows], styles[name], marker="o", markersize=3, label=name)
            bottom.plot(macs, [max(r["test_rel_l2"], 1e-6) for r in rows], styles[name], marker="o", markersize=3)
        top.axhline(task.dense_accuracy, color="grey", linewidth=0.8, label="dense")
        top.set_title(task.name, fontsize=10)
        bottom.set_yscale("log")
        bottom.set_xlabel("MACs kept (reached)")
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
        top.invert_xaxis()
    axes[0][0].set_ylabel("test accuracy")
    axes[1][0].set_ylabel("rel. L2 error of test logits")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `build_task` reads (the training of the models), shared by the scripts that use them."""
    parser.add_argument("--calib", type=int, default=256, help="calibration samples from the training split")
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every model's training epochs")
    parser.add_argument("--seq-train", type=int, default=6000, help="training sequences for the transformer")
    parser.add_argument("--seed", type=int, default=0)
    add_thread_arguments(parser)


def quick_training(args: argparse.Namespace) -> None:
    """--quick's training: epoch scale 0.3, 2000 sequences."""
    args.epoch_scale, args.seq_train = 0.3, 2000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated MAC ratios")
    parser.add_argument("--repeats", type=int, default=5, help="optimize calls per method and target (median time)")
    add_task_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for snp_curves.json / .png")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~20 s): targets 0.7,0.5, one repeat, epoch scale 0.3, 2000 sequences")
    args = parser.parse_args()
    if args.quick:
        args.targets, args.repeats = "0.7,0.5", 1
        quick_training(args)
    return args


def main() -> int:
    args = parse_args()
    targets = tuple(float(t) for t in args.targets.split(","))
    info = start_run(args)
    start = time.perf_counter()
    tasks = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            task = build_task(name, args, Path(workdir))
            run_task(task, targets, args.repeats, args.ort_threads)
            print_tables(task, targets, args.repeats)
            tasks.append(task)
    summary = verdicts(tasks, targets)
    print_verdicts(summary)
    table = readme_table(tasks)
    print("\n## README table (test accuracy %, at 0.7 and 0.5 MACs)\n" + table)
    total = time.perf_counter() - start
    print(f"\ntotal runtime {total:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(tasks, args.out / "snp_curves.png")
    payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "total_seconds": total,
               "methods": METHODS, "targets": targets, "verdicts": summary, "readme_table": table,
               "models": [{"name": t.name, "description": t.description, "dense_accuracy": t.dense_accuracy,
                           "test_samples": len(t.labels), "train_seconds": t.train_seconds, "rows": t.rows}
                          for t in tasks]}
    (args.out / "snp_curves.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out / 'snp_curves.json'} and {args.out / 'snp_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

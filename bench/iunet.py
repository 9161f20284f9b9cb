"""IUNET on scikit-learn data: dense MLP against the pruned IUNET subnetwork, with ablations.

Data sets: breast cancer, wine, digits (64 tabular features) with an MLP 2x[hidden], and digits as 1x8x8
images with a small CNN (graphopt.torch.iunet.SmallCNN). Per seed: stratified 75/25 train/test split,
features standardised on the training part (images scaled to [0, 1]).

Variants (same architecture, same epochs):
  dense      torch's default initialisation, cross-entropy only, no pruning (the MLP baseline), trained
             2x epochs: the same number of steps as supernetwork + fine-tuning
  iunet      proactive init (kappa 0.125) + CE + lambda NT-Xent, global OMP at S, rewind, fine-tune under the mask
  no-init    iunet with torch's default initialisation instead of proactive
  no-cl      iunet with lambda = 0 (no contrastive term)
lambda: chosen per data set on seed 0 only, from {0.1, 0.5, 1.0}, by accuracy of the iunet subnetwork at
S = 0.8 on a 20% validation split of the training part (test data never seen); reported in the JSON.
Accuracy: mean +- std over seeds on the test part. Cost: the seed-0 subnetwork exported to ONNX and cleaned
by graphopt's dead-unit elimination against the dense export: MACs and onnxruntime latency (1 thread,
batch 1 and 256, interleaved, median of repeats).

    python bench/iunet.py                 # 5 seeds, sparsities 0.5 0.8 0.9 (~10 min on 2 cores)
    python bench/iunet.py --seeds 1 --epochs 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from graphopt.calibration.shapes import count_cost
from graphopt.torch import iunet
from graphopt.torch.export import export_onnx

LAMBDAS = (0.1, 0.5, 1.0)


def load(name: str, seed: int, validation: bool = False) -> tuple[torch.Tensor, ...]:
    loader = {"breast_cancer": load_breast_cancer, "wine": load_wine}.get(name, load_digits)
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    if validation:
        x_train, x_test, y_train, y_test = train_test_split(x_train, y_train, test_size=0.2, stratify=y_train,
                                                            random_state=seed)
    if name == "digits_image":
        x_train, x_test = (a.reshape(-1, 1, 8, 8) / 16.0 for a in (x_train, x_test))
    else:
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(x_train), torch.tensor(y_train), as_float(x_test), torch.tensor(y_test)


def builder(name: str, x: torch.Tensor, y: torch.Tensor, hidden: int):
    classes = int(y.max()) + 1
    if name == "digits_image":
        return (lambda: iunet.SmallCNN(channels=16, hidden=hidden // 2, classes=classes)), iunet.image_augment(1)
    return (lambda: iunet.MLP(x.shape[1], [hidden, hidden], classes)), iunet.tabular_augment(0.1, 0.1)


def run_variant(variant: str, name: str, data: tuple, sparsity: float, seed: int, lam: float,
                args: argparse.Namespace) -> torch.nn.Module:
    x, y, _, _ = data
    make, augment = builder(name, x, y, args.hidden)
    if variant == "dense":
        torch.manual_seed(seed)
        model = make()
        iunet.train(model, x, y, iunet.TrainConfig(epochs=2 * args.epochs, lr=args.lr, contrastive=0.0, seed=seed))
        return model
    supernet = iunet.TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed, contrastive=0.0 if variant == "no-cl" else lam)
    kappa = None if variant == "no-init" else 0.125
    return iunet.iunet(make, x, y, sparsity, augment=augment, kappa=kappa, supernet=supernet,
                       finetune=iunet.TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed, contrastive=0.0)).model


def choose_lambda(name: str, args) -> dict[str, float]:
    data = load(name, 0, validation=True)
    scores = {}
    for lam in LAMBDAS:
        model = run_variant("iunet", name, data, 0.8, 0, lam, args)
        scores[lam] = iunet.accuracy(model, data[2], data[3])
    return scores


def latency(paths: dict[str, Path], feeds: dict[int, np.ndarray], repeats: int) -> dict[str, dict[int, float]]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {key: onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for key, p in paths.items()}
    times: dict[str, dict[int, list[float]]] = {key: {b: [] for b in feeds} for key in paths}
    for _ in range(repeats):
        for batch, feed in feeds.items():
            for key, sess in sessions.items():  # interleaved
                start = time.perf_counter()
                for _ in range(20):
                    sess.run(None, {"input": feed})
                times[key][batch].append((time.perf_counter() - start) / 20 * 1e6)
    return {key: {b: statistics.median(v) for b, v in per.items()} for key, per in times.items()}


def cost(models: dict[str, torch.nn.Module], example: torch.Tensor, folder: Path, repeats: int) -> dict[str, dict]:
    paths, report = {}, {}
    for key, model in models.items():
        path = folder / f"{key}.onnx"
        if key == "dense":
            export_onnx(model.eval(), example, path, exporter="legacy", opset=17, fold_bn=True)
            macs = count_cost(onnx.load(str(path)), {"input": tuple(example.shape)})
            report[key] = {"macs": macs.macs, "params": macs.params, "bytes": path.stat().st_size}
        else:
            cleaned = iunet.export_cleaned(model, example, path)
            report[key] = {"macs": cleaned["macs_after"], "macs_before_cleanup": cleaned["macs_before"],
                           "params": cleaned["params_after"], "bytes": path.stat().st_size,
                           "cleanup_max_abs": cleaned["fidelity"]["max_abs"]}
        paths[key] = path
    rng = np.random.default_rng(0)
    feeds = {b: rng.standard_normal((b, *example.shape[1:])).astype(np.float32) for b in (1, 256)}
    timed = latency(paths, feeds, repeats)
    for key, per_batch in timed.items():
        report[key]["latency_us"] = {str(b): t for b, t in per_batch.items()}
        report[key]["speedup"] = {str(b): timed["dense"][b] / t for b, t in per_batch.items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "wine", "digits", "digits_image"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "iunet.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                                 "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
                                 "threads": args.threads},
                     "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "datasets": {}}
    for name in args.datasets:
        scores = choose_lambda(name, args)
        lam = max(scores, key=scores.get)
        accuracies: dict[str, list[float]] = {}
        seed0: dict[str, torch.nn.Module] = {}
        for seed in range(args.seeds):
            data = load(name, seed)
            dense = run_variant("dense", name, data, 0.0, seed, lam, args)
            accuracies.setdefault("dense", []).append(iunet.accuracy(dense, data[2], data[3]))
            if seed == 0:
                seed0["dense"] = dense
            for variant in ("iunet", "no-init", "no-cl"):
                for sparsity in args.sparsities:
                    model = run_variant(variant, name, data, sparsity, seed, lam, args)
                    key = f"{variant}@{sparsity}"
                    accuracies.setdefault(key, []).append(iunet.accuracy(model, data[2], data[3]))
                    if seed == 0 and variant == "iunet":
                        seed0[key] = model
            print(f"{name} seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        example = load(name, 0)[0][:1]
        with tempfile.TemporaryDirectory() as folder:
            costs = cost(seed0, example, Path(folder), args.repeats)
        results["datasets"][name] = {
            "lambda": lam, "lambda_validation_accuracy": {str(k): v for k, v in scores.items()},
            "accuracy": {key: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                               "runs": v} for key, v in accuracies.items()},
            "cost": costs}
        results["seconds"] = time.perf_counter() - started
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))  # after every data set: a long run keeps partial results
    print_table(results, args.sparsities)


def print_table(results: dict, sparsities: list[float]) -> None:
    for name, entry in results["datasets"].items():
        acc = entry["accuracy"]
        fmt = lambda key: f"{100 * acc[key]['mean']:.1f} ± {100 * acc[key]['std']:.1f}"  # noqa: E731
        print(f"\n{name} (lambda {entry['lambda']}): dense {fmt('dense')}")
        print("| S | IUNET | no proactive init | no contrastive | MACs (cleaned / dense) | latency b1 / b256 speedup |")
        dense = entry["cost"]["dense"]
        for s in sparsities:
            c = entry["cost"].get(f"iunet@{s}", {})
            print(f"| {s} | {fmt(f'iunet@{s}')} | {fmt(f'no-init@{s}')} | {fmt(f'no-cl@{s}')} | "
                  f"{c.get('macs', 0) / dense['macs']:.2f} | "
                  f"{c.get('speedup', {}).get('1', 0):.2f}x / {c.get('speedup', {}).get('256', 0):.2f}x |")


if __name__ == "__main__":
    main()

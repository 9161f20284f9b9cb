"""ExPrune on a ReLU MLP (64-256-256-10) trained on scikit-learn's digits: test accuracy against the fraction
of dense MACs actually skipped on the held-out split, alone and on top of SNP static pruning.

Everything is offline and seeded: the MLP is trained here (torch, CPU), exported with graphopt's legacy
exporter, calibrated on the training split (70 %) and evaluated with onnxruntime on the test split (30 %).
For every (exprune_fnr, exprune_probe) the ExPrune model is run with the input of each
graphopt.ExPruneLinearRelu node exposed; graphopt.ops.exprune.exprune_reference applied to those inputs with
the node's own W, B, Tau, Perm and m gives the per-row skip mask, and a skipped neuron saves (d - m) MACs
(the probe's m MACs are always spent). MACs are counted over the three linear layers (the
final 256->10 layer has no ReLU and is never pruned dynamically). The pass's own stats (measured on its
calibration rows) are kept in the JSON next to the test-set measurement.

"snp" rows: the model is first pruned statically with method="snp", target_macs=0.7, then ExPrune runs on
the pruned model; skipped fractions are given against that pruned model and against the original dense one.

    python bench/exprune_digits.py            # ~1 min on a laptop-class CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphopt  # noqa: E402
from common import machine  # noqa: E402
from graphopt.ops.exprune import NAME as EXPRUNE_OP, exprune_reference  # noqa: E402
from graphopt.torch.export import export_onnx  # noqa: E402

FNRS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
PROBES = (0.125, 0.25, 0.5)
RESULTS = Path(__file__).resolve().parent / "results"


def data(seed: int) -> tuple[np.ndarray, ...]:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.3,
                                                        stratify=digits.target, random_state=seed)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    return (((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32),
            y_train.astype(np.int64), y_test.astype(np.int64))


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
            optimizer.step()
    return model.eval()


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    s = session(model)
    logits = s.run(None, {s.get_inputs()[0].name: x})[0]
    return float(np.mean(logits.argmax(axis=1) == y))


def linear_macs(model: onnx.ModelProto) -> float:
    """MACs per row of the Gemm/MatMul/ExPrune layers (weights' element counts)."""
    inits = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul") or node.op_type == EXPRUNE_OP:
            weight = inits.get(node.input[1])
            if weight is not None:
                total += int(np.prod(weight.dims))
    return float(total)


def test_skips(model: onnx.ModelProto, x: np.ndarray) -> tuple[float, dict[str, dict[str, float]]]:
    """MACs per row skipped on `x` (summed over ExPrune layers), the oracle bound (every truly negative neuron
    skipped after its probe), and per-layer skip rate, MAC fraction, negative rate and false-negative rate."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == EXPRUNE_OP]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for node in nodes:
        if node.input[0] not in existing:
            exposed.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
    s = session(exposed)
    names = [o.name for o in s.get_outputs()]
    values = dict(zip(names, s.run(None, {s.get_inputs()[0].name: x})))
    skipped_macs, oracle_macs, layers = 0.0, 0.0, {}
    for node in nodes:
        w, b, tau, perm = (inits[name] for name in node.input[1:5])
        m = next(a.i for a in node.attribute if a.name == "m")
        xin = values[node.input[0]]
        _, skipped = exprune_reference(xin, w, b, tau, perm, m)
        positive = (xin.astype(np.float64)[:, perm] @ w.T.astype(np.float64) + b) > 0
        n, d = w.shape
        rate = float(skipped.mean())
        skipped_macs += rate * n * (d - m)
        oracle_macs += float((~positive).mean()) * n * (d - m)
        layers[node.name] = {"d": d, "n": n, "m": int(m), "skip_rate": rate, "macs_skipped": rate * (d - m) / d,
                             "negative_rate": float((~positive).mean()),
                             "test_fnr": float((skipped & positive).sum() / max(1, positive.sum()))}
    return skipped_macs, oracle_macs, layers


def sweep(base: onnx.ModelProto, label: str, calib: dict[str, np.ndarray], x_test: np.ndarray,
          y_test: np.ndarray, dense_macs: float) -> list[dict]:
    base_macs = linear_macs(base)
    base_acc = accuracy(base, x_test, y_test)
    rows = []
    for fnr in FNRS:
        for probe in PROBES:
            result = graphopt.optimize(base, method="exprune", calib=calib, exprune_probe=probe, exprune_fnr=fnr)
            stats = result.report["passes"][-1]["stats"]
            skipped, oracle, layers = test_skips(result.model, x_test)
            acc = accuracy(result.model, x_test, y_test)
            rows.append({"model": label, "fnr": fnr, "probe": probe, "accuracy": acc,
                         "accuracy_drop": base_acc - acc, "base_accuracy": base_acc,
                         "test_macs_skipped_vs_base": skipped / base_macs,
                         "test_macs_skipped_vs_dense": skipped / dense_macs,
                         "test_oracle_macs_skipped_vs_base": oracle / base_macs,
                         "test_fnr": float(np.mean([v["test_fnr"] for v in layers.values()])),
                         "total_macs_saved_vs_dense": 1 - (base_macs - skipped) / dense_macs,
                         "calib_macs_skipped_fraction_eligible": stats["macs_skipped_fraction"],
                         "test_layers": layers,
                         "calib_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}})
    return rows


def table(rows: list[dict], key: str, fmt: str) -> str:
    lines = ["fnr \\ probe " + "".join(f"{p:>10}" for p in PROBES)]
    for fnr in FNRS:
        cells = [next(r for r in rows if r["fnr"] == fnr and r["probe"] == p)[key] for p in PROBES]
        lines.append(f"{fnr:<12}" + "".join(f"{fmt.format(c):>10}" for c in cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, marker in (("dense", "o"), ("snp0.7", "s")):
        sub = [r for r in rows if r["model"] == label]
        for probe, colour in zip(PROBES, ("C0", "C1", "C2")):
            pts = sorted((r["test_macs_skipped_vs_base"], r["accuracy"]) for r in sub if r["probe"] == probe)
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, color=colour,
                    linestyle="-" if label == "dense" else "--", label=f"{label}, probe {probe}")
        ax.axhline(100 * sub[0]["base_accuracy"], color="grey", linestyle="-" if label == "dense" else "--",
                   linewidth=0.8)
    base = 100 * rows[0]["base_accuracy"]
    ax.set_ylim(base - 3, min(100.0, base + 1))  # one test sample is 100/540 = 0.19 points
    ax.set_xlabel("MACs skipped on the test set (% of the model ExPrune ran on)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ExPrune, digits MLP 64-256-256-10 (fnr 0 .. 0.05)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--snp-target", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=RESULTS / "exprune_digits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    x_train, x_test, y_train, y_test = data(args.seed)
    module = train(x_train, y_train, args.seed, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        dense = onnx.load(export_onnx(module, torch.from_numpy(x_train[:2]), Path(tmp) / "mlp.onnx",
                                      exporter="legacy", opset=17, fold_bn=True))
    input_name = dense.graph.input[0].name
    calib = {input_name: x_train}
    dense_macs = linear_macs(dense)
    snp = graphopt.optimize(dense, method="snp", target_macs=args.snp_target, calib=calib).model
    snp_macs = linear_macs(snp)
    info = machine()
    print("machine:", json.dumps(info))
    print(f"digits: train {len(x_train)}, test {len(x_test)}; dense linear MACs/row {dense_macs:.0f}, "
          f"after SNP {snp_macs:.0f} ({snp_macs / dense_macs:.3f})")
    rows = sweep(dense, "dense", calib, x_test, y_test, dense_macs)
    rows += sweep(snp, "snp0.7", calib, x_test, y_test, dense_macs)
    for label in ("dense", "snp0.7"):
        sub = [r for r in rows if r["model"] == label]
        print(f"\n== ExPrune on {label} model (base test accuracy {sub[0]['base_accuracy']:.4f}) ==")
        print("test accuracy:")
        print(table(sub, "accuracy", "{:.4f}"))
        print("test MACs skipped (fraction of this model's linear MACs):")
        print(table(sub, "test_macs_skipped_vs_base", "{:.3f}"))
        print("test false-negative rate (mean over layers):")
        print(table(sub, "test_fnr", "{:.4f}"))
        print("oracle bound: MACs skipped if every truly negative neuron were skipped after its probe:")
        print(table(sub, "test_oracle_macs_skipped_vs_base", "{:.3f}"))
        print("calibration (train) MACs skipped, pass stats (fraction of ExPrune-layer MACs):")
        print(table(sub, "calib_macs_skipped_fraction_eligible", "{:.3f}"))
        if label != "dense":
            print("total MACs saved vs the dense model (static + dynamic):")
            print(table(sub, "total_macs_saved_vs_dense", "{:.3f}"))
    seconds = time.perf_counter() - started
    print(f"\nwall time {seconds:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "seed": args.seed, "epochs": args.epochs, "snp_target": args.snp_target,
               "dense_linear_macs": dense_macs, "snp_linear_macs": snp_macs, "wall_seconds": seconds,
               "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

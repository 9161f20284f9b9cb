"""ExPrune on ReLU models trained on scikit-learn's digits (an MLP, a CNN and a ReLU transformer encoder): test
accuracy against the MACs actually skipped on the held-out test split, on the dense models and on top of SNP
static pruning.

Everything is offline and seeded. Three models are trained here (torch, CPU) on a 70/30 stratified split:
- mlp: 64-256-256-10 on the standardised 64 features (two Gemm+Relu layers ExPrune can take, 98% of MACs);
- cnn: on the 8x8 images, Conv 1->16, Conv 16->32, MaxPool 2, Conv 32->32 (3x3, pad 1, each + ReLU),
  flatten, Linear 512->64 + ReLU, Linear 64->10 (the three Conv+Relu and the Linear+Relu are eligible;
  the first conv has a single input channel, so it cannot be probed and stays a Conv);
- encoder: the image's 8 rows as 8 tokens, Linear 8->64 plus a learned position, two pre-norm transformer
  blocks (4 heads, FFN 64-256-64 with ReLU), LayerNorm, mean over tokens, Linear 64->10 (the FFNs' first
  MatMul+Add+Relu are eligible, a third of the MACs; their rows are tokens).
Both are exported with graphopt's legacy exporter (opset 17). Bases: the dense model, and the model pruned
by method="snp" to `--snp-target` of its MACs. On each base graphopt.optimize(method="exprune") runs with the
training split as calibration data, in these settings:
- rule threshold / sequential / auto (each layer's rule chosen by the pass) at fixed false-negative rates
  (`exprune_fnr` in FNRS; probe length chosen per layer by the pass);
- the default tolerance search (no `exprune_fnr`: the largest rate whose model keeps top-1 agreement >= 0.99 on a
  held-out quarter of the calibration data, as a 95% lower confidence bound), and `tolerance="top1=0.98"`, for
  each rule (bench/exprune_margin.py repeats the default search over 20 seeds).
Measured on the test split (540 samples; one is 0.19 accuracy points): test accuracy and its drop against the
base, top-1 agreement with the base, and the MACs skipped per input. For that the model is run with every
ExPrune node's input exposed; per output unit (a neuron of a row, or an output channel at one output position)
the first checkpoint whose score falls below its boundary is found with graphopt's own helpers
(ops.exprune.checkpoint_scores / boundary_factors, ops.exprune_conv.im2col / prefix_sums / checkpoint_scores and
passes.exprune.calib.outcome), and a unit skipped at checkpoint k saves (d - k)/d of its MACs (d = inputs of a
linear layer, input channels of a conv). Those MACs are reported as a fraction of the WHOLE model's MACs
(graphopt.calibration.shapes.count_cost: every Conv/Gemm/MatMul, ExPrune nodes at their dense cost) and of the
eligible (ExPrune) layers' MACs; for SNP bases also the total saved against the dense model (static +
dynamic). The decisions are cross-checked against the node outputs of the run (a unit the reference skips
must output 0, a unit it keeps with a pre-activation > 1e-4 must not: "mismatch" counts violations; the
op's decisions may differ where a score is within float32 rounding of its boundary). The pass's own held-out
estimate is kept next to the test measurement. "Best at <= 1 point" in the summary is chosen on the test set
itself (optimistic); the default search row is the setting a user would get without looking at test data.

    python bench/exprune_digits.py            # about 8 minutes on a 2-core VM (--seed 1: other split, init)
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
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphopt  # noqa: E402
from common import SNP_EARLIER, accuracy, add_thread_arguments, start_run, train  # noqa: E402
from snp_curves import EncoderBlock  # noqa: E402
from graphopt.calibration.shapes import count_cost  # noqa: E402
from graphopt.ops import exprune as linear_op  # noqa: E402
from graphopt.ops import exprune_conv as conv_op  # noqa: E402
from graphopt.passes.exprune.calib import outcome  # noqa: E402
from graphopt.torch.export import export_onnx  # noqa: E402

FNRS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
RULES = ("threshold", "sequential", "auto")
TOLERANCES = (None, "top1=0.98")  # None: the pass's default (top1=0.99)
ALLOCATIONS = ("layers", "uniform")  # a rate per layer (the default) or one rate for all
RESULTS = Path(__file__).resolve().parent / "results"
EXPRUNE_OPS = (linear_op.NAME, conv_op.NAME)


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


class DigitsEncoder(nn.Module):
    """A ReLU transformer encoder reading an 8x8 digit as 8 tokens (its rows): Linear 8->64 plus a learned
    position, two pre-norm blocks (4 heads, FFN 64-256-64 with ReLU), LayerNorm, mean over tokens, Linear 64->10."""

    def __init__(self, d_model: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.randn(8, d_model) * 0.1)
        self.blocks = nn.Sequential(*(EncoderBlock(d_model, 4, 4 * d_model, nn.ReLU) for _ in range(blocks)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(rows) + self.position)).mean(dim=1))


MODELS = {
    "mlp": ("MLP 64-256-256-10", digits_mlp, dict(epochs=40, batch=64, lr=1e-3, weight_decay=1e-4)),
    "cnn": ("CNN conv16-conv32-pool-conv32-fc64-fc10", digits_cnn, dict(epochs=30, batch=64, lr=3e-3,
                                                                          weight_decay=1e-4)),
    "encoder": ("ReLU encoder, 8 row tokens, 2 pre-norm blocks d64 FFN256", DigitsEncoder,
                dict(epochs=60, batch=64, lr=2e-3, weight_decay=1e-4)),
}


def data(name: str, seed: int) -> tuple[np.ndarray, ...]:
    digits = load_digits()
    x = (digits.images / 16.0).reshape(-1, 1, 8, 8) if name == "cnn" else digits.data
    if name == "encoder":
        x = (digits.images / 16.0).reshape(-1, 8, 8)  # 8 tokens (rows) of 8 pixels
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, stratify=digits.target,
                                                        random_state=seed)
    if name == "mlp":
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return (x_train.astype(np.float32), x_test.astype(np.float32), y_train.astype(np.int64),
            y_test.astype(np.int64))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def model_macs(model: onnx.ModelProto, x: np.ndarray) -> tuple[float, dict[str, int]]:
    """Whole-model MACs per sample and per counted node (ExPrune nodes at their dense cost)."""
    cost = count_cost(model, {model.graph.input[0].name: (1, *x.shape[1:])})
    return float(cost.macs), cost.per_node


def run_exposed(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Every output of `model` on `x`, plus the tensors in `names`."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in existing)
    s = session(exposed)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: x})))


def unit_scores(node: onnx.NodeProto, xin: np.ndarray, inits: dict[str, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, list[int], np.ndarray]:
    """(scores [units, n, c], factors [c], pre-activation [units, n] (float64), d, checkpoints, tau) of one
    ExPrune node on its real inputs: units are rows for the linear op, output positions for the conv op."""
    w, b, tau, perm = (inits[name] for name in node.input[1:5])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ks = [int(k) for k in attrs.get("checkpoints") or [attrs["m"]]]
    if node.op_type == linear_op.NAME:
        rows = xin.reshape(-1, xin.shape[-1])[:, perm]
        d = rows.shape[1]
        scores = linear_op.checkpoint_scores(rows, w, b, ks)
        full = rows.astype(np.float64) @ w.T.astype(np.float64) + b
    else:
        d = xin.shape[1]
        cols = conv_op.im2col(xin[:, perm], w.shape[2:], attrs["strides"], attrs["pads"], attrs["dilations"])
        cols = cols.reshape(-1, *cols.shape[3:])
        partials = conv_op.prefix_sums(cols, w, [*ks, d])
        scores = conv_op.checkpoint_scores(partials, b, d, ks)
        full = partials[:, :, -1] + b.astype(np.float64)
    return scores, linear_op.boundary_factors(d, ks), full, d, ks, tau


def test_skips(model: onnx.ModelProto, x: np.ndarray) -> dict[str, Any]:
    """MACs per sample skipped on `x` by the ExPrune nodes of `model`, per layer and in total."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in EXPRUNE_OPS]
    _, per_node = model_macs(model, x)
    values = run_exposed(model, x, [name for n in nodes for name in (n.input[0], n.output[0])])
    layers, skipped_macs, eligible, mismatches = {}, 0.0, 0.0, 0
    for node in nodes:
        scores, factors, full, d, ks, tau = unit_scores(node, values[node.input[0]], inits)
        positive = full > 0
        skip_rate, fnr, saved = outcome(scores, factors, tau, positive, d, ks)
        skipped = np.any(scores < (tau[:, None] * factors[None, :])[None], axis=-1)
        out = values[node.output[0]]
        out = out.reshape(-1, out.shape[-1]) if node.op_type == linear_op.NAME else \
            out.transpose(0, 2, 3, 1).reshape(-1, out.shape[1])
        # skipped by the reference but computed by the op, or kept and clearly positive but 0 in the op
        mismatches += int(np.sum(skipped & (out != 0)) + np.sum(~skipped & (full > 1e-4) & (out == 0)))
        macs = per_node[node.name]
        skipped_macs, eligible = skipped_macs + saved * macs, eligible + macs
        layers[node.name] = {"op": node.op_type, "d": d, "m": ks[0], "checkpoints": ks, "macs": macs,
                             "skip_rate": skip_rate, "negative_rate": float((~positive).mean()), "test_fnr": fnr,
                             "macs_skipped": saved}
    return {"skipped_macs": skipped_macs, "eligible_macs": eligible, "layers": layers,
            "decision_mismatches": mismatches}


def predictions(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = session(model)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def settings() -> list[dict[str, Any]]:
    out = [{"rule": rule, "fnr": fnr, "tolerance": None} for rule in RULES for fnr in FNRS]
    out += [{"rule": rule, "fnr": None, "tolerance": tol, "allocation": allocation}
            for rule in RULES for tol in TOLERANCES for allocation in ALLOCATIONS]
    return out


def sweep(model: str, base_label: str, base: onnx.ModelProto, calib: dict[str, np.ndarray], x_test: np.ndarray,
          y_test: np.ndarray, dense_macs: float, seed: int, threads: int) -> list[dict]:
    base_macs, _ = model_macs(base, x_test)
    base_logits = predictions(base, x_test)
    base_acc = accuracy(base_logits, y_test)
    rows = []
    for setting in settings():
        # convolutions too: this benchmark counts the MACs skipped (the default leaves them dense, no native kernel)
        # the op at every batch (exprune_dense_rows 0): the test set is scored in batches, and what is measured is
        # what a single-row caller gets
        options = {"exprune_rule": setting["rule"], "seed": seed, "threads": threads, "exprune_layers": "all",
                   "exprune_dense_rows": 0}
        if setting["fnr"] is not None:
            options["exprune_fnr"] = setting["fnr"]
        if setting["tolerance"] is not None:
            options["tolerance"] = setting["tolerance"]
        if setting.get("allocation"):
            options["exprune_allocation"] = setting["allocation"]
        start = time.perf_counter()
        result = graphopt.optimize(base, method="exprune", calib=calib, **options)
        seconds = time.perf_counter() - start
        stats = result.report["passes"][-1]["stats"]
        logits = predictions(result.model, x_test)
        acc = accuracy(logits, y_test)
        agreement = float(np.mean(logits.argmax(axis=1) == base_logits.argmax(axis=1)))
        skips = test_skips(result.model, x_test)
        skipped = skips["skipped_macs"]
        rows.append({
            "model": model, "base": base_label, **setting,
            "search": "fixed" if setting["fnr"] is not None else (setting["tolerance"] or "top1=0.99 (default)")
            + (" uniform" if setting.get("allocation") == "uniform" else ""),
            "fnr_chosen": stats.get("fnr_level", setting["fnr"]),
            "accuracy": acc, "base_accuracy": base_acc, "accuracy_drop": base_acc - acc,
            "test_top1_agreement": agreement,
            "base_macs": base_macs, "dense_macs": dense_macs, "eligible_macs": skips["eligible_macs"],
            "macs_skipped_whole": skipped / base_macs,
            "macs_skipped_eligible": skipped / skips["eligible_macs"] if skips["eligible_macs"] else 0.0,
            "total_macs_saved_vs_dense": 1 - (base_macs - skipped) / dense_macs,
            "held_out_macs_skipped_whole": result.report.get("exprune_macs_skipped", {}).get("fraction_of_model"),
            "decision_mismatches": skips["decision_mismatches"], "optimize_seconds": seconds,
            "test_layers": skips["layers"],
            "pass_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
            "pass_skipped": result.report["passes"][-1].get("skipped", []),
        })
        r = rows[-1]
        print(f"  {model:4} {base_label:7} {setting['rule']:10} {r['search']:20} fnr {r['fnr_chosen']!s:6} "
              f"acc {100 * acc:6.2f} ({100 * (acc - base_acc) + 0.0:+5.2f})  skipped: "
              f"whole {100 * r['macs_skipped_whole']:5.1f}%  eligible {100 * r['macs_skipped_eligible']:5.1f}%  "
              f"vs dense {100 * r['total_macs_saved_vs_dense']:5.1f}%"
              f"  [{seconds:.1f} s]", flush=True)
    return rows


def best_within(rows: list[dict], drop: float) -> dict | None:
    """The row skipping the most whole-model MACs with accuracy drop <= `drop` (chosen on the test set)."""
    ok = [r for r in rows if r["accuracy_drop"] <= drop + 1e-9]
    return max(ok, key=lambda r: r["macs_skipped_whole"]) if ok else None


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for model in MODELS:
        for base in ("dense", "snp"):
            for rule in RULES:
                sub = [r for r in rows if r["model"] == model and r["base"] == base and r["rule"] == rule]
                if not sub:
                    continue
                best = best_within(sub, 0.01)
                default = next(r for r in sub if r["search"] == "top1=0.99 (default)")
                loose = next(r for r in sub if r["search"] == "top1=0.98")
                uniform = next(r for r in sub if r["search"] == "top1=0.99 (default) uniform")
                out.append({"model": model, "base": base, "rule": rule, "base_accuracy": sub[0]["base_accuracy"],
                            "base_macs_vs_dense": sub[0]["base_macs"] / sub[0]["dense_macs"],
                            "best_le1": best, "default": default, "top1_0.98": loose, "default_uniform": uniform})
    return out


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def print_tables(rows: list[dict], summaries: list[dict]) -> None:
    for model in MODELS:
        for base in ("dense", "snp"):
            sub = [r for r in rows if r["model"] == model and r["base"] == base]
            if not sub:
                continue
            print(f"\n== {model}, base {base} (test accuracy {100 * sub[0]['base_accuracy']:.2f}%, "
                  f"{sub[0]['base_macs']:.0f} MACs/sample = {sub[0]['base_macs'] / sub[0]['dense_macs']:.3f} of dense, "
                  f"eligible {sub[0]['eligible_macs'] / sub[0]['base_macs']:.3f} of it) ==")
            print(f"{'rule':11}{'setting':22}{'fnr':>7}{'acc %':>8}{'drop':>7}{'whole':>8}{'eligible':>10}"
                  f"{'vs dense':>10}{'held-out est.':>15}{'agree':>8}{'mismatch':>10}")
            for r in sub:
                held = r["held_out_macs_skipped_whole"]
                print(f"{r['rule']:11}{r['search']:22}{r['fnr_chosen']!s:>7}{100 * r['accuracy']:8.2f}"
                      f"{100 * r['accuracy_drop']:7.2f}{pct(r['macs_skipped_whole']):>8}"
                      f"{pct(r['macs_skipped_eligible']):>10}{pct(r['total_macs_saved_vs_dense']):>10}"
                      f"{pct(held) if held is not None else '-':>15}{100 * r['test_top1_agreement']:8.2f}"
                      f"{r['decision_mismatches']:>10}")
    print("\n== summary: best whole-model MACs skipped at <= 1 point drop (chosen on test), default search ==")
    for s in summaries:
        b, d = s["best_le1"], s["default"]
        best = (f"{pct(b['macs_skipped_whole'])} ({b['search']}, fnr {b['fnr_chosen']}, drop "
                f"{100 * b['accuracy_drop']:.2f})" if b else "none")
        u = s["default_uniform"]
        print(f"{s['model']:4} {s['base']:6} {s['rule']:10} best {best}; default (per layer): fnr {d['fnr_chosen']}, "
              f"{pct(d['macs_skipped_whole'])} whole, drop {100 * d['accuracy_drop']:.2f}; one rate: fnr "
              f"{u['fnr_chosen']}, {pct(u['macs_skipped_whole'])} whole, drop {100 * u['accuracy_drop']:.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["model"] for r in rows}), figsize=(12, 4.6), squeeze=False)
    axes = axes[0]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    for ax, model in zip(axes, models):
        for base, style in (("dense", "-"), ("snp", "--")):
            for rule, colour in zip(RULES, ("C0", "C1", "C2")):
                sub = [r for r in rows if r["model"] == model and r["base"] == base and r["rule"] == rule]
                fixed = sorted((r for r in sub if r["search"] == "fixed"), key=lambda r: r["fnr"])
                ax.plot([100 * r["macs_skipped_whole"] for r in fixed], [100 * r["accuracy"] for r in fixed],
                        marker="o" if base == "dense" else "s", linestyle=style, color=colour, markersize=4,
                        label=f"{base}, {rule}")
                for r in sub:
                    if r["search"] != "fixed":
                        ax.plot(100 * r["macs_skipped_whole"], 100 * r["accuracy"],
                                marker="*" if r["tolerance"] is None else "x", color=colour, markersize=11,
                                linestyle="none")
            base_acc = next(r["base_accuracy"] for r in rows if r["model"] == model and r["base"] == base)
            ax.axhline(100 * base_acc - 1, color="grey", linestyle=style, linewidth=0.7)
        ax.set_title(f"{MODELS[model][0]}\n(grey: base accuracy - 1 point; *: default search, x: top1=0.98)",
                     fontsize=9)
        ax.set_xlabel("MACs skipped on the test set (% of the whole base model)")
        ax.set_ylabel("test accuracy (%)")
        accs = [100 * r["accuracy"] for r in rows if r["model"] == model]
        ax.set_ylim(max(min(accs) - 0.5, max(accs) - 6), max(accs) + 0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snp-target", type=float, default=0.7)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS / "exprune_digits")
    add_thread_arguments(parser)
    args = parser.parse_args()
    info = start_run(args)
    started = time.perf_counter()
    rows, trained = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            title, build, options = MODELS[name]
            x_train, x_test, y_train, y_test = data(name, args.seed)
            torch.manual_seed(args.seed)
            module = build()
            seconds = train(module, x_train, y_train, seed=args.seed, **options)
            dense = onnx.load(export_onnx(module, torch.from_numpy(x_train[:2]), Path(tmp) / f"{name}.onnx",
                                          exporter="legacy", opset=17))
            calib = {dense.graph.input[0].name: x_train}
            dense_macs, _ = model_macs(dense, x_test)
            snp = graphopt.optimize(dense, method="snp", target_macs=args.snp_target, calib=calib,
                                    threads=args.ort_threads, **SNP_EARLIER).model
            snp_macs, _ = model_macs(snp, x_test)
            trained[name] = {"title": title, "train_seconds": seconds, "train": len(x_train), "test": len(x_test),
                             "training": options, "dense_macs": dense_macs, "snp_macs": snp_macs}
            print(f"\n{name}: {title}, trained {options['epochs']} epochs in {seconds:.1f} s; train {len(x_train)}, "
                  f"test {len(x_test)}; MACs/sample dense {dense_macs:.0f}, after SNP {snp_macs:.0f} "
                  f"({snp_macs / dense_macs:.3f})", flush=True)
            for label, base in (("dense", dense), ("snp", snp)):
                rows += sweep(name, label, base, calib, x_test, y_test, dense_macs, args.seed, args.ort_threads)
    summaries = summary(rows)
    print_tables(rows, summaries)
    seconds = time.perf_counter() - started
    print(f"\nwall time {seconds:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": " ".join(["python", *sys.argv]), "seed": args.seed,
               "snp_target": args.snp_target, "fnrs": FNRS, "models": trained, "wall_seconds": seconds,
               "summary": [{k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                    if kk != "test_layers"})
                            for k, v in s.items()} for s in summaries],
               "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""CoB (change-of-basis) pruning against magnitude pruning, without fine-tuning, on TSRA networks trained here.

Models are trained in this script, seeded and offline, on scikit-learn's digits or generated shape images
(70/30 stratified split):

- tsra-cnn:  Conv(1->C) RMSNorm TSRA, Conv(C->C) RMSNorm TSRA, AvgPool 2, Conv(C->2C) RMSNorm TSRA,
             global average pool, Linear(2C->10), built as the paper's networks are (weightless RMS norm instead
             of BatchNorm, average instead of max pooling; TSRA split at half the channels);
- relu-cnn:  the same shape with BatchNorm + ReLU in place of RMSNorm + TSRA (BN folded at export);
- tsra-mlp:  64 -> H RMSNorm TSRA -> H RMSNorm TSRA -> 10 on the standardised 64 pixel features;
- relu-mlp:  the same shape with BatchNorm1d + ReLU;
- tsra-rescnn: Conv(1->C) RMSNorm TSRA, two residual blocks x + Conv(TSRA(RMSNorm(Conv(x)))) joined by Add,
             RMSNorm on the stream, global average pooling written as a mean over H and W, Linear(C->10)
             (the residual stream is one change-of-basis group with three writers and three readers);
- relu-rescnn: the same with BatchNorm + ReLU;
- rescnn-shapes (tsra and relu): the residual CNN with three blocks and AvgPool 2 in the stream after the
             first two, on a harder set generated offline: 3 x 24 x 24 images of ten shape classes under random
             colours, position, size, rotation, distractor dots and noise (bench/shape_images.py; not in the
             default --models).

Each is exported with the legacy torch exporter (opset 17) and pruned to each MAC target, no retraining, by:

- cob-pca:      graphopt.optimize(method="cob", rotation="pca", cob_reconstruct=False, target_macs=T) on the TSRA
                model: the rotated coordinates cut, nothing reconstructed;
- cob-l1pca:    the same with rotation="l1pca";
- cob-pca-snp:  method="cob" with its defaults: cob-pca followed by SNP's least-squares reconstruction of the cut
                coordinates folded into their readers (cob_reconstruct, the default), each reader refitted to the
                original model;
- cob-pca-snp-self: the same with reconstruct_target="self" (each reader's own fit, the default before);
- cob+snp:      method="cob,snp": CoB rotates (PCA), then SNP spends the one budget on the rotated model (its
                groups ranked and cut with its reconstruction, rotated residual streams included);
- magnitude:    method="magnitude" on the same TSRA model, no rotation, run on the graph after graphopt's
                pre-passes with the RMS norms and TSRAs as graphopt function ops (graphopt.passes.channels.function_patterns.
                canonicalise), exactly the graph `cob` itself prunes, minus the rotation;
- snp:          method="snp" (subspace node pruning with its least-squares reconstruction) on the TSRA model;
- snp-original, cob+snp-original: the same with reconstruct_target="original" (each consumer refitted to the
                original model's pre-activation from the pruned model's inputs);
- *-repair:     the same followed by --repair 1000 (distillation of the pruned model's outputs toward the
                dense model's on the unlabelled calibration samples; no labels, no test data);
- relu-magnitude: method="magnitude" on the ReLU+BN control.

All six run side by side at each target (the order rotates between repeats; times are medians). Calibration
data are the first --calib training samples; accuracy is measured with onnxruntime on the test split. The
"reliable range" of a method is the smallest MACs ratio it reached such that at that target and every less
aggressive one the accuracy drop against its own dense model is <= 1 point (the paper's frontier is in
parameters; both ratios are reported).

    python bench/cob.py            # every method (about 25 minutes on 2 cores), bench/results/cob.{json,png}
    python bench/cob.py --quick    # smoke run: targets 0.7,0.5, one repeat, fewer epochs
    python bench/cob.py --models rescnn --targets 0.7,0.5 --repeats 1   # the residual CNN alone
    python bench/cob.py --models rescnn-shapes --repeats 1 --round-to 1 --name cob-shapes-exact
                                   # the residual CNN on shape images (about 3 minutes, 2 of them training)
    python bench/cob.py --methods cob-pca,cob-l1pca --targets 0.7,0.5,0.4,0.3 --repeats 1 --name cob-l1pca
                                   # PCA against L1-PCA; add --corrupt 0.05 to replace 5% of the calibration
                                   # samples by noise (--corrupt-scale 10 standard deviations)
"""

from __future__ import annotations

import argparse
import json
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
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import graphopt
from common import SNP_EARLIER, accuracy, add_thread_arguments, predict, start_run, train
from graphopt.ir import graph as ir
from graphopt.passes.channels.function_patterns import canonicalise
from graphopt.torch.export import export_onnx
from graphopt.torch.tsra import TSRA, RMSNorm
from shape_images import shape_images

TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
# method -> (which model it prunes, optimize options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "cob-pca": ("tsra", {"method": "cob", "rotation": "pca", "cob_reconstruct": False}),
    "cob-l1pca": ("tsra", {"method": "cob", "rotation": "l1pca", "cob_reconstruct": False}),
    "cob-pca-snp": ("tsra", {"method": "cob", "rotation": "pca", "cob_reconstruct": True}),
    "cob-pca-snp-self": ("tsra", {"method": "cob", "rotation": "pca", "reconstruct_target": "self"}),
    "cob+snp": ("tsra", {"method": "cob,snp", "rotation": "pca", **SNP_EARLIER}),
    "cob+snp-original": ("tsra", {"method": "cob,snp", "rotation": "pca", **SNP_EARLIER,
                                  "reconstruct_target": "original"}),
    "cob+snp-original-repair": ("tsra", {"method": "cob,snp", "rotation": "pca", **SNP_EARLIER,
                                         "reconstruct_target": "original", "repair": 1000}),
    "cob-pca-snp-repair": ("tsra", {"method": "cob", "rotation": "pca", "cob_reconstruct": True, "repair": 1000}),
    "cob-pca-snp-self-repair": ("tsra", {"method": "cob", "rotation": "pca", "reconstruct_target": "self",
                                         "repair": 1000}),
    "magnitude": ("tsra-canonical", {"method": "magnitude"}),
    "snp": ("tsra", {"method": "snp", **SNP_EARLIER}),
    "snp-original": ("tsra", {"method": "snp", **SNP_EARLIER, "reconstruct_target": "original"}),
    "snp-original-repair": ("tsra", {"method": "snp", **SNP_EARLIER, "reconstruct_target": "original",
                                     "repair": 1000}),
    "relu-magnitude": ("relu", {"method": "magnitude"}),
}
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES_POOLS = (True, True, False)  # AvgPool 2 after the first two residual blocks of rescnn-shapes
RELIABLE_DROP = 0.01


@dataclass
class Family:
    """A TSRA network and its ReLU control, trained on the same split."""
    name: str
    description: str
    models: dict[str, onnx.ModelProto]
    calib: dict[str, dict[str, np.ndarray]]
    test: dict[str, np.ndarray]
    labels: np.ndarray
    train_seconds: dict[str, float]
    dense_accuracy: dict[str, float] = field(default_factory=dict)
    dense_logits: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- models


def norm_act(kind: str, channels: int, conv: bool) -> list[nn.Module]:
    if kind == "tsra":
        return [RMSNorm(), TSRA(channels // 2)]
    return [nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels), nn.ReLU()]


def digits_cnn(kind: str, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1), *norm_act(kind, width, True),
        nn.Conv2d(width, width, 3, 1, 1), *norm_act(kind, width, True),
        nn.AvgPool2d(2),
        nn.Conv2d(width, 2 * width, 3, 1, 1), *norm_act(kind, 2 * width, True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


class ResidualBlock(nn.Module):
    """x + Conv(act(Conv(x))): two 3x3 convolutions joined to the stream by Add."""

    def __init__(self, kind: str, width: int) -> None:
        super().__init__()
        self.inner = nn.Conv2d(width, width, 3, 1, 1)
        self.act = nn.Sequential(*norm_act(kind, width, True))
        self.outer = nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(self.act(self.inner(x)))


class ResidualCnn(nn.Module):
    """stem Conv -> norm+act -> residual blocks (each followed by AvgPool 2 where `pools` says so) -> norm ->
    mean over H, W -> Linear."""

    def __init__(self, kind: str, width: int, blocks: int = 2, in_channels: int = 1,
                 pools: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), *norm_act(kind, width, True))
        layers: list[nn.Module] = []
        for index in range(blocks):
            layers.append(ResidualBlock(kind, width))
            if index < len(pools) and pools[index]:
                layers.append(nn.AvgPool2d(2))
        self.blocks = nn.Sequential(*layers)
        self.norm = RMSNorm() if kind == "tsra" else nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))).mean(dim=(2, 3)))


class TokenBlock(nn.Module):
    """Pre-norm transformer block on token rows [N, T, d]: x + attention(norm(x)), x + FFN(norm(x)); TSRA: weightless
    RMS norms over the last axis and an FFN up -> RMSNorm -> TSRA -> down; control: LayerNorm and ReLU."""

    def __init__(self, kind: str, width: int, heads: int = 4) -> None:
        super().__init__()
        norm = (lambda: RMSNorm(dim=-1)) if kind == "tsra" else (lambda: nn.LayerNorm(width))
        self.heads, self.norm1, self.norm2 = heads, norm(), norm()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.act = (nn.Sequential(RMSNorm(dim=-1), TSRA(width, dim=-1)) if kind == "tsra" else nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        h = self.norm1(x)
        q, k, v = (layer(h).view(batch, tokens, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / float(q.shape[-1]) ** 0.5
        x = x + self.o(torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, tokens, width))
        return x + self.down(self.act(self.up(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """The 8 pixel rows of a digit as 8 tokens (with a one-hot row index), a token projection, pre-norm blocks,
    a final norm, the mean over tokens and Linear; the residual stream is one change-of-basis group."""

    def __init__(self, kind: str, width: int, blocks: int = 2) -> None:
        super().__init__()
        self.register_buffer("rows", torch.eye(8), persistent=False)
        self.embed = nn.Linear(16, width)
        self.blocks = nn.Sequential(*[TokenBlock(kind, width) for _ in range(blocks)])
        self.norm = RMSNorm(dim=-1) if kind == "tsra" else nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat((x, self.rows.expand(x.shape[0], -1, -1)), dim=-1)
        return self.head(self.norm(self.blocks(self.embed(tokens))).mean(dim=1))


def digits_mlp(kind: str, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), *norm_act(kind, hidden, False),
                         nn.Linear(hidden, hidden), *norm_act(kind, hidden, False), nn.Linear(hidden, 10))


# ---------------------------------------------------------------- training


def canonical(model: onnx.ModelProto, calib: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The graph after graphopt's pre-passes with RMS norms and TSRAs as graphopt function ops (no rotation)."""
    base = graphopt.optimize(model, method="none", calib=calib).model
    graph = ir.import_graph(base)
    ir.apply_inferred_shapes(graph, base)  # the written model keeps only declared shapes; matching reads them all
    rms, tsra = canonicalise(graph)
    if not rms or not tsra:
        raise RuntimeError(f"canonicalise recognised {rms} RMS norms and {tsra} TSRAs")
    return ir.export_model(graph, base)


def corrupted(samples: np.ndarray, fraction: float, scale: float, seed: int) -> np.ndarray:
    """`samples` with round(fraction * n) of them, chosen with `seed`, replaced by Gaussian noise of `scale`
    times the samples' standard deviation (glitched inputs in the calibration set; training and test stay
    clean)."""
    count = int(round(fraction * samples.shape[0]))
    if count == 0:
        return samples
    rng = np.random.default_rng(seed)
    out = samples.copy()
    chosen = rng.choice(samples.shape[0], size=count, replace=False)
    out[chosen] = (rng.standard_normal((count, *samples.shape[1:])) * scale * samples.std()).astype(samples.dtype)
    return out


def dataset(name: str, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of family `name`: digits (8x8, one channel, rows as tokens or 64 features) or the
    shape images of bench/shape_images.py (3 x 24 x 24)."""
    if name == "rescnn-shapes":
        return shape_images(args.shape_images, size=24, seed=args.seed)
    data = load_digits()
    if name in ("cnn", "rescnn"):
        return (data.images / 16.0).reshape(-1, 1, 8, 8), data.target
    if name == "transformer":
        return data.images / 16.0, data.target  # [N, 8 rows, 8 pixels]
    return data.data, data.target


def build_family(name: str, args: argparse.Namespace, workdir: Path) -> Family:
    x, y = dataset(name, args)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=args.seed)
    if name == "mlp":
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    calib = {"input": corrupted(x_train[:args.calib], args.corrupt, args.corrupt_scale, args.seed)}
    models, seconds = {}, {}
    for kind in ("tsra", "relu"):
        torch.manual_seed(args.seed)
        if name in ("cnn", "rescnn"):
            module = digits_cnn(kind, args.width) if name == "cnn" else ResidualCnn(kind, args.width)
            options = dict(epochs=max(1, round(args.cnn_epochs * args.epoch_scale)), batch=64, lr=3e-3,
                           weight_decay=1e-4)
        elif name == "rescnn-shapes":
            module = ResidualCnn(kind, args.width, blocks=3, in_channels=3, pools=SHAPES_POOLS)
            options = dict(epochs=max(1, round(args.shapes_epochs * args.epoch_scale)), batch=64, lr=3e-3,
                           weight_decay=1e-4)
        elif name == "transformer":
            module = DigitsTransformer(kind, 2 * args.width)
            options = dict(epochs=max(1, round(args.mlp_epochs * args.epoch_scale)), batch=64, lr=2e-3,
                           weight_decay=1e-4)
        else:
            module = digits_mlp(kind, args.hidden)
            options = dict(epochs=max(1, round(args.mlp_epochs * args.epoch_scale)), batch=64, lr=2e-3,
                           weight_decay=1e-4)
        seconds[kind] = train(module, x_train, y_train, seed=args.seed, **options)
        path = export_onnx(module, torch.from_numpy(x_train[:2]), workdir / f"{name}-{kind}.onnx",
                           exporter="legacy", opset=17, fold_bn=True)
        models[kind] = onnx.load(path)
    models["tsra-canonical"] = canonical(models["tsra"], calib)
    if name == "cnn":
        w = args.width
        description = (f"CNN conv{w}-conv{w}-avgpool-conv{2 * w}-GAP-fc10 on digits 8x8 "
                       f"(TSRA: RMSNorm+TSRA split C/2; control: BN+ReLU), {options['epochs']} epochs")
    elif name == "rescnn":
        w = args.width
        description = (f"residual CNN conv{w}, 2 blocks x+conv{w}(act(conv{w}(x))), norm, mean over H,W, fc10 on "
                       f"digits 8x8 (TSRA: RMSNorm+TSRA split C/2, weightless RMSNorm on the stream; "
                       f"control: BN+ReLU), {options['epochs']} epochs")
    elif name == "rescnn-shapes":
        w = args.width
        description = (f"residual CNN conv{w}, 3 blocks x+conv{w}(act(conv{w}(x))) with AvgPool 2 after the first "
                       f"two, norm, mean over H,W, fc10 on {args.shape_images} shape images 3x24x24 "
                       f"(bench/shape_images.py; TSRA: RMSNorm+TSRA split C/2, weightless RMSNorm on the stream; "
                       f"control: BN+ReLU), {options['epochs']} epochs")
    elif name == "transformer":
        w = 2 * args.width
        description = (f"transformer on digits: 8 pixel rows as tokens, d={w}, 4 heads, 2 pre-norm blocks, FFN {2 * w}, "
                       f"mean over tokens, fc10 (TSRA: weightless RMSNorm over the last axis, FFN RMSNorm+TSRA split "
                       f"{w}; control: LayerNorm, ReLU), {options['epochs']} epochs")
    else:
        h = args.hidden
        description = (f"MLP 64-{h}-{h}-10 on digits features (TSRA: RMSNorm+TSRA split {h // 2}; "
                       f"control: BN+ReLU), {options['epochs']} epochs")
    return Family(name, description, models, {k: calib for k in models}, {"input": x_test}, y_test, seconds)


# ---------------------------------------------------------------- measuring


def run_one(family: Family, method: str, target: float, threads: int,
            round_to: str = "auto") -> tuple[dict[str, Any], float]:
    which, options = METHODS[method]
    start = time.perf_counter()
    result = graphopt.optimize(family.models[which], target_macs=target, calib=family.calib[which],
                               threads=threads, round_to=round_to, **options)
    seconds = time.perf_counter() - start
    logits = predict(result.model, family.test)
    report = result.report
    stats = report["passes"][-1].get("stats", {})
    dense_key = "relu" if which == "relu" else "tsra"
    dense = family.dense_logits[dense_key]
    row = {
        "model": family.name, "method": method, "network": dense_key, "target": target,
        "accuracy": accuracy(logits, family.labels),
        "drop": family.dense_accuracy[dense_key] - accuracy(logits, family.labels),
        "macs_ratio": report["macs_ratio"],
        "params_ratio": report["params_after"] / report["params_before"],
        "test_rel_l2": float(np.linalg.norm(logits - dense) / np.linalg.norm(dense)),
        "calib_rel_l2": report["fidelity"].get("rel_l2"),
        "channels_removed": stats.get("channels_removed"),
        "cheapest_restore": stats.get("cheapest_restore"),
        "skipped": report["passes"][-1].get("skipped", []),
    }
    return row, seconds


def run_family(family: Family, names: list[str], targets: tuple[float, ...], repeats: int, threads: int,
               round_to: str = "auto") -> None:
    for kind in ("tsra", "relu", "tsra-canonical"):
        family.dense_logits[kind] = predict(family.models[kind], family.test)
        family.dense_accuracy[kind] = accuracy(family.dense_logits[kind], family.labels)
    if family.dense_accuracy["tsra-canonical"] != family.dense_accuracy["tsra"]:
        raise RuntimeError("canonicalised TSRA model changed the dense accuracy")
    for target in targets:
        rows: dict[str, dict[str, Any]] = {}
        times: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                row, seconds = run_one(family, name, target, threads, round_to)
                if name in rows and rows[name]["accuracy"] != row["accuracy"]:
                    raise RuntimeError(f"{family.name} {name} @ {target}: accuracy differs between repeats")
                rows[name] = row
                times[name].append(seconds)
        for name in names:
            rows[name].update(seconds=statistics.median(times[name]), seconds_all=times[name])
            family.rows.append(rows[name])


# ---------------------------------------------------------------- reporting


def methods(family: Family) -> list[str]:
    """The methods run on `family`, in METHODS order."""
    return [name for name in METHODS if any(r["method"] == name for r in family.rows)]


def lookup(family: Family, method: str, target: float) -> dict[str, Any]:
    return next(r for r in family.rows if r["method"] == method and r["target"] == target)


def reliable(family: Family, method: str, targets: tuple[float, ...]) -> dict[str, Any]:
    """Walk the targets from the least aggressive; stop at the first drop > 1 point."""
    best = None
    for target in sorted(targets, reverse=True):
        row = lookup(family, method, target)
        if row["drop"] > RELIABLE_DROP + 1e-12:
            break
        best = row
    # also the loosest reading: the smallest MACs ratio anywhere with drop <= 1 point
    anywhere = [lookup(family, method, t) for t in targets if lookup(family, method, t)["drop"] <= RELIABLE_DROP + 1e-12]
    loose = min(anywhere, key=lambda r: r["macs_ratio"]) if anywhere else None
    return {"macs_ratio": best["macs_ratio"] if best else None, "params_ratio": best["params_ratio"] if best else None,
            "target": best["target"] if best else None,
            "loose_macs_ratio": loose["macs_ratio"] if loose else None,
            "loose_params_ratio": loose["params_ratio"] if loose else None}


def fmt(value: float | None, digits: int = 2) -> str:
    return "none" if value is None else f"{value:.{digits}f}"


def print_tables(family: Family, targets: tuple[float, ...], repeats: int) -> None:
    names = methods(family)
    print(f"\n## {family.name}: {family.description}")
    print(f"dense test accuracy: TSRA {family.dense_accuracy['tsra']:.4f}, ReLU+BN {family.dense_accuracy['relu']:.4f} "
          f"(gap TSRA - ReLU {100 * (family.dense_accuracy['tsra'] - family.dense_accuracy['relu']):+.2f} points) "
          f"on {len(family.labels)} test samples; trained in "
          + ", ".join(f"{k} {v:.1f} s" for k, v in family.train_seconds.items()))
    print("test accuracy (MACs ratio reached / params ratio reached)")
    print("target | " + " | ".join(f"{n:>22s}" for n in names))
    for target in targets:
        cells = [f"{r['accuracy']:.4f} ({r['macs_ratio']:.3f}/{r['params_ratio']:.3f})"
                 for r in (lookup(family, n, target) for n in names)]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>22s}" for c in cells))
    print("accuracy drop against its own dense model, points")
    print("target | " + " | ".join(f"{n:>14s}" for n in names))
    for target in targets:
        cells = [f"{100 * lookup(family, n, target)['drop']:+.2f}" for n in names]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>14s}" for c in cells))
    print("relative L2 error of the test logits against the dense model")
    print("target | " + " | ".join(f"{n:>14s}" for n in names))
    for target in targets:
        cells = [f"{lookup(family, n, target)['test_rel_l2']:.4f}" for n in names]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>14s}" for c in cells))
    print(f"optimize wall time, s (median of {repeats})")
    print("target | " + " | ".join(f"{n:>14s}" for n in names))
    for target in targets:
        cells = [f"{lookup(family, n, target)['seconds']:.3f}" for n in names]
        print(f"{target:6.2f} | " + " | ".join(f"{c:>14s}" for c in cells))
    print("reliable range (drop <= 1 point at this target and every less aggressive one): "
          "smallest MACs ratio / params ratio; [loose: smallest anywhere]")
    for name in names:
        r = reliable(family, name, targets)
        print(f"  {name:>14s}: MACs {fmt(r['macs_ratio'])} / params {fmt(r['params_ratio'])}  "
              f"[loose: MACs {fmt(r['loose_macs_ratio'])} / params {fmt(r['loose_params_ratio'])}]")


def summary(families: list[Family], targets: tuple[float, ...]) -> dict[str, Any]:
    return {f.name: {"dense_accuracy": f.dense_accuracy,
                     "tsra_minus_relu_points": 100 * (f.dense_accuracy["tsra"] - f.dense_accuracy["relu"]),
                     "reliable": {m: reliable(f, m, targets) for m in methods(f)},
                     "median_seconds": {m: statistics.median(lookup(f, m, t)["seconds"] for t in targets)
                                        for m in methods(f)}}
            for f in families}


def readme_table(families: list[Family], targets: tuple[float, ...]) -> str:
    names = methods(families[0])
    lines = ["| model | dense TSRA / ReLU | " + " | ".join(f"{n} reliable" for n in names)
             + " | " + " | ".join(f"{n} @0.5" for n in names) + " |",
             "|---|---|" + "---|" * (2 * len(names))]
    for f in families:
        cells = []
        for n in names:
            r = reliable(f, n, targets)
            cells.append("none" if r["macs_ratio"] is None else f"{r['macs_ratio']:.2f} ({r['params_ratio']:.2f})")
        at = [f"{100 * lookup(f, n, 0.5)['accuracy']:.1f}" if 0.5 in targets else "-" for n in names]
        lines.append(f"| {f.name} | {100 * f.dense_accuracy['tsra']:.1f} / {100 * f.dense_accuracy['relu']:.1f} | "
                     + " | ".join(cells) + " | " + " | ".join(at) + " |")
    return "\n".join(lines)


def plot(families: list[Family], path: Path) -> None:
    """Test accuracy against the MACs ratio (top) and the parameter ratio (bottom) reached."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(families), figsize=(5.0 * len(families), 7.0), squeeze=False)
    styles = {"cob-pca": "-", "cob-l1pca": "-.", "cob-pca-snp": "-", "cob-pca-snp-self": ":", "cob+snp": "-", "cob+snp-original": "-.", "magnitude": "--", "snp": "--", "snp-original": ":", "cob+snp-original-repair": "-", "cob-pca-snp-repair": "-.", "cob-pca-snp-self-repair": ":", "snp-original-repair": ":",
              "relu-magnitude": ":"}  # colours tell cob-pca and cob-pca-snp apart
    for column, family in enumerate(families):
        for row, key in enumerate(("macs_ratio", "params_ratio")):
            axis = axes[row][column]
            for name in methods(family):
                rows = sorted((r for r in family.rows if r["method"] == name), key=lambda r: r[key])
                axis.plot([r[key] for r in rows], [r["accuracy"] for r in rows], styles[name], marker="o",
                          markersize=3, label=name)
            axis.axhline(family.dense_accuracy["tsra"], color="C0", linewidth=0.7, alpha=0.6, label="dense TSRA")
            axis.axhline(family.dense_accuracy["relu"], color="C3", linewidth=0.7, alpha=0.6, label="dense ReLU")
            axis.axhspan(family.dense_accuracy["tsra"] - RELIABLE_DROP, family.dense_accuracy["tsra"],
                         color="C0", alpha=0.08)
            axis.set_xlabel("MACs kept (reached)" if key == "macs_ratio" else "parameters kept (reached)")
            axis.set_title(f"{family.name}", fontsize=10)
            axis.grid(alpha=0.3)
            axis.invert_xaxis()
        axes[0][column].set_ylabel("test accuracy (no fine-tuning)")
        axes[1][column].set_ylabel("test accuracy (no fine-tuning)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,rescnn,mlp", help="comma-separated subset of cnn, rescnn, mlp, "
                                                                    "transformer, rescnn-shapes")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated MAC ratios")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--corrupt", type=float, default=0.0,
                        help="fraction of the calibration samples replaced by Gaussian noise (test data stay clean)")
    parser.add_argument("--corrupt-scale", type=float, default=10.0,
                        help="standard deviation of that noise, in units of the data's standard deviation")
    parser.add_argument("--repeats", type=int, default=3, help="optimize calls per method and target (median time)")
    parser.add_argument("--calib", type=int, default=256, help="calibration samples from the training split")
    parser.add_argument("--width", type=int, default=16, help="CNN width C (C, C, 2C channels)")
    parser.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    parser.add_argument("--cnn-epochs", type=int, default=30)
    parser.add_argument("--mlp-epochs", type=int, default=60)
    parser.add_argument("--shapes-epochs", type=int, default=15)
    parser.add_argument("--shape-images", type=int, default=8000, help="images generated for rescnn-shapes "
                                                                      "(70/30 train/test split)")
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every model's training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-to", default="auto", help="channel multiple for every method (auto, or N; 1: exact "
                                                           "counts)")
    add_thread_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for NAME.json / NAME.png")
    parser.add_argument("--name", default="cob", help="stem of the result files")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: targets 0.7,0.5, one repeat, epoch scale 0.3")
    args = parser.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.targets, args.repeats, args.epoch_scale = "0.7,0.5", 1, 0.3
    return args


def main() -> int:
    args = parse_args()
    targets = tuple(float(t) for t in args.targets.split(","))
    info = start_run(args)
    start = time.perf_counter()
    families = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            family = build_family(name, args, Path(workdir))
            run_family(family, args.methods.split(","), targets, args.repeats, args.ort_threads, args.round_to)
            print_tables(family, targets, args.repeats)
            families.append(family)
    result = summary(families, targets)
    table = readme_table(families, targets)
    print("\n## README table (reliable range = smallest MACs (params) ratio with drop <= 1 point at it and every "
          "less aggressive target; test accuracy % at 0.5 MACs)\n" + table)
    total = time.perf_counter() - start
    print(f"\ntotal runtime {total:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(families, args.out / f"{args.name}.png")
    payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "total_seconds": total,
               "methods": {k: {"model": m, **o} for k, (m, o) in METHODS.items() if k in args.methods.split(",")},
               "targets": targets,
               "summary": result, "readme_table": table,
               "models": [{"name": f.name, "description": f.description, "dense_accuracy": f.dense_accuracy,
                           "test_samples": len(f.labels), "train_seconds": f.train_seconds, "rows": f.rows}
                          for f in families]}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out / f'{args.name}.json'} and {args.out / f'{args.name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

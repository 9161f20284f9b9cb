"""ExPrune on convolutions, timed: graphopt.ExPruneConvRelu's native kernel against onnxruntime's Conv+Relu on
the feature maps of a trained CNN and on Gaussian maps, and the exprune pass end to end on that CNN.

The CNN is built and trained here on real photographs: the two images scikit-learn ships
(`sklearn.datasets.load_sample_images`, 427 x 640, no download), cut into 112 x 112 crops, each rotated by
0, 90, 180 or 270 degrees; the task is which image and which rotation (8 classes, a standard self-supervised
pretext task). Training crops come from the left 448 columns of each image, held-out crops from the right
192. The network is ResNet-shaped at a quarter of ResNet-18's 224 px work: a stride-2 stem to 56 x 56, then
3x3 convolutions of 64 channels at 56 x 56, 128 at 28 x 28, 256 at 14 x 14 and 7 x 7 (BatchNorm, ReLU,
max pooling between stages), global average pooling and a linear classifier.

Part 1, per layer: for every Conv+ReLU whose input has more than one channel, its input maps on held-out
crops are captured, ExPrune's thresholds are calibrated on them (probe 1/4 of the input channels,
false-negative rate 0.05 per output channel: graphopt.passes.exprune.conv.ConvScoring) and the op is timed
against Conv+Relu alone at batch 1 (graphopt.passes.exprune.timing.time_conv: interleaved rounds, full graph
optimisation) on the typical map; then the same layer on Gaussian maps of the same shape with one threshold
per channel set so that the same fraction of positions is skipped (decisions scattered at random rather than
in regions); then the op's function body (what stock onnxruntime runs) and the kernel with thresholds that
never fire, on the trained maps.

Part 2, the pass: `graphopt.optimize(method="exprune")` with its defaults (tolerance top1=0.99 on held-out
calibration crops; each Conv+ReLU timed alone and in the model, kept only where faster) and with
`exprune_layers="all"` (every layer replaced, untimed), each timed against the same CNN through the
pre-passes (`method="none"`) at batch 1, and scored on held-out crops.

    graphopt ops build && python bench/exprune_conv.py --threads 2    # the README table, about 14 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, add_thread_arguments, predict, start_run, train  # noqa: E402

import graphopt  # noqa: E402
from graphopt.calibration.data import load_data  # noqa: E402
from graphopt.calibration.maps import sample_maps  # noqa: E402
from graphopt.ir import graph as ir  # noqa: E402
from graphopt.passes.exprune.conv import ConvScoring  # noqa: E402
from graphopt.passes.exprune.layers import discover  # noqa: E402
from graphopt.passes.exprune.timing import time_conv  # noqa: E402

CROP, TRAIN_COLUMNS = 112, 448


def photographs() -> list[np.ndarray]:
    """scikit-learn's two sample photographs as float32 [3, 427, 640], standardised per channel."""
    from sklearn.datasets import load_sample_images

    images = [np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 for image in load_sample_images().images]
    stacked = np.stack(images)
    mean, std = stacked.mean(axis=(0, 2, 3), keepdims=True)[0], stacked.std(axis=(0, 2, 3), keepdims=True)[0]
    return [(image - mean) / std for image in images]


def crops(images: list[np.ndarray], count: int, held_out: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` rotated crops [count, 3, CROP, CROP] and labels image · 4 + quarter turns."""
    rng = np.random.default_rng(seed)
    x = np.empty((count, 3, CROP, CROP), dtype=np.float32)
    y = np.empty(count, dtype=np.int64)
    for i in range(count):
        which, turns = int(rng.integers(len(images))), int(rng.integers(4))
        image = images[which]
        low, high = (TRAIN_COLUMNS, image.shape[2] - CROP) if held_out else (0, TRAIN_COLUMNS - CROP)
        top, left = int(rng.integers(image.shape[1] - CROP + 1)), int(rng.integers(low, high + 1))
        x[i] = np.rot90(image[:, top:top + CROP, left:left + CROP], turns, axes=(1, 2))
        y[i] = which * 4 + turns
    return x, y


def cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32, 2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                         *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
                         *block(128, 256), *block(256, 256), nn.MaxPool2d(2), *block(256, 256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 8))


def export(module: nn.Module, path: Path) -> onnx.ModelProto:
    torch.onnx.export(module, torch.zeros(1, 3, CROP, CROP), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return onnx.load(str(path))


def gaussian_like(maps: np.ndarray, layer, found, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian maps of the shape of `maps` (scaled to their RMS) and per-channel thresholds that skip each
    channel's share of positions seen on the real maps, so only where the skips fall differs."""
    from graphopt.ops.exprune_conv import exprune_conv_reference

    rng = np.random.default_rng(seed)
    rms = float(np.sqrt(np.mean(np.square(maps))))
    noise = (rng.standard_normal(maps.shape) * rms).astype(np.float32)
    scoring = ConvScoring(noise.astype(np.float64), layer, 0.25, "threshold")
    weight = layer.weight[:, found.perm]
    _, skipped = exprune_conv_reference(maps[:4], weight, layer.bias, found.tau, found.perm, found.m, None,
                                        layer.strides, layer.pads, layer.dilations)
    rate = skipped.mean(axis=(0, 2, 3))  # per output channel
    score = scoring.scores[:, :, 0]
    tau = np.array([np.quantile(score[:, j], rate[j]) if rate[j] > 0 else -np.inf for j in range(score.shape[1])],
                   dtype=np.float32)
    return noise, tau


def function_body(timed):
    """`timed()` with the native kernels unregistered: stock onnxruntime runs the op's function body."""
    import os

    saved = os.environ.get("GRAPHOPT_OPS_LIBRARY")
    os.environ["GRAPHOPT_OPS_LIBRARY"] = "/nonexistent/libgraphopt_ops.so"
    try:
        return timed()
    finally:
        if saved is None:
            del os.environ["GRAPHOPT_OPS_LIBRARY"]
        else:
            os.environ["GRAPHOPT_OPS_LIBRARY"] = saved


def per_layer(folded: onnx.ModelProto, x: np.ndarray, threads: int) -> list[dict]:
    from dataclasses import replace as replaced

    graph = ir.import_graph(folded)
    layers, _ = discover(graph, "conv")
    # the pass's own sampler: whole input maps of the first len(x) samples
    maps = sample_maps(folded, load_data({"image": x}, folded), [layer.source.name for layer in layers],
                       max_items=len(x), batch_size=8)
    rows = []
    for layer in layers:
        sample = maps[layer.source.name].astype(np.float64)
        scoring = ConvScoring(sample, layer, 0.25, "threshold")
        found = scoring.calibrate(0.05)
        real = time_conv(layer, found, "threshold", sample[:8], threads, 17)
        noise, tau = gaussian_like(sample.astype(np.float32), layer, found, seed=0)
        gaussian = time_conv(layer, replaced(found, tau=tau), "threshold", noise[:8].astype(np.float64), threads, 17)
        body = function_body(lambda: time_conv(layer, found, "threshold", sample[:8], threads, 17))
        never = replaced(found, tau=np.full(len(found.tau), -np.inf, dtype=np.float32))  # nothing skipped
        dense_path = time_conv(layer, never, "threshold", sample[:8], threads, 17)
        shape = list(sample.shape[1:])
        rows.append({"layer": layer.name, "input": shape, "output_channels": int(layer.weight.shape[0]),
                     "skip_rate": found.skip_rate, "macs_skipped": found.macs_skipped, "fnr": found.fnr,
                     "trained_maps": real, "gaussian_maps": gaussian, "function_body": body,
                     "nothing_skipped": dense_path})
        print(f"{layer.name:>12} {'x'.join(map(str, shape)):>12} -> {layer.weight.shape[0]:>3}: skipped "
              f"{found.skip_rate:.2f}, dense/op {real['speedup']:.2f} ({real['speedup_p10']:.2f}-"
              f"{real['speedup_p90']:.2f}) on trained maps, {gaussian['speedup']:.2f} ({gaussian['speedup_p10']:.2f}-"
              f"{gaussian['speedup_p90']:.2f}) on Gaussian maps, {body['speedup']:.2f} as the function body, "
              f"{dense_path['speedup']:.2f} with nothing skipped; dense "
              f"{real['dense_ms']:.3f} ms", flush=True)
    return rows


def end_to_end(model: onnx.ModelProto, folded: onnx.ModelProto, calib: np.ndarray, test: tuple[np.ndarray, np.ndarray],
               threads: int, rounds: int) -> list[dict]:
    from graphopt.evaluate import compare_latency

    rows = []
    base = accuracy(predict(folded, {"image": test[0]}), test[1])
    for label, options in (("exprune (defaults)", {}), ("exprune --exprune-layers all", {"exprune_layers": "all"})):
        start = time.perf_counter()
        result = graphopt.optimize(model, method="exprune", calib={"image": calib}, threads=threads, progress=False,
                                   **options)
        seconds = time.perf_counter() - start
        stats = next(p for p in result.report["passes"] if p["pass"] == "exprune")
        timing = compare_latency(folded, result.model, data={"image": test[0][:1]}, batch=1, rounds=rounds,
                                 threads=threads)
        row = {"run": label, "seconds": seconds, "accuracy": accuracy(predict(result.model, {"image": test[0]}),
                                                                      test[1]),
               "dense_accuracy": base, "conv_layers": stats["stats"].get("conv_layers", 0),
               "macs_skipped": result.report.get("exprune_macs_skipped", {}).get("fraction_of_model"),
               "speedup": timing["speedup"], "speedup_p10": timing["speedup_p10"],
               "speedup_p90": timing["speedup_p90"], "dense_ms": timing["reference_ms"],
               "ms": timing["candidate_ms"], "left_dense": [s for s in stats["skipped"] if "left dense" in s],
               "stats": stats["stats"]}
        rows.append(row)
        print(f"{label}: {row['conv_layers']} convolution op(s), {row['macs_skipped'] or 0:.1%} of MACs skipped, "
              f"accuracy {row['accuracy']:.3f} (dense {base:.3f}), {row['speedup']:.2f}x "
              f"({row['speedup_p10']:.2f}-{row['speedup_p90']:.2f}) of the dense model at batch 1, {seconds:.0f} s",
              flush=True)
        for line in row["left_dense"]:
            print("   ", line)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2400, help="training crops")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--calib", type=int, default=1600,
                        help="calibration crops (training region; the pass holds a quarter out to certify top1)")
    parser.add_argument("--test", type=int, default=400, help="held-out crops")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds of the whole-model timings")
    parser.add_argument("--timing-threads", type=int, default=1, help="onnxruntime threads of every timing")
    parser.add_argument("--output", default="bench/results/exprune_conv.json")
    add_thread_arguments(parser)
    args = parser.parse_args()
    info = start_run(args)
    torch.manual_seed(0)
    images = photographs()
    x, y = crops(images, args.train, held_out=False, seed=1)
    test = crops(images, args.test, held_out=True, seed=2)
    calib, _ = crops(images, args.calib, held_out=False, seed=3)
    module = cnn()
    seconds = train(module, x, y, epochs=args.epochs, batch=32, lr=2e-3, seed=0, weight_decay=1e-4)
    work = Path(args.output).with_suffix("")
    work.parent.mkdir(parents=True, exist_ok=True)
    model = export(module, Path(f"{work}.onnx.tmp"))
    Path(f"{work}.onnx.tmp").unlink()
    folded = graphopt.optimize(model, method="none", progress=False).model
    print(f"trained in {seconds:.0f} s; accuracy {accuracy(predict(folded, {'image': x[:400]}), y[:400]):.3f} on training "
          f"crops, {accuracy(predict(folded, {'image': test[0]}), test[1]):.3f} held out", flush=True)
    layers = per_layer(folded, test[0][:16], args.timing_threads)
    runs = end_to_end(model, folded, calib, test, args.timing_threads, args.rounds)
    Path(args.output).write_text(json.dumps({"machine": info, "args": vars(args), "train_seconds": seconds,
                                             "layers": layers, "runs": runs}, indent=1, default=float))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

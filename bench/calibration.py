"""Calibration cost against plain onnxruntime inference, on a ResNet-18-sized CNN and a BERT-base-sized encoder;
with --workers N, calibration in one process against calibration sharded over N Ray workers.

For each model: build it in torch (random weights), export with torch.onnx.export(dynamo=False), then
interleave, per repeat, plain inference over all samples (a new session with full graph optimisation,
batches of --batch-size) and calibration of every statistic kind (by default all, Gram included) for the input of
every Conv/Gemm/MatMul with a constant weight, as `graphopt calibrate` does. Reports the median
time of each, samples/s, the ratio, and the peak RSS each adds (Linux: VmHWM after a reset).

    python bench/calibration.py                                  # 256 samples, full sizes
    python bench/calibration.py --samples 64 --seq-len 64        # quicker on small machines
    python bench/calibration.py --models resnet50 --samples 512 --workers 2   # 1 process vs 2 Ray workers

With --workers N (needs graphopt[ray]): a local Ray instance with N CPUs is started once (its start-up
time is printed apart), then each repeat times, interleaved, the same statistics measured in one process
(onnxruntime and accumulation threads: --threads, default all cores) and on N shard tasks (one thread
each; a fresh `Cluster` per repeat, so shipping the data shards to the object store is timed too).
Reports the medians, their ratio, and the largest relative difference between the two results.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import graphopt
from common import BasicBlock
from zoo_architectures import resnet50
from graphopt.calibration.capture import linear_inputs
from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import load_data
from graphopt.calibration.session import make_session
from graphopt.calibration.stats import KINDS, StatRequest

MIB = 1024**2


def resnet18(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    width = 64
    for outputs, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
        width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        split = lambda t: t.view(batch, tokens, self.heads, hidden // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / (hidden // self.heads) ** 0.5 + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, hidden)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn: int, vocab: int, tokens: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, hidden), nn.Parameter(torch.randn(tokens, hidden) * 0.02)
        self.norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids) + self.position[: ids.shape[1]])
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return torch.tanh(self.pooler(x[:, 0]))


def export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path) -> onnx.ModelProto:
    module.eval()
    axes = {name: {0: "batch"} for name in names}
    torch.onnx.export(module, example, str(path), input_names=names, output_names=["out"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return onnx.load(str(path))


def peak_added(run: Callable[[], object]) -> tuple[float, int]:
    """Seconds `run` takes and the peak RSS it adds over the RSS before it (bytes; -1 without /proc)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _status("VmRSS:")
    except OSError:
        base = None
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return seconds, (_status("VmHWM:") - base if base is not None else -1)


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))


def measure(name: str, model: onnx.ModelProto, data: dict[str, np.ndarray], args: argparse.Namespace,
            mask_input: str | None) -> None:
    dataset = load_data(data, model)
    kinds = KINDS if args.kinds == "all" else KINDS - {"gram"}
    requests = [StatRequest(r.tensor, kinds, r.channel_axis) for r in linear_inputs(model)]
    samples = dataset.num_samples or 0

    def infer() -> None:  # a fresh session, as calibration makes its own: both peaks include one
        session = make_session(model, optimize=True, threads=args.threads, device=args.device)
        for batch in dataset.batches(args.batch_size):
            session.run(None, batch)

    def calibrate() -> None:
        calibrator = Calibrator(dataset, batch_size=args.batch_size, memory_limit=args.calib_memory,
                                threads=args.threads, mask_input=mask_input, device=args.device)
        calibrator.statistics(model, requests)

    infer()  # warm-up
    timings: dict[str, list[tuple[float, int]]] = {"infer": [], "calibrate": []}
    for _ in range(args.repeats):
        timings["infer"].append(peak_added(infer))
        timings["calibrate"].append(peak_added(calibrate))
    median = {k: statistics.median(t for t, _ in v) for k, v in timings.items()}
    peak = {k: max(p for _, p in v) for k, v in timings.items()}
    print(f"\n{name} ({args.device}): {samples} samples, batch {args.batch_size}, {len(requests)} tensors "
          f"({'all kinds' if args.kinds == 'all' else 'all kinds but gram'}), {args.repeats} repeats (median)")
    for key in ("infer", "calibrate"):
        print(f"  {key:9s} {median[key]:8.2f} s  {samples / median[key]:8.1f} samples/s  "
              f"peak +{peak[key] / MIB:7.0f} MiB")
    print(f"  ratio     {median['calibrate'] / median['infer']:8.2f}x time   "
          f"{peak['calibrate'] / max(peak['infer'], 1):5.2f}x peak RSS added")


def compare_workers(name: str, model: onnx.ModelProto, data: dict[str, np.ndarray], args: argparse.Namespace,
                    mask_input: str | None) -> None:
    """One process against --workers Ray shard tasks on the same statistics (see the module docstring)."""
    import ray

    from graphopt.calibration.cluster import Cluster

    dataset = load_data(data, model)
    kinds = KINDS if args.kinds == "all" else KINDS - {"gram"}
    requests = [StatRequest(r.tensor, kinds, r.channel_axis) for r in linear_inputs(model)]

    def calibrate(cluster: Cluster | None, on: object = dataset) -> dict:
        return Calibrator(on, batch_size=args.batch_size, memory_limit=args.calib_memory, threads=args.threads,
                          mask_input=mask_input, cluster=cluster).statistics(model, requests)

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    startup = time.perf_counter() - start
    with Cluster(args.workers, None) as cluster:  # warm-up: worker processes start and import graphopt once
        first = {name: array[:args.workers * args.batch_size] for name, array in data.items()}
        calibrate(cluster, load_data(first, model))
    timings: dict[str, list[float]] = {"one process": [], f"{args.workers} workers": []}
    worst = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        single = calibrate(None)
        timings["one process"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with Cluster(args.workers, None) as cluster:
            sharded = calibrate(cluster)
        timings[f"{args.workers} workers"].append(time.perf_counter() - start)
        for tensor, stats in single.items():
            expected = stats.gram() if stats.has_gram else stats.var
            got = sharded[tensor].gram() if stats.has_gram else sharded[tensor].var
            worst = max(worst, float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-300)))
    ray.shutdown()
    median = {key: statistics.median(values) for key, values in timings.items()}
    samples = dataset.num_samples or 0
    print(f"\n{name}: {samples} samples, batch {args.batch_size}, {len(requests)} tensors, {args.repeats} repeats "
          f"(median); Ray start-up {startup:.1f} s and a warm-up run "
          "of the workers not included")
    for key, seconds in median.items():
        print(f"  {key:12s} {seconds:8.2f} s  {samples / seconds:8.1f} samples/s")
    print(f"  ratio        {median[f'{args.workers} workers'] / median['one process']:8.2f}x time   "
          f"largest relative difference {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,bert", help="comma-separated: resnet18, resnet50, bert")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="onnxruntime device of inference and calibration (cuda: onnxruntime-gpu)")
    parser.add_argument("--calib-memory", default="2GB")
    parser.add_argument("--kinds", choices=["all", "no-gram"], default="all")
    parser.add_argument("--workers", type=int, default=0,
                        help="compare one process with this many Ray workers (needs graphopt[ray]) instead of "
                             "calibration with inference")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {platform.system()} "
          f"{platform.release()}; python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, graphopt {graphopt.__version__}")
    with tempfile.TemporaryDirectory() as workdir:
        run = compare_workers if args.workers else measure
        size = args.image_size
        for label, builder in [("resnet18", resnet18), ("resnet50", resnet50)]:
            if label in args.models.split(","):
                model = export(builder(), (torch.randn(1, 3, size, size),), ["image"], Path(workdir) / f"{label}.onnx")
                images = rng.standard_normal((args.samples, 3, size, size)).astype(np.float32)
                run(f"{label.replace('resnet', 'ResNet-')} {size}x{size}", model, {"image": images}, args, None)
        if "bert" in args.models:
            tokens = args.seq_len
            encoder = Encoder(args.layers, 768, 12, 3072, 30522, tokens)
            example = (torch.zeros(1, tokens, dtype=torch.int64), torch.ones(1, tokens, dtype=torch.int64))
            model = export(encoder, example, ["ids", "mask"], Path(workdir) / "bert.onnx")
            lengths = rng.integers(tokens // 2, tokens + 1, size=args.samples)
            data = {"ids": rng.integers(0, 30522, size=(args.samples, tokens)).astype(np.int64),
                    "mask": (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)}
            run(f"BERT-base-sized encoder ({args.layers} layers, {tokens} tokens)", model, data, args, "mask")


if __name__ == "__main__":
    sys.exit(main())

"""Channel analysis and pruning cost against graph size: ResNet-50 (bottleneck blocks [3, 4, 6, 3], widths
64..2048) and depth-scaled versions of it (every stage's block count times 2, 4, ...), built in torch and
exported with the legacy exporter (BatchNorm folded).

On each variant's graph after the normalising pre-passes, the magnitude pass's phases are timed:
  shapes   export + batch-1 shape inference (ONNX shape inference; scales with weight bytes as well)
  groups   channel-group analysis (find_groups) as the pass runs it, weights loaded lazily on first read
  rules    the same analysis again, weights already loaded: rules, atoms, sites -- what must stay linear
  macs     per-node MAC count (count_cost runs a second batch-1 shape inference of its own)
  budget   magnitude scores and the global MAC budget (choose_counts)
  engine   rewriting every site (apply_kept)
  pass     the whole magnitude pass, end to end, on a fresh copy
After one untimed warm-up run per variant, variants are interleaved within each repeat (the quick
rules and budget phases run 5 times per repeat); medians over repeats are reported with rules
microseconds per node and each variant's time ratio next to its node-count ratio (relative to 1x):
linear growth keeps the two ratios close. Peak memory: tracemalloc's peak during one extra, untimed run of the whole pass (Python and
numpy allocations; onnx's C++ shape inference is not traced).

    python bench/prune_scaling.py                            # depths 1 2 4, 224x224, 3 repeats
    python bench/prune_scaling.py --depths 1 2 --image 112   # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
import torch
from torch import nn

import graphopt
from graphopt.analysis.groups import find_groups, name_nodes
from graphopt.calibration.shapes import batch1_shapes, count_cost
from graphopt.ir import graph as ir
from graphopt.passes import PREPASSES, PassContext, PassManager, get_pass
from graphopt.passes.channels.budget import MacModel, choose_counts, top_indices
from graphopt.passes.channels.engine import apply_kept
from graphopt.passes.channels.magnitude import magnitude_scores
from graphopt.torch.export import export_onnx

PHASES = ("shapes", "groups", "rules", "macs", "budget", "engine", "pass")
STAGES = ((64, 256, 3, 1), (128, 512, 4, 2), (256, 1024, 6, 2), (512, 2048, 3, 2))  # mid, out, blocks, stride
TARGET = 0.5
INNER = 5  # runs per repeat of the quick, read-only phases (groups, budget)


class Bottleneck(nn.Module):
    def __init__(self, inputs: int, mid: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
        self.down = None if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50(depth: int, classes: int = 1000) -> nn.Module:
    """ResNet-50 with every stage's block count multiplied by `depth` (depth 1 is ResNet-50 itself)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    width = 64
    for mid, outputs, blocks, stride in STAGES:
        for index in range(blocks * depth):
            layers.append(Bottleneck(width, mid, outputs, stride if index == 0 else 1))
            width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers).eval()


def prepared(depth: int, image: int, folder: Path) -> onnx.ModelProto:
    """The exported variant after the normalising pre-passes (what the magnitude pass starts from)."""
    torch.manual_seed(depth)
    path = export_onnx(resnet50(depth), torch.randn(1, 3, image, image), folder / f"resnet50_x{depth}.onnx",
                       exporter="legacy", opset=17, fold_bn=True)
    model = onnx.load(str(path))
    graph = ir.import_graph(model)
    PassManager([get_pass(name) for name in PREPASSES]).run(graph, context(model, image))
    return ir.export_model(graph, model)


def context(model: onnx.ModelProto, image: int) -> PassContext:
    return PassContext(template=model, input_shapes={"input": (1, 3, image, image)}, progress=False,
                       options={"target_macs": TARGET})


def phases(model: onnx.ModelProto, image: int) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per phase of one magnitude pass, then the whole pass on a fresh graph; and graph facts."""
    ctx = context(model, image)
    graph = ir.import_graph(model)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    name_nodes(graph)
    exported = ir.export_model(graph, model, infer=False)
    shapes = batch1_shapes(exported, ctx.input_shapes)
    seconds["shapes"] = time.perf_counter() - start

    start = time.perf_counter()
    analysis = find_groups(graph, shapes)  # as in the pass: reading weights loads them from the proto
    groups = analysis.groups()
    seconds["groups"] = time.perf_counter() - start
    runs = []
    for _ in range(INNER):  # read-only: again, weights loaded, the median of a few runs steadies it
        start = time.perf_counter()
        analysis = find_groups(graph, shapes)
        groups = analysis.groups()
        runs.append(time.perf_counter() - start)
    seconds["rules"] = statistics.median(runs)

    start = time.perf_counter()
    per_node = count_cost(exported, ctx.input_shapes).per_node
    seconds["macs"] = time.perf_counter() - start

    runs = []
    for _ in range(INNER):
        start = time.perf_counter()
        prunable = [g for g in groups if g.prunable]
        scores = magnitude_scores(analysis, prunable, "l1")
        mac_model = MacModel(analysis, per_node, {g.root for g in prunable})
        counts = choose_counts(scores, mac_model, TARGET)
        kept = {g.root: top_indices(scores[g.root], counts[g.root]) for g in prunable if counts[g.root] < g.size}
        runs.append(time.perf_counter() - start)
    seconds["budget"] = statistics.median(runs)

    start = time.perf_counter()
    apply_kept(graph, analysis, kept)
    seconds["engine"] = time.perf_counter() - start

    fresh = ir.import_graph(model)
    start = time.perf_counter()
    result = get_pass("magnitude").run(fresh, ctx)
    seconds["pass"] = time.perf_counter() - start
    facts = {"nodes": len(graph.nodes), "groups": len(groups), "prunable": len(prunable),
             "sites": len(analysis.sites), "ratio_permille": round(1000 * mac_model.ratio(counts)),
             "removed": int(result.stats["channels_removed"])}
    return seconds, facts


def peak_bytes(model: onnx.ModelProto, image: int) -> int:
    graph = ir.import_graph(model)
    tracemalloc.start()
    try:
        get_pass("magnitude").run(graph, context(model, image))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4], help="block-count multipliers")
    parser.add_argument("--image", type=int, default=224, help="input height and width")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        models = {depth: prepared(depth, args.image, Path(folder)) for depth in args.depths}
    timings: dict[int, list[dict[str, float]]] = {depth: [] for depth in args.depths}
    facts: dict[int, dict[str, int]] = {}
    for depth in args.depths:  # warm-up: imports, allocator and caches, untimed
        phases(models[depth], args.image)
    for _ in range(args.repeats):
        for depth in args.depths:  # interleaved: drift in the machine hits every variant alike
            seconds, facts[depth] = phases(models[depth], args.image)
            timings[depth].append(seconds)
    peaks = {depth: peak_bytes(models[depth], args.image) for depth in args.depths}

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {platform.system()} "
          f"{platform.release()}; python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
          f"onnx-graphsurgeon {gs.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
          f"graphopt {graphopt.__version__}")
    print(f"ResNet-50 bottleneck stages x depth, input {args.image}x{args.image}, magnitude to {TARGET} of MACs; "
          f"median of {args.repeats} interleaved repeats")
    base = args.depths[0]
    median = {d: {p: statistics.median(t[p] for t in timings[d]) for p in PHASES} for d in args.depths}
    header = (f"{'depth':>5} {'nodes':>6} {'groups':>6} {'sites':>6} {'weights MB':>10} "
              + " ".join(f"{p + ' s':>9}" for p in PHASES)
              + f" {'rules us/node':>13} {'node ratio':>10} {'rules ratio':>11} {'pass ratio':>10} {'peak MB':>8}")
    print(header)
    for depth in args.depths:
        row, fact = median[depth], facts[depth]
        print(f"{depth:>4}x {fact['nodes']:>6} {fact['groups']:>6} {fact['sites']:>6} "
              f"{weight_bytes(models[depth]) / 2**20:>10.0f} "
              + " ".join(f"{row[p]:>9.3f}" for p in PHASES)
              + f" {1e6 * row['rules'] / fact['nodes']:>13.1f} {fact['nodes'] / facts[base]['nodes']:>10.2f}"
              f" {row['rules'] / median[base]['rules']:>11.2f} {row['pass'] / median[base]['pass']:>10.2f}"
              f" {peaks[depth] / 2**20:>8.0f}")
    for depth in args.depths:
        fact = facts[depth]
        print(f"{depth}x: {fact['prunable']} of {fact['groups']} groups prunable, {fact['removed']} channels removed, "
              f"MACs ratio {fact['ratio_permille'] / 1000:.3f}")


if __name__ == "__main__":
    sys.exit(main())

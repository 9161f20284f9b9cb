"""How onnxruntime's CPU latency steps with channel counts: the measurements behind `--round-to auto`.

Three small graphs, each timed over a sweep of one channel count, every count in the same interleaved
rounds (one intra-op thread, full graph optimisation, batch 1):
- conv:      Conv 3x3 64->C (28x28) + Relu + Conv 1x1 C->64: C sweeps the output channels of a dense conv;
- depthwise: Conv 1x1 32->C + Relu + depthwise 3x3 on C + Relu + Conv 1x1 C->32 (28x28);
- conv-small, depthwise-small: the same with 16 channels around C at 56x56 (`--small-side`), C up to two
  blocks (how a small group, a stem or an early MobileNet stage, steps);
- matmul:    MatMul [T, 384] x [384, C] + Relu + MatMul [C, 384] at T = 1 and 128 tokens.
Prints, per count, the median latency and its ratio to the next multiple of the block above it.

    python bench/alignment.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.channels.alignment import cpu_block

SWEEPS = {
    "conv": [33, 36, 40, 47, 48, 52, 60, 63, 64],
    "depthwise": [81, 84, 90, 92, 94, 95, 96, 100, 112],
    "conv-small": [8, 12, 16, 20, 24, 28, 32],
    "depthwise-small": [8, 12, 16, 20, 24, 28, 32],
    "matmul-1": [1000, 1008, 1016, 1020, 1024, 1030, 1040],
    "matmul-128": [1000, 1008, 1016, 1020, 1024, 1030, 1040],
}


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build(kind: str, count: int, small_side: int = 56) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(0)
    outer, side = (16, small_side) if kind.endswith("-small") else (64 if kind == "conv" else 32, 28)
    kind = kind.removesuffix("-small")
    if kind == "conv":
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Conv", ["b", "w2"], ["y"])]
        inits = [_weight(rng, "w1", count, outer, 3, 3), _weight(rng, "w2", outer, count, 1, 1)]
        shape = [1, outer, side, side]
        return _model(nodes, inits, shape), rng.random(shape, dtype=np.float32)
    if kind == "depthwise":
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Conv", ["b", "wd"], ["d"], pads=[1] * 4, group=count),
                 helper.make_node("Relu", ["d"], ["e"]), helper.make_node("Conv", ["e", "w2"], ["y"])]
        inits = [_weight(rng, "w1", count, outer, 1, 1), _weight(rng, "wd", count, 1, 3, 3),
                 _weight(rng, "w2", outer, count, 1, 1)]
        shape = [1, outer, side, side]
        return _model(nodes, inits, shape), rng.random(shape, dtype=np.float32)
    tokens = int(kind.split("-")[1])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "w2"], ["y"])]
    inits = [_weight(rng, "w1", 384, count), _weight(rng, "w2", count, 384)]
    return _model(nodes, inits, [1, tokens, 384]), rng.random((1, tokens, 384), dtype=np.float32)


def sweep(kind: str, rounds: int, small_side: int = 56) -> dict[int, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions, feeds = {}, {}
    for count in SWEEPS[kind]:
        model, x = build(kind, count, small_side)
        sessions[count] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds[count] = {"x": x}
        sessions[count].run(None, feeds[count])
    times: dict[int, list[float]] = {count: [] for count in SWEEPS[kind]}
    for round_index in range(rounds):
        order = SWEEPS[kind] if round_index % 2 == 0 else SWEEPS[kind][::-1]
        for count in order:
            start = time.perf_counter()
            for _ in range(5):
                sessions[count].run(None, feeds[count])
            times[count].append((time.perf_counter() - start) / 5 * 1e3)
    return {count: float(np.median(values)) for count, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kinds", default=",".join(SWEEPS), help=f"comma-separated, from {', '.join(SWEEPS)}")
    parser.add_argument("--small-side", type=int, default=56, help="feature map side of the -small sweeps")
    args = parser.parse_args()
    block = cpu_block()
    print(f"onnxruntime {ort.__version__}, CPU block {block}, 1 thread, batch 1")
    for kind in args.kinds.split(","):
        medians = sweep(kind, args.rounds, args.small_side)
        print(f"\n{kind}: channels  median_ms  ratio to next multiple of {block}")
        for count, median in medians.items():
            aligned = -(-count // block) * block
            reference = medians.get(aligned)
            ratio = f"{median / reference:.2f}" if reference else "-"
            print(f"  {count:5d}  {median:9.4f}  {ratio}")


if __name__ == "__main__":
    main()

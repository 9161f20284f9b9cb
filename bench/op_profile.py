"""Where a model's time goes in onnxruntime: kernel time per op type, from onnxruntime's own profiler.

    python bench/op_profile.py MODEL.onnx [--batch 1] [--runs 30] [--threads 2] [--input NAME=SHAPE ...]

Runs the model `--runs` times (after 3 warm-up runs) at full graph optimisation on seeded inputs (integer
inputs such as token ids drawn from [0, --vocab)), then prints each op type's share of the summed kernel
time and its milliseconds per run (`--nodes N`: also the N slowest nodes, with the input shapes onnxruntime ran,
its blocked layouts' padded channels included). The decoder of bench/transformers.py is written to
bench/.cache/decoder_legacy.onnx; its inputs are [batch, 128] token ids:

    python bench/op_profile.py bench/.cache/decoder_legacy.onnx --input input_ids=1x128 --vocab 60
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def feeds(session: ort.InferenceSession, shapes: dict[str, tuple[int, ...]], batch: int, vocab: int
          ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    found = {}
    for value in session.get_inputs():
        shape = shapes.get(value.name) or tuple(batch if not isinstance(d, int) else d for d in value.shape)
        if "int" in value.type:
            found[value.name] = rng.integers(0, vocab, size=shape).astype(np.int64)
        else:
            found[value.name] = rng.standard_normal(shape).astype(np.float32)
    return found


def profile(path: str, shapes: dict[str, tuple[int, ...]], batch: int, runs: int, threads: int,
            vocab: int) -> tuple[collections.Counter, collections.Counter, dict[str, str], int]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = feeds(session, shapes, batch, vocab)
    for _ in range(3):
        session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    with open(session.end_profiling()) as handle:
        events = json.load(handle)
    per_op: collections.Counter = collections.Counter()
    per_node: collections.Counter = collections.Counter()
    inputs: dict[str, str] = {}  # node -> its op and input shapes as onnxruntime ran it (blocked layouts included)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]  # microseconds, warm-up runs included
            node = event["name"][:-len("_kernel_time")]
            per_node[node] += event["dur"]
            shapes_in = [next(iter(item.values())) for item in event["args"].get("input_type_shape", [])]
            inputs[node] = f"{event['args']['op_name']} {shapes_in}"
    return per_op, per_node, inputs, runs + 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1, help="size of the free axes (default 1)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=100, help="integer inputs are drawn from [0, VOCAB)")
    parser.add_argument("--nodes", type=int, default=0, help="also list the N slowest nodes with their input shapes")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE",
                        help="a fixed input shape, e.g. input_ids=1x128")
    args = parser.parse_args()
    shapes = {name: tuple(int(d) for d in dims.split("x"))
              for name, dims in (item.split("=", 1) for item in args.input)}
    per_op, per_node, inputs, runs = profile(args.model, shapes, args.batch, args.runs, args.threads, args.vocab)
    total = sum(per_op.values())
    print(f"{args.model}: {total / runs / 1e3:.3f} ms of kernel time per run ({args.threads} threads)")
    print("| op type | share | ms per run |\n|---|---|---|")
    for op, micros in per_op.most_common():
        print(f"| {op} | {100 * micros / total:.1f}% | {micros / runs / 1e3:.3f} |")
    if args.nodes:
        print("\n| node | op, input shapes | share | ms per run |\n|---|---|---|---|")
        for node, micros in per_node.most_common(args.nodes):
            print(f"| {node} | {inputs[node]} | {100 * micros / total:.1f}% | {micros / runs / 1e3:.3f} |")


if __name__ == "__main__":
    main()

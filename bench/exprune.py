"""Wall-clock of graphopt.ExPruneLinearRelu's native kernel against onnxruntime's dense MatMul+Add+Relu and
against the op's own function body (what stock onnxruntime runs), at several skip rates.

Per shape and batch, the three sessions (full graph optimisation, the same intra-op thread count; the
kernel itself is single-threaded) run interleaved, `--repeat` rounds of `--inner`
calls each; the median per call is reported with ratios against dense. The skip rate is imposed exactly:
Tau = +inf on a random subset of neurons (always skipped, after the probe), -inf on the rest.

    graphopt ops build && python bench/exprune.py                     # 4096->11008, 384->1536, 768->3072
    python bench/exprune.py --shapes 768x3072 --batches 1 32 --skips 0 0.5 0.9
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.ops.exprune import make_exprune_node
from graphopt.ops.functions import ensure_functions
from graphopt.ops.native import library_path, register


def _dense(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    n, d = w.shape
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _exprune(w: np.ndarray, b: np.ndarray, tau: np.ndarray, m: int) -> onnx.ModelProto:
    n, d = w.shape
    params = {"W": w, "B": b, "Tau": tau, "Perm": np.arange(d, dtype=np.int64)}
    graph = helper.make_graph([make_exprune_node(["x", *params], "y", m)], "exprune",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ensure_functions(model)
    return model


def _session(model: onnx.ModelProto, threads: int, kernel: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if kernel and not register(options):
        raise SystemExit("the native kernel is not built: run `graphopt ops build` first")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _time(session: ort.InferenceSession, feed: dict[str, np.ndarray], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        session.run(None, feed)
    return (time.perf_counter() - start) / inner


def bench(d: int, n: int, batch: int, skip: float, probe: float, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    tau = np.full(n, -np.inf, dtype=np.float32)
    tau[rng.permutation(n)[: int(round(skip * n))]] = np.inf
    m = max(1, int(round(probe * d)))
    exprune = _exprune(w, b, tau, m)
    sessions = {"dense": _session(_dense(w, b), args.threads, False),
                "body": _session(exprune, args.threads, False), "kernel": _session(exprune, args.threads, True)}
    feed = {"x": rng.standard_normal((batch, d)).astype(np.float32)}
    reference = sessions["body"].run(None, feed)[0]
    np.testing.assert_allclose(sessions["kernel"].run(None, feed)[0], reference, rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm-up
        _time(session, feed, 2)
    for _ in range(args.repeat):
        for name, session in sessions.items():
            times[name].append(_time(session, feed, args.inner))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x11008", "384x1536", "768x3072"], help="DxN")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--skips", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--probe", type=float, default=0.25, help="m as a fraction of d")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10)
    args = parser.parse_args()
    if library_path() is None:
        raise SystemExit("the native kernel is not built: run `graphopt ops build` first")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"onnxruntime {ort.__version__}, threads {args.threads}, probe {args.probe}, median of {args.repeat}x{args.inner}")
    print("| d->n | batch | skip | dense ms | body ms | kernel ms | dense/kernel | body/kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        d, n = (int(v) for v in shape.lower().split("x"))
        for batch in args.batches:
            for skip in args.skips:
                t = bench(d, n, batch, skip, args.probe, args)
                print(f"| {d}->{n} | {batch} | {skip:.2f} | {t['dense']:.3f} | {t['body']:.3f} | {t['kernel']:.3f} | "
                      f"{t['dense'] / t['kernel']:.2f}x | {t['body'] / t['kernel']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

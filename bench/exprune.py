"""Wall-clock of graphopt.ExPruneLinearRelu's native kernel against onnxruntime's dense MatMul+Add+Relu and
against the op's own function body (what stock onnxruntime runs), at several skip rates.

Per shape, batch, rule and intra-op thread count, the three sessions (full graph optimisation, the same
thread count for all three) run interleaved: `--repeat` rounds of `--inner` calls each, in a rotating
order; the median per call is reported with ratios against dense (above 1: the kernel is faster).

The skip rate is imposed on the benchmark's own input: one threshold t for every neuron (Tau = t), set by
bisection so that the fraction of (row, neuron) decisions that skip is the target (skip 0: Tau = -inf,
nothing fires). So every row decides for itself, as real inputs do; with the sequential rule (checkpoints
m, 2m, 4m, ... below d) some neurons fire only at a later checkpoint. `skipped` is the realised fraction
and `read` the fraction of the weight multiply-adds the kernel performs (probes, continued probes and the
tails of kept rows), both from the numpy reference.

    graphopt ops build && python bench/exprune.py                     # the README table
    python bench/exprune.py --shapes 768x3072 --batches 1 --skips 0 0.5 --threads 1 --rules threshold
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from graphopt.ops.exprune import boundary_factors, checkpoint_scores, doubling_checkpoints  # noqa: E402
from graphopt.passes.exprune.dispatch import written_model  # noqa: E402
from graphopt.passes.exprune.timing import dense_relu_model, exprune_model  # noqa: E402
from graphopt.ops.native import library_path, register  # noqa: E402


def _session(model: onnx.ModelProto, threads: int, kernel: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # interleaved sessions each own a pool: spinning workers of an idle session would steal the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if kernel and not register(options):
        raise SystemExit("the native kernel is not built: run `graphopt ops build` first")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _decisions(scores: np.ndarray, factors: np.ndarray, t: float) -> np.ndarray:
    """Index of the first checkpoint that fires per (row, neuron); len(factors) where none does."""
    fired = scores < np.float32(t) * factors
    return np.where(fired.any(-1), fired.argmax(-1), len(factors))


def _threshold(scores: np.ndarray, factors: np.ndarray, skip: float) -> float:
    """The common Tau that skips a fraction `skip` of the decisions (-inf for 0)."""
    if skip <= 0:
        return -np.inf
    low, high = float(scores.min()) - 1.0, float(scores.max()) + 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if np.mean(_decisions(scores, factors, middle) < len(factors)) < skip else (low, middle)
    return high


def _work(decisions: np.ndarray, ks: list[int], d: int) -> tuple[float, float]:
    """(fraction of decisions skipped, fraction of the weight multiply-adds performed)."""
    stops = np.array([*ks, d], dtype=np.float64)
    return float(np.mean(decisions < len(ks))), float(np.mean(stops[decisions]) / d)


def _time(session: ort.InferenceSession, feed: dict[str, np.ndarray], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        session.run(None, feed)
    return (time.perf_counter() - start) / inner


def bench(d: int, n: int, batch: int, rule: str, skip: float, threads: int, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    x = rng.standard_normal((batch, d)).astype(np.float32)
    m = max(1, int(round(args.probe * d)))
    ks = [m] if rule == "threshold" else doubling_checkpoints(d, m)
    scores, factors = checkpoint_scores(x, w, b, ks), boundary_factors(d, ks)
    t = _threshold(scores, factors, skip)
    skipped, read = _work(_decisions(scores, factors, t), ks, d)
    arrays = {"W": w, "B": b, "Tau": np.full(n, t, dtype=np.float32), "Perm": np.arange(w.shape[1], dtype=np.int64)}
    exprune = exprune_model(arrays, ks[0], rule, ks)
    sessions = {"dense": _session(dense_relu_model(w, b), threads, False), "kernel": _session(exprune, threads, True)}
    if args.dispatch:
        sessions["dispatch"] = _session(written_model(exprune, args.dispatch), threads, True)
    if not args.no_body:
        sessions["body"] = _session(exprune, threads, False)
    feed = {"x": x}
    reference = sessions["dense"].run(None, feed)[0]
    got = sessions["kernel"].run(None, feed)[0]
    kept = got != 0
    np.testing.assert_allclose(got[kept], reference[kept], rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        _time(session, feed, 3)
    order = list(sessions)
    for repeat in range(args.repeat):
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            times[name].append(_time(sessions[name], feed, args.inner))
    result = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {**result, "skipped": skipped, "read": read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["384x1536", "768x3072", "4096x11008"], help="DxN")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--skips", nargs="+", type=float, default=[0.0, 0.4, 0.5, 0.9])
    parser.add_argument("--rules", nargs="+", choices=["threshold", "sequential"], default=["threshold", "sequential"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="onnxruntime intra-op threads")
    parser.add_argument("--probe", type=float, default=0.25, help="m as a fraction of d")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--no-body", action="store_true", help="leave the function body out (it is slow)")
    parser.add_argument("--dispatch", type=int, default=0, metavar="N",
                        help="also time the layer as the exprune pass writes it with --exprune-dense-rows N (an If: "
                             "the op below N rows, the dense layer from N rows on)")
    args = parser.parse_args()
    if library_path() is None:
        raise SystemExit("the native kernel is not built: run `graphopt ops build` first")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"probe {args.probe}, median of {args.repeat} rounds x {args.inner} calls, interleaved")
    extra = f" dense_rows {args.dispatch} ms | dense/dense_rows {args.dispatch} |" if args.dispatch else ""
    print("| d->n | batch | rule | threads | skipped | read | dense ms | body ms | kernel ms | dense/kernel | body/kernel |"
          + extra)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.dispatch else ""))
    for shape in args.shapes:
        d, n = (int(v) for v in shape.lower().split("x"))
        for batch in args.batches:
            for rule in args.rules:
                for threads in args.threads:
                    for skip in args.skips:
                        t = bench(d, n, batch, rule, skip, threads, args)
                        body = f"{t['body']:.3f} | {t['body'] / t['kernel']:.2f}x" if "body" in t else "- | -"
                        body_ms, body_ratio = body.split(" | ")
                        print(f"| {d}->{n} | {batch} | {rule} | {threads} | {t['skipped']:.2f} | {t['read']:.2f} | "
                              f"{t['dense']:.3f} | {body_ms} | {t['kernel']:.3f} | {t['dense'] / t['kernel']:.2f}x | "
                              f"{body_ratio} |" + _dispatch_cells(t), flush=True)


def _dispatch_cells(t: dict[str, float]) -> str:
    if "dispatch" not in t:
        return ""
    return f" {t['dispatch']:.3f} | {t['dense'] / t['dispatch']:.2f}x |"


if __name__ == "__main__":
    main()

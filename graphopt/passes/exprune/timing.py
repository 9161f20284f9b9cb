"""Whether an ExPrune layer pays in time: the layer alone, timed against its dense form.

By default (`--exprune-layers auto`, or `--exprune-timed` with the other kinds), each linear layer the search
chose is built twice as a one-layer model, the dense MatMul + Add + Relu it replaces and
graphopt.ExPruneLinearRelu with its calibrated probe, checkpoints and thresholds, and both are timed side by
side by onnxruntime (graphopt.calibration.latency.interleaved: interleaved rounds, the same threads, full graph
optimisation, the native kernel when it is built) at batch 1 on one of the layer's own calibration inputs, the
one with the median number of skipped neurons, so a typical skip rate is what is timed. A layer whose op is
not faster than its dense form stays dense, and the report says so with both times; a layer left dense
computes exactly, so the model's error can only lose that layer's false negatives (the tolerance search is not
run again).
A convolution is timed the same way, graphopt.ExPruneConvRelu against Conv + Relu, at batch 1 on the
sampled input map with the median number of skipped output positions (`typical_map`): whether its op wins
depends on how its zeros cluster (graphopt/ops/src/exprune_conv_kernel.cc). Without the native kernel the
function body would run, slower than Conv + Relu, so convolutions are not timed and stay dense. The layers
kept are then timed in the whole model (`time_models`; graphopt.passes.exprune.prune).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.exprune.calib import Calibrated, ChainLayer, layer_arrays
from graphopt.passes.exprune.conv import ConvLayer

ROUNDS, RUNS, WARMUP = 9, 20, 5
ROUND_SECONDS = 0.005  # a round runs each model at least this long (more runs than RUNS for small layers)
# a timed layer (alone, then in the model) is replaced only where its op measured at least this much faster:
# within the timing's noise the dense layer, which computes exactly, is kept
MIN_SPEEDUP = 1.02
ROW_GRID = (2, 4, 8, 16, 32)  # row counts at which the bare op is timed against the dense layer
TIMING_ROWS = 64  # calibration rows kept per layer, to time it on the one with the median skip count


def _model(name: str, nodes: list[onnx.NodeProto], arrays: dict[str, np.ndarray], sample: tuple[int, ...],
           output: tuple[int, ...] | None, opset: int) -> onnx.ModelProto:
    """A one-layer model x [N, *sample] -> y ([N, *output], or undeclared) on the constants `arrays`."""
    declared = None if output is None else ["N", *output]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *sample])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared)],
                              [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def dense_relu_model(weight: np.ndarray, bias: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    """ReLU(x Wᵀ + b) as a one-layer model, W [n, d] neuron-major, input x [N, d] (MatMul, Add, Relu)."""
    n, d = weight.shape
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    return _model("dense", nodes, {"wt": weight.T.astype(np.float32), "b": bias.astype(np.float32)}, (d,), (n,),
                  opset)


def exprune_model(arrays: dict[str, np.ndarray], m: int, rule: str, checkpoints: list[int],
                  opset: int = 17) -> onnx.ModelProto:
    """graphopt.ExPruneLinearRelu as a one-layer model on its constant inputs `arrays` (W, B, Tau, Perm; see
    graphopt.passes.exprune.calib.layer_arrays), input x [N, d], with its function body."""
    from graphopt.ops.exprune import make_exprune_node
    from graphopt.ops.library import ensure_functions

    n, d = arrays["W"].shape
    node = make_exprune_node(["x", *arrays], "y", m, rule=rule, checkpoints=list(checkpoints))
    model = _model("exprune", [node], arrays, (d,), (n,), opset)
    ensure_functions(model)
    return model


def conv_models(layer: ConvLayer, found: Calibrated, rule: str, opset: int,
                shape: tuple[int, ...]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(Conv + Relu, graphopt.ExPruneConvRelu) as one-layer models on input x [N, *shape] (C, H, W)."""
    from graphopt.ops.exprune_conv import make_exprune_conv_node
    from graphopt.ops.library import ensure_functions

    geometry = {"strides": list(layer.strides), "pads": list(layer.pads), "dilations": list(layer.dilations)}
    dense = _model("dense", [helper.make_node("Conv", ["x", "w", "b"], ["z"], **geometry),
                             helper.make_node("Relu", ["z"], ["y"])], {"w": layer.weight, "b": layer.bias}, shape, None,
                   opset)
    arrays = layer_arrays(layer, found)
    node = make_exprune_conv_node(["x", *arrays], "y", found.m, rule=rule, checkpoints=list(found.checkpoints),
                                  **geometry)
    op = _model("exprune", [node], arrays, shape, None, opset)
    ensure_functions(op)
    return dense, op


def layer_models(layer: ChainLayer, found: Calibrated, rule: str, opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the dense layer, the layer as graphopt.ExPruneLinearRelu) as one-layer models, input x [N, d]."""
    return (dense_relu_model(layer.weight, layer.bias, opset),
            exprune_model(layer_arrays(layer, found), found.m, rule, list(found.checkpoints), opset))


def typical_map(layer: ConvLayer, found: Calibrated, maps: np.ndarray) -> np.ndarray:
    """The map of `maps` [r, C, H, W] whose number of skipped output positions is the median one ([1, C, H, W])."""
    from graphopt.ops.exprune_conv import exprune_conv_reference

    arrays = layer_arrays(layer, found)
    counts = [int(exprune_conv_reference(maps[[i]], arrays["W"], arrays["B"], arrays["Tau"], arrays["Perm"], found.m,
                                         list(found.checkpoints), layer.strides, layer.pads, layer.dilations)[1].sum())
              for i in range(maps.shape[0])]
    return maps[[int(np.argsort(counts, kind="stable")[len(counts) // 2])]].astype(np.float32)


def time_conv(layer: ConvLayer, found: Calibrated, rule: str, maps: np.ndarray, threads: int,
              opset: int) -> dict[str, Any]:
    """The op's and Conv + Relu's median times (ms) at batch 1 on the typical map of `maps`, and the speedup
    (dense time / op time) with its 10th and 90th percentiles."""
    x = typical_map(layer, found, maps)
    dense, op = conv_models(layer, found, rule, opset, tuple(x.shape[1:]))
    timing = _pair(dense, op, x, threads)
    return {"dense_ms": timing["reference_ms"], "op_ms": timing["candidate_ms"], "speedup": timing["speedup"],
            "speedup_p10": timing["speedup_p10"], "speedup_p90": timing["speedup_p90"]}


def typical_row(layer: ChainLayer, found: Calibrated, rows: np.ndarray) -> np.ndarray:
    """The row of `rows` whose number of skipped neurons is the median one (as a [1, d] batch)."""
    from graphopt.ops.exprune import exprune_reference

    arrays = layer_arrays(layer, found)
    _, skipped = exprune_reference(rows, arrays["W"], arrays["B"], arrays["Tau"], arrays["Perm"], found.m,
                                   list(found.checkpoints))
    counts = skipped.reshape(rows.shape[0], -1).sum(axis=1)
    return rows[[int(np.argsort(counts, kind="stable")[rows.shape[0] // 2])]]


def time_layer(layer: ChainLayer, found: Calibrated, rule: str, rows: np.ndarray, threads: int,
               opset: int, dispatch: bool = True) -> dict[str, Any]:
    """The op's and the dense layer's median times (ms) at batch 1 on the typical row of `rows`, and the
    speedup (dense time / op time) with its 10th and 90th percentiles; the op is timed as the pass writes
    it, inside the If of graphopt.passes.exprune.dispatch where `dispatch`.

    With `dispatch`, where the op wins at batch 1: `dense_rows`, the row count from which the layer should
    run dense, the first of ROW_GRID at which the bare op was not faster than the dense layer (on calibration
    rows, the typical one first), else twice the grid's last; `rows_<r>_speedup` for each count timed."""
    from graphopt.passes.exprune.dispatch import written_model

    dense, op = layer_models(layer, found, rule, opset)
    row = typical_row(layer, found, rows.astype(np.float32))
    timing = _pair(dense, written_model(op, ROW_GRID[0]) if dispatch else op, row, threads)
    found_times = {"dense_ms": timing["reference_ms"], "op_ms": timing["candidate_ms"], "speedup": timing["speedup"],
                   "speedup_p10": timing["speedup_p10"], "speedup_p90": timing["speedup_p90"]}
    if not dispatch or timing["speedup"] < MIN_SPEEDUP:
        return found_times
    pool = np.concatenate([row, rows.astype(np.float32)])
    found_times["dense_rows"] = 2 * ROW_GRID[-1]
    for count in ROW_GRID:
        batch = np.resize(pool, (count, pool.shape[1]))
        speedup = _pair(dense, op, batch, threads)["speedup"]
        found_times[f"rows_{count}_speedup"] = speedup
        if speedup <= 1.0:
            found_times["dense_rows"] = count
            break
    return found_times


def _pair(dense: onnx.ModelProto, op: onnx.ModelProto, x: np.ndarray, threads: int) -> dict[str, float]:
    """Interleaved timings of the two one-layer models on the input `x` (graphopt.calibration.latency)."""
    return time_models(dense, op, {"x": x}, threads)


def time_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict[str, np.ndarray],
                threads: int) -> dict[str, float]:
    """Interleaved timings of two models on one feed (graphopt.calibration.latency.interleaved), rounds of at
    least ROUND_SECONDS: `reference_ms`, `candidate_ms`, `speedup` (reference / candidate) and its p10/p90."""
    from graphopt.calibration.latency import interleaved
    from graphopt.calibration.session import make_session

    sessions = [make_session(model, optimize=True, threads=threads, spinning=False) for model in (reference, candidate)]
    start = time.perf_counter()
    for _ in range(WARMUP):
        sessions[0].run(None, feed)
    per_run = max((time.perf_counter() - start) / WARMUP, 1e-7)
    runs = max(RUNS, min(2000, int(np.ceil(ROUND_SECONDS / per_run))))
    return interleaved(sessions, [feed, feed], ROUNDS, runs, WARMUP)

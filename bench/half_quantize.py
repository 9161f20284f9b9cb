"""Quantizing a float16 model: what onnxruntime's CPU provider makes of the QDQ model graphopt writes.

The committed digits CNN (samples/digits_cnn.onnx) is converted to float16 (every float32 initializer,
Constant, input and output), then `graphopt.optimize(method="quantize")` quantizes it on the committed
calibration data (as float16). The float16 original and its quantized copy are timed side by side in one
run (graphopt.evaluate.compare_latency: interleaved rounds, full graph optimisation, the same threads) at
batch 1 and 8; speedup = median over rounds of original time / quantized time, with its 10th and 90th
percentiles, and the fidelity of the quantized model on the calibration samples. The float32 pair is
timed the same way for comparison.

    python bench/half_quantize.py            # results: stdout and bench/results/half_quantize.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import machine  # noqa: E402
from graphopt.api import optimize  # noqa: E402
from graphopt.evaluate import compare_latency  # noqa: E402

SAMPLES = REPO / "samples"


def to_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` computing in float16: float32 initializers, Constant values, inputs, outputs and value infos."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for tensor in half.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in half.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t") and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16)))
    for value in [*half.graph.input, *half.graph.output, *half.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half, full_check=True)
    return half


def measure(model: onnx.ModelProto, calib: dict[str, np.ndarray], rounds: int) -> dict[str, Any]:
    result = optimize(model, method="quantize", calib=calib, progress=False)
    found: dict[str, Any] = {"fidelity": {k: result.report["fidelity"][k] for k in ("rel_l2", "cosine",
                                                                                     "top1_agreement")},
                             "quantize_stats": result.report["passes"][-1]["stats"]}
    for batch in (1, 8):
        timing = compare_latency(model, result.model, data=calib, batch=batch, rounds=rounds)
        found[f"batch_{batch}"] = {key: timing[key] for key in ("reference_ms", "candidate_ms", "speedup",
                                                               "speedup_p10", "speedup_p90")}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds per batch size")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "half_quantize.json")
    args = parser.parse_args()
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    calib = dict(np.load(SAMPLES / "digits_calib.npz"))
    runs = {"float32": measure(model, calib, args.rounds),
            "float16": measure(to_half(model), {k: v.astype(np.float16) for k, v in calib.items()}, args.rounds)}
    for name, found in runs.items():
        timings = ", ".join(f"batch {b}: {t['speedup']:.2f}x ({t['speedup_p10']:.2f}-{t['speedup_p90']:.2f})"
                            for b, t in ((b, found[f"batch_{b}"]) for b in (1, 8)))
        print(f"{name}: quantized against its original {timings}; rel_l2 {found['fidelity']['rel_l2']:.4f}, "
              f"opset {found['quantize_stats']['opset']}")
    args.output.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "runs": runs}, indent=1,
                                      default=float) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""The quantize method: static INT8 QDQ quantization of the current graph, the last step of a pipeline.

The pass exports the graph, hands it with the run's calibration data to graphopt.calibration.quantize
(onnxruntime's quantizer: int8 weights with per-channel scales, activation ranges calibrated by min/max,
entropy or percentile) and takes the quantized graph back in place. Model-level fields (metadata_props,
doc strings, producer) come from the template on export; graph input and output names are kept; the
opset rises to 13 only where it was lower (per-axis QDQ needs it; 19 for a float16 model, whose scales are
float16), and the pass says so in its stats. A float16 model is quantized too (stat `half_precision`), but
onnxruntime's CPU provider fuses QDQ into integer kernels around float32 ops only: the float16 digits CNN
ran 0.22x as fast quantized at batch 8 (bench/half_quantize.py), so `optimize` prints a note.
The pass then times the quantized model against the float graph it came from, side by side at batch 1
(stats `speedup_b1`, p10, p90; `optimize` warns when it is slower). A model that already holds quantized ops
is refused with the reason. Pruning after quantization goes through the integers of QDQ layers
(graphopt.passes.quantize.through); integer layers stay as they are (graphopt.analysis.oprules.quantized).
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.data import load_data
from graphopt.calibration.latency import Runtime, paired_latency
from graphopt.calibration.quantize import (QuantizeError, QuantizeSettings, default_opset, half_precision,
                                           quantize_checked, quantized_ops)
from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.ir import weights
from graphopt.ir.shapes import input_specs
from graphopt.passes.base import READS_WEIGHTS, Pass, PassContext, PassResult, all_but, register
from graphopt.passes.methods import Method, QuantizeOptions, register_method

log = logging.getLogger(__name__)


def settings_from(ctx: PassContext) -> QuantizeSettings:
    """The quantizer's settings from the run's options (defaults where an option is not given)."""
    excluded = ctx.option("quant_exclude")
    per_channel = ctx.options.get("quant_per_channel")
    return QuantizeSettings(calibration=ctx.option("quant_calibration", "minmax"),
                            per_channel=True if per_channel is None else bool(per_channel),
                            activations=ctx.option("quant_activations", "int8"),
                            reduce_range=bool(ctx.option("quant_reduce_range", False)),
                            exclude=tuple(str(excluded).split(",")) if excluded else (),
                            batch_size=int(ctx.option("batch_size", 32)))


@register
class QuantizeQDQ(Pass):
    name = "quantize"
    kind = "method"
    description = "static INT8 QDQ quantization by onnxruntime, calibrated on --calib (the last step of a pipeline)"
    requires = READS_WEIGHTS
    preserves = all_but("constants_folded")  # DequantizeLinear of constant weights is left for the runtime to fold

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.data is None:
            raise QuantizeError("--method quantize needs calibration data: give --calib DATA.npz "
                                "(a statistics file holds no activation ranges)")
        dataset = load_data(ctx.data, ctx.template)
        model = weights.materialized(ir.export_model(graph, ctx.template))  # the quantizer reads inline weights
        settings = settings_from(ctx)
        quantized, kept = quantize_checked(model, dataset, settings)
        ir.replace_graph(graph, quantized)
        ops = quantized_ops(quantized)
        stats: dict[str, int | float] = {"quantize_linear": ops.get("QuantizeLinear", 0),
                                         "dequantize_linear": ops.get("DequantizeLinear", 0),
                                         "opset": default_opset(quantized)}
        if default_opset(quantized) > default_opset(model):
            stats["opset_raised_from"] = default_opset(model)
        if half_precision(model):  # no integer kernels for QDQ around float16 ops on onnxruntime's CPU provider
            stats["half_precision"] = 1
        skipped = [f"op type {op} left in float (--quant-exclude)" for op in settings.exclude]
        skipped += [f"{name} left in float: quantizing its output let zeros reach a Log, Sqrt, Reciprocal or "
                    "divisor (NaN or infinity in the outputs otherwise)" for name in kept]
        if kept:
            stats["kept_float"] = len(kept)
        stats.update(_measured_speedup(model, quantized, ctx))
        return PassResult(modified=True, stats=stats, skipped=skipped)


def _measured_speedup(model: onnx.ModelProto, quantized: onnx.ModelProto, ctx: PassContext) -> dict[str, float]:
    """The quantized model's speed against the float graph it came from, timed side by side at batch 1
    (graphopt.calibration.latency.paired_latency: interleaved rounds, full optimisation, the run's threads,
    a few seconds at most): `speedup_b1` with its p10 and p90 over rounds. Integer kernels do not win
    everywhere: Spotify's basic-pitch (one-channel Conv1Ds with 256-tap kernels, per-tensor Mul/Add) ran
    0.77x as fast quantized. Empty where the quantized model cannot be timed here (a device other than the
    CPU, inputs without a resolved shape): the fidelity check reports what is wrong with it."""
    if (ctx.option("device") or "cpu") != "cpu":
        return {}
    shapes = {spec.name: ctx.input_shapes.get(spec.name, spec.shape) for spec in input_specs(model)}
    if any(not isinstance(d, int) or d <= 0 for shape in shapes.values() for d in shape):
        return {}
    where = Runtime.current("cpu", int(ctx.option("threads") or 0))
    try:
        timing = paired_latency(model, quantized, shapes, where)
    except GraphoptError as exc:
        log.debug("quantized model not timed: %s", exc)
        return {}
    log.info("quantized: %.2fx the float model's speed at batch 1 (p10 %.2f, p90 %.2f)",
             timing["speedup"], timing["speedup_p10"], timing["speedup_p90"])
    return {"speedup_b1": round(timing["speedup"], 3), "speedup_b1_p10": round(timing["speedup_p10"], 3),
            "speedup_b1_p90": round(timing["speedup_p90"], 3)}


QUANTIZE = register_method(Method(QuantizeQDQ.name, QuantizeQDQ.description, needs_data=True,
                                  passes=(QuantizeQDQ.name,), options=QuantizeOptions))

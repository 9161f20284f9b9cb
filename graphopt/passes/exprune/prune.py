"""ExPrune: per-input dynamic neuron pruning of linear+ReLU and Conv+ReLU layers (graphopt.ops.exprune*).

Every matched layer of the kinds `exprune_layers` names ("auto", the default: the linear and Conv+ReLU
layers whose op measures faster than the dense layer, each alone and then in the model, convolutions only
where the native kernel is built; "all", "linear", "conv": those layers, untimed unless `exprune_timed`)
becomes one
`graphopt.ExPruneLinearRelu` (graphopt.passes.exprune.linear) or `graphopt.ExPruneConvRelu`
(graphopt.passes.exprune.conv) op whose thresholds are calibrated on data
(graphopt.passes.exprune.calib): rows of sampled layer inputs for linear layers (`exprune_rows`), the
output positions of the first `exprune_maps` input maps for convolutions (a seeded subset of at most
POSITIONS_PER_ROW · exprune_rows of them, to bound the scores held; graphopt.passes.exprune.layers). Two modes:

- fixed (`exprune_fnr` given): every neuron keeps at most that false-negative rate on the sampled
  calibration rows; the probe length is `exprune_probe`, or chosen per layer as below;
- tolerance (default): a seeded `exprune_held_out` fraction of the calibration samples is held out;
  thresholds are fitted on the rest for a grid of false-negative rates, and per layer and rate the
  probe length from PROBES skipping the most MACs on the fitted rows is taken; the last step of a scan
  whose model keeps `tolerance` against the unpruned model on the held-out samples, with confidence
  `exprune_confidence`, is kept (graphopt.passes.exprune.search). The steps are per-layer rates along the
  path of graphopt.passes.exprune.allocate (`exprune_allocation` layers, the default) or one rate for
  all layers (uniform). When even the first step (rate 0) fails, nothing is replaced and the reason is
  recorded.

Then the timing (graphopt.passes.exprune.timing), after the search: a layer left dense computes exactly,
so the certified tolerance still holds (the search is not run again).

Approximate: an output differs from ReLU(Wx + b) only where a positive neuron was predicted negative,
and then by exactly its value. Layers are calibrated on the input model's activations (not
sequentially). Memory is bounded by `exprune_rows` sampled rows per layer input. Reported per layer:
m, checkpoints, skip rate, false-negative rate and fraction of its MACs skipped on the fitted rows
(and, in tolerance mode, on the held-out rows); in total the MAC-weighted fraction skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

from graphopt.errors import DataError, OptionError
from graphopt.ir import graph as ir
from graphopt.ops.exprune import MIN_OPSET, RULES, build_exprune_function
from graphopt.passes.base import CHANGES_CHANNELS, READS_FOLDED_WEIGHTS, Pass, PassContext, PassResult, register
from graphopt.passes.exprune.allocate import MAX_LAYERS, Rates, allocation_path, curve_grid, layer_curves
from graphopt.passes.exprune.conv import ConvLayer
from graphopt.passes.exprune.dispatch import DENSE_ROWS, dispatch_by_rows
from graphopt.passes.exprune.layers import (AUTO, Choice, Layer, best, candidate_model, discover, replace, sample,
                                            scorings)
from graphopt.passes.exprune.linear import LinearLayer
from graphopt.passes.exprune.search import DEFAULT_CONFIDENCE, GRID, tolerance_search
from graphopt.passes.exprune.timing import MIN_SPEEDUP
from graphopt.passes.methods import Method, Seeded, option, register_method

log = logging.getLogger(__name__)

PROBES = (0.0625, 0.125, 0.25, 0.5)
LAYER_KINDS = ("auto", "all", "linear", "conv")
ALLOCATIONS = ("layers", "uniform")
ALLOCATION = "layers"


def _options(ctx: PassContext) -> dict[str, Any]:
    probe, fnr = ctx.option("exprune_probe"), ctx.option("exprune_fnr")
    rule = str(ctx.option("exprune_rule", AUTO))
    held_out = float(ctx.option("exprune_held_out", 0.25))
    if probe is not None and not 0.0 < float(probe) < 1.0:
        raise OptionError(f"--exprune-probe must be in (0, 1), got {probe}")
    if fnr is not None and not 0.0 <= float(fnr) < 1.0:
        raise OptionError(f"--exprune-fnr must be in [0, 1), got {fnr}")
    if rule not in (*RULES, AUTO):
        raise OptionError(f"--exprune-rule must be one of {', '.join((*RULES, AUTO))}, got '{rule}'")
    if not 0.0 < held_out < 1.0:
        raise OptionError(f"--exprune-held-out must be in (0, 1), got {held_out}")
    confidence = float(ctx.option("exprune_confidence", DEFAULT_CONFIDENCE))
    if not 0.0 <= confidence < 1.0:
        raise OptionError(f"--exprune-confidence must be in [0, 1), got {confidence}")
    for key in ("exprune_rows", "exprune_maps"):
        if int(ctx.option(key, 1)) < 1:
            raise OptionError(f"--{key.replace('_', '-')} must be at least 1, got {ctx.option(key)}")
    allocation = str(ctx.option("exprune_allocation", ALLOCATION))
    if allocation not in ALLOCATIONS:
        raise OptionError(f"--exprune-allocation must be one of {', '.join(ALLOCATIONS)}, got '{allocation}'")
    kinds = str(ctx.option("exprune_layers", "auto"))
    if kinds not in LAYER_KINDS:
        raise OptionError(f"--exprune-layers must be one of {', '.join(LAYER_KINDS)}, got '{kinds}'")
    dense_rows = int(ctx.option("exprune_dense_rows", DENSE_ROWS))
    if dense_rows < 0:
        raise OptionError(f"--exprune-dense-rows must be at least 0, got {dense_rows}")
    return {"probes": PROBES if probe is None else (float(probe),), "fnr": None if fnr is None else float(fnr),
            "rule": rule, "held_out": held_out, "kinds": kinds, "confidence": confidence, "allocation": allocation,
            "dense_rows": dense_rows, **_fidelity(ctx)}


def _fidelity(ctx: PassContext) -> dict[str, Any]:
    """The tolerance, the user's metric and the CTC blank label the held-out check reads; a tolerance on a
    metric's key without a metric is refused before any work."""
    from graphopt.calibration.heldout import MEASURES, Tolerance
    from graphopt.calibration.metric import as_metric

    tolerance = Tolerance.parse(ctx.option("tolerance")) if ctx.option("tolerance") else None
    metric = as_metric(ctx.option("metric"))
    if tolerance is not None and not tolerance.builtin and metric is None:
        raise OptionError(f"--tolerance {tolerance} names no built-in measure ({', '.join(MEASURES)}) and no "
                          "--metric is given")
    return {"tolerance": tolerance, "metric": metric, "ctc_blank": int(ctx.option("ctc_blank", 0))}


def _search(ctx: PassContext, model: onnx.ModelProto, layers: list[Layer], options: dict[str, Any],
            fit: Any, held: Any, result: PassResult) -> list[Choice] | None:
    """Per-layer choices at the largest grid rate within tolerance on `held` (graphopt.passes.exprune.search),
    or None."""
    from graphopt.calibration.heldout import HeldOut

    batch_size = int(ctx.option("batch_size", 32))
    check = HeldOut(model, held, batch_size=batch_size, confidence=options["confidence"],
                    metric=options["metric"], ctc_blank=options["ctc_blank"])
    scored = scorings(ctx, model, layers, options, fit)

    def candidate(rates: Rates) -> tuple[list[Choice | None], onnx.ModelProto]:
        choices = [None if key is None else best(s, *key) for s, key in zip(scored, rates)]
        replaced = {layer.output.name: c[1] for layer, c in zip(layers, choices) if c is not None}
        return choices, candidate_model(model, replaced)

    tolerance = options["tolerance"] or check.default_tolerance()
    steps: list[Rates] = [tuple([(rate, None)] * len(layers)) for rate in GRID]
    first = None
    if options["allocation"] == "layers" and 1 < len(layers) <= MAX_LAYERS:
        check.require(tolerance)
        choices, zero = candidate(steps[0])
        first = (choices, check.measure(zero))  # every layer at rate 0: the first step of either path
    # the curves only where the first step can pass: else nothing would
    layered = first is not None and tolerance.met(first[1])
    if layered:
        steps = _allocation_steps(ctx, model, fit, scored, candidate, options["rule"])
    result.stats["allocation"] = "layers" if layered else "uniform"
    measured_first = first if first is not None and steps[0] == tuple((GRID[0], None) for _ in layers) else None
    chosen = tolerance_search(check, tolerance, candidate, result, ctx.progress, steps=steps, level=_level,
                              first=measured_first)
    if chosen is not None:
        _report_held_out(ctx, model, layers, chosen, held, result)
    return chosen


def _allocation_steps(ctx: PassContext, model: onnx.ModelProto, fit: Any, scored: list[list[Any]],
                      candidate: Callable[[Rates], tuple[list[Choice | None], onnx.ModelProto]],
                      rule: str) -> list[Rates]:
    """The per-layer allocation path (graphopt.passes.exprune.allocate) from the layers' curves on the fit samples,
    each layer's curve over both rules under "auto"."""
    rules = RULES if rule == AUTO else (None,)
    macs = [s[0].macs_per_sample for s in scored]
    curves = layer_curves(model, fit, curve_grid(GRID, len(scored) * len(rules)), macs, candidate,
                          lambda choice: choice[1].macs_skipped, int(ctx.option("batch_size", 32)), ctx.progress, rules)
    return allocation_path(curves)


def _level(rates: Rates) -> float:
    """The false-negative rate a step reports: its largest."""
    return max(key[0] for key in rates if key is not None)


def _report_held_out(ctx: PassContext, model: onnx.ModelProto, layers: list[Layer], chosen: list[Choice], held: Any,
                     result: PassResult) -> None:
    rows = sample(ctx, model, layers, held)
    total = skipped = 0.0
    for layer, (scoring, found) in zip(layers, chosen):
        skip, false_negative, saved = scoring.measure(rows[layer.source.name], found.tau)
        result.stats.update({f"{layer.name}.held_out_skip_rate": skip, f"{layer.name}.held_out_fnr": false_negative,
                             f"{layer.name}.held_out_macs_skipped": saved})
        total, skipped = total + scoring.macs_per_sample, skipped + scoring.macs_per_sample * saved
    result.stats["held_out_macs_skipped_fraction"] = skipped / total if total else 0.0
    result.stats["held_out_macs_skipped_per_sample"] = skipped


@register
class ExPrune(Pass):
    name = "exprune"
    kind = "method"
    description = "ExPrune: ReLU units predicted negative from a calibrated partial sum are skipped per input"
    # a layer is matched as Conv/Gemm/MatMul read by a Relu alone (a BatchNorm between them hides it), with
    # constant weights, on inferred shapes
    requires = READS_FOLDED_WEIGHTS
    preserves = CHANGES_CHANNELS

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        options = _options(ctx)
        result = PassResult(modified=False)
        original, opset = None, int(graph.opset)
        if opset < MIN_OPSET:  # the ops' function bodies need MIN_OPSET: raised, and put back if unused
            original = ir.export_model(graph, ctx.template)
            reason = _raise_opset(graph, original)
            if reason:
                result.skipped.append(reason)
                return result
        self._replace(graph, ctx, options, result)
        if original is not None and result.modified:
            result.stats["opset_raised_from"] = opset
        elif original is not None:
            ir.replace_graph(graph, original)
        return result

    def _replace(self, graph: gs.Graph, ctx: PassContext, options: dict[str, Any], result: PassResult) -> None:
        from graphopt.calibration.data import load_data

        layers, result.skipped = discover(graph, options["kinds"])
        layers = _single_row(layers, options["dense_rows"], result)
        if not layers:
            return
        if ctx.data is None:
            raise DataError("--method exprune calibrates thresholds on data: give --calib DATA.npz")
        model = ir.export_model(graph, ctx.template)
        dataset = load_data(ctx.data, model)
        if options["fnr"] is not None:
            chosen = [best(s, options["fnr"]) for s in scorings(ctx, model, layers, options, dataset)]
        else:
            fit, held = dataset.split(options["held_out"], seed=int(ctx.option("seed", 0)))
            if held.num_samples == 0 or (held.arrays is None and not held.feeds):
                raise DataError("--method exprune needs at least 2 calibration samples to hold some out "
                                "(or give --exprune-fnr)")
            chosen = _search(ctx, model, layers, options, fit, held, result)
            if chosen is None:
                return
        searched = len(layers)
        layers, chosen, thresholds = _timed(ctx, graph, layers, chosen, options, result)
        layers, chosen = _in_model(ctx, model, dataset, layers, chosen, options, result)
        if layers:
            self._apply(graph, layers, chosen, options, result, thresholds)
        else:  # the reason to read first: each layer's own line follows
            result.skipped.insert(0, f"every layer chosen ({searched}) left dense: none measured at least "
                                     f"{MIN_SPEEDUP:.2f}x as fast as its dense form, alone and in the model")

    @staticmethod
    def _apply(graph: gs.Graph, layers: list[Layer], chosen: list[Choice], options: dict[str, Any],
               result: PassResult, thresholds: dict[str, int]) -> None:
        """Replace the layers; a linear layer runs dense from its measured row count (`thresholds`, from
        --exprune-timed) or from --exprune-dense-rows."""
        total = skipped = 0.0
        dense_from: list[int] = []
        for layer, (scoring, found) in zip(layers, chosen):
            node = replace(graph, layer, found)
            if isinstance(layer, LinearLayer) and options["dense_rows"]:
                dense_from.append(thresholds.get(layer.name, options["dense_rows"]))
                dispatch_by_rows(graph, node, dense_from[-1])
            macs = scoring.macs_per_sample
            total, skipped = total + macs, skipped + macs * found.macs_skipped
            result.stats.update({f"{layer.name}.m": found.m, f"{layer.name}.rule": found.rule,
                                 f"{layer.name}.checkpoints": len(found.checkpoints),
                                 f"{layer.name}.skip_rate": found.skip_rate, f"{layer.name}.fnr": found.fnr,
                                 f"{layer.name}.macs_skipped": found.macs_skipped})
            log.info("exprune %s: m=%d/%d skip %.1f%% fnr %.3f, %.1f%% of its MACs skipped", layer.name, found.m,
                     layer.terms, 100 * found.skip_rate, found.fnr, 100 * found.macs_skipped)
        if any(isinstance(layer, LinearLayer) for layer in layers):
            ir.add_function(graph, build_exprune_function(graph.opset))
        ir.cleanup(graph)
        result.modified = True
        result.stats.update({"layers": len(layers), "conv_layers": sum(isinstance(l, ConvLayer) for l in layers),
                             "dense_rows": min(dense_from, default=0),  # the first row count any runs dense
                             "macs_skipped_fraction": skipped / total if total else 0.0,
                             "macs_skipped_per_sample": skipped})


def _raise_opset(graph: gs.Graph, model: onnx.ModelProto) -> str:
    """Give `graph` the model converted to MIN_OPSET by ONNX's version converter ('' on success), or why not.
    Model-local functions need IR version 8."""
    try:
        converted = ir.at_opset(model, MIN_OPSET)
    except ValueError as exc:
        return (f"model opset {graph.opset} < {MIN_OPSET}, which the ExPrune ops' function bodies need, "
                f"and ONNX's version converter refused: {exc}")
    converted.ir_version = max(converted.ir_version, 8)
    ir.replace_graph(graph, converted)
    return ""


def _single_row(layers: list[Layer], dense_rows: int, result: PassResult) -> list[Layer]:
    """The layers kept for replacement: with `dense_rows` > 0, a linear layer that every call sends `dense_rows`
    rows or more through (tokens, positions, a static batch) would always run dense, so it stays as it is."""
    if not dense_rows:
        return layers
    kept = []
    for layer in layers:
        rows = layer.rows_per_call() if isinstance(layer, LinearLayer) else 1
        if rows is not None and rows < dense_rows:
            kept.append(layer)
            continue
        count = "a symbolic number of" if rows is None else f"at least {rows}"
        result.skipped.append(f"{layer.name}: left dense, each call sends {count} rows through it and calls of "
                              f"{dense_rows} rows or more run dense (--exprune-dense-rows; 0 replaces it anyway)")
    return kept


def _timed(ctx: PassContext, graph: gs.Graph, layers: list[Layer], chosen: list[Choice], options: dict[str, Any],
           result: PassResult) -> tuple[list[Layer], list[Choice], dict[str, int]]:
    """The layers to replace after timing each alone (graphopt.passes.exprune.timing) against its dense form at
    batch 1, under --exprune-layers auto or --exprune-timed: convolutions where the native kernel is built (else
    they stay dense), linear layers as written, in their row dispatch, with the row count from which each
    should run dense. A timed layer is kept where its op is faster; its times go into the stats, each layer
    left dense into `skipped` with the reason."""
    from graphopt.calibration.session import native_conv_kernel

    if not _timing(ctx, options):
        return layers, chosen, {}
    native_conv = native_conv_kernel()
    kept: list[tuple[Layer, Choice]] = []
    thresholds: dict[str, int] = {}
    for layer, (scoring, found) in zip(layers, chosen):
        if isinstance(layer, ConvLayer) and not native_conv:
            result.skipped.append(f"{layer.name}: left dense under --exprune-timed (the native kernels are not built: "
                                  "the op's function body runs slower than Conv+Relu)")
        elif _faster(ctx, graph, layer, scoring, found, options, result):
            kept.append((layer, (scoring, found)))
            if f"{layer.name}.dense_rows" in result.stats:
                thresholds[layer.name] = int(result.stats[f"{layer.name}.dense_rows"])
    result.stats["layers_left_dense"] = len(layers) - len(kept)
    return [layer for layer, _ in kept], [choice for _, choice in kept], thresholds


def _timing(ctx: PassContext, options: dict[str, Any]) -> bool:
    """Whether the chosen layers are timed: under --exprune-layers auto (the default) or --exprune-timed."""
    return options["kinds"] == "auto" or bool(ctx.option("exprune_timed", False))


def _faster(ctx: PassContext, graph: gs.Graph, layer: Layer, scoring: Any, found: Any, options: dict[str, Any],
            result: PassResult) -> bool:
    """Whether the layer's op measured faster than its dense form, each alone; its times go into the stats,
    and a line into `skipped` when it did not."""
    from graphopt.passes.exprune.timing import time_conv, time_layer

    threads = int(ctx.option("threads") or 0)
    timing = (time_conv(layer, found, found.rule, scoring.sample, threads, graph.opset)
              if isinstance(layer, ConvLayer) else
              time_layer(layer, found, found.rule, scoring.sample, threads, graph.opset,
                         dispatch=bool(options["dense_rows"])))
    # what time would be if it fell with the MACs the op skips (the probe counted as spent)
    timing["op_ms_predicted"] = timing["dense_ms"] * (1.0 - found.macs_skipped)
    result.stats.update({f"{layer.name}.{key}": value for key, value in timing.items()})
    if timing["speedup"] >= MIN_SPEEDUP:
        return True
    result.skipped.append(f"{layer.name}: left dense, the op took {timing['op_ms']:.4f} ms against "
                          f"{timing['dense_ms']:.4f} ms dense at batch 1 (speedup {timing['speedup']:.2f}, "
                          f"p10-p90 {timing['speedup_p10']:.2f}-{timing['speedup_p90']:.2f}; kept from "
                          f"{MIN_SPEEDUP:.2f})")
    return False


def _in_model(ctx: PassContext, model: onnx.ModelProto, data: Any, layers: list[Layer], chosen: list[Choice],
              options: dict[str, Any], result: PassResult) -> tuple[list[Layer], list[Choice]]:
    """The layers to replace, less the timed ones that do not pay in the whole model.

    An op that was faster alone can still slow the model: onnxruntime runs chains of convolutions in its
    blocked channel layout, and an op it cannot run that way needs the layout converted before and after it;
    a small layer's op saves less than the call costs between fused dense nodes. A one-layer timing sees
    neither. So, at batch 1 on the first calibration sample, first the model with the timed convolutions
    replaced is timed against the model without them (both with the other kept layers replaced; stats
    `conv_*`), then the model with every timed layer kept against the model with none of them (`dense_model_ms`,
    `model_ms`, `model_speedup` with p10/p90); while a model is not MIN_SPEEDUP faster, the layer with the
    smallest speedup alone goes back to dense, named in `skipped`."""
    feed = next(iter(data.batches(1, trimmed=False)))
    conv = [i for i, layer in enumerate(layers)
            if isinstance(layer, ConvLayer) and f"{layer.name}.speedup" in result.stats]
    layers, chosen, timing = _drop_slower(ctx, model, feed, layers, chosen, conv, "conv_", result)
    timed = [i for i, layer in enumerate(layers) if f"{layer.name}.speedup" in result.stats]
    if not timed:
        return layers, chosen
    if len(timed) == len(layers) and all(isinstance(layers[i], ConvLayer) for i in timed):
        # the convolutions' last timing was already the whole model's, with every timed layer against none
        result.stats.update(_model_stats("", timing))
        return layers, chosen
    return _drop_slower(ctx, model, feed, layers, chosen, timed, "", result)[:2]


def _model_stats(prefix: str, timing: dict[str, float]) -> dict[str, float]:
    """A whole-model timing (graphopt.passes.exprune.timing.time_models) as the pass reports it."""
    return {f"{prefix}dense_model_ms": timing["reference_ms"], f"{prefix}model_ms": timing["candidate_ms"],
            **{f"{prefix}model_{key}": timing[key] for key in ("speedup", "speedup_p10", "speedup_p90")}}


def _drop_slower(ctx: PassContext, model: onnx.ModelProto, feed: dict[str, Any], layers: list[Layer],
                 chosen: list[Choice], timed: list[int], prefix: str,
                 result: PassResult) -> tuple[list[Layer], list[Choice], dict[str, float]]:
    """`layers` less those of `timed` dropped, slowest alone first, until the model with the rest of `timed`
    replaced is MIN_SPEEDUP faster than the model with none of them (the other layers replaced in both), and
    the last timing, which also goes into the stats under `prefix` (none: nothing was timed)."""
    from graphopt.passes.exprune.timing import time_models

    timing: dict[str, float] = {}
    if not timed:
        return layers, chosen, timing
    others = {layer.output.name: found for layer, (_, found) in zip(_without(layers, timed), _without(chosen, timed))}
    reference = candidate_model(model, others)
    timed = sorted(timed, key=lambda i: result.stats[f"{layers[i].name}.speedup"], reverse=True)
    kind = "convolution op(s)" if prefix else "timed op(s)"
    dropped: list[int] = []
    while timed:
        replaced = {**others, **{layers[i].output.name: chosen[i][1] for i in timed}}
        timing = time_models(reference, candidate_model(model, replaced), feed, int(ctx.option("threads") or 0))
        result.stats.update(_model_stats(prefix, timing))
        if timing["speedup"] >= MIN_SPEEDUP:
            break
        dropped.append(timed.pop())
        why = "; the blocked layout is converted around each op" if prefix else ""
        result.skipped.append(f"{layers[dropped[-1]].name}: left dense, faster alone but the model with "
                              f"{len(timed) + 1} {kind} ran {timing['speedup']:.2f}x as fast as without "
                              f"them (p10-p90 {timing['speedup_p10']:.2f}-{timing['speedup_p90']:.2f}, kept from "
                              f"{MIN_SPEEDUP:.2f}{why})")
    result.stats["layers_left_dense"] = result.stats.get("layers_left_dense", 0) + len(dropped)
    return _without(layers, dropped), _without(chosen, dropped), timing


def _without(items: list[Any], indices: list[int]) -> list[Any]:
    return [item for index, item in enumerate(items) if index not in indices]


def tolerance_text(text: str) -> str:
    """A --tolerance in its canonical spelling; a malformed one is refused (`OptionError`)."""
    from graphopt.calibration.heldout import Tolerance

    return str(Tolerance.parse(text))


@dataclass
class ExPruneOptions(Seeded):
    exprune_probe: float | None = option(None, metavar="F", help="exprune: probe length as a fraction of each "
                                         "layer's input size (default: chosen per layer from 1/16, 1/8, 1/4, 1/2)")
    exprune_fnr: float | None = option(None, metavar="R", help="exprune: false-negative rate allowed per neuron on "
                                       "calibration data (default: the largest rate within --tolerance on held-out "
                                       "calibration samples)")
    exprune_rule: str = option(AUTO, choices=(*RULES, AUTO),
                               help="exprune: one test on the probe, tests at doubling probe lengths, or auto "
                                    "(default): per layer, the rule (with the probe) that skips the most for its "
                                    "error")
    tolerance: str | None = option(None, metavar="top1=A|sequence=A|position=A|rel_l2=E|KEY=V", parse=tolerance_text,
                                   help="exprune: fidelity to keep on held-out calibration samples (default "
                                        "top1=0.99 for class scores, sequence=0.99 for sequences, else "
                                        "rel_l2=0.01); KEY=V (>= V) or KEY<=V reads a key --metric returns")
    exprune_allocation: str = option(ALLOCATION, choices=ALLOCATIONS,
                                     help="exprune: with --tolerance, a false-negative rate per layer (each layer's "
                                          "error and skipped MACs measured alone, combined along the best ratio, "
                                          "certified as a whole on the held-out samples) or one rate for all")
    exprune_layers: str = option("auto", choices=LAYER_KINDS,
                                 help="exprune: which ReLU layers to replace; auto (default): each linear and "
                                      "Conv+ReLU layer whose op measured faster than its dense form alone and in "
                                      "the model (Conv+ReLU only with the native kernels built; the others stay "
                                      "dense, named in the report with their times); all; linear; conv (untimed)")
    exprune_rows: int = option(4096, metavar="N", help="exprune: sampled input rows per linear layer for "
                                                       "calibration (default 4096)")
    exprune_maps: int = option(64, metavar="N", help="exprune: input maps per convolution scored at every position "
                                                     "(default 64)")
    exprune_dense_rows: int = option(DENSE_ROWS, metavar="N",
                                     help="exprune: calls of N rows or more (batch x tokens) run the dense layer, "
                                          "since over several rows a dense GEMM beats any per-row skipping; 0: "
                                          "the op at every batch (default 2)")
    exprune_timed: bool = option(False, help="exprune: time the layers --exprune-layers all, linear or conv names as "
                                             "auto times them (auto always does): each alone, as the op and as its "
                                             "dense form, at batch 1 on its calibration inputs, then in the model, "
                                             "and keep it dense where the op is not faster; a linear op is then "
                                             "timed at 2, 4, 8, 16, 32 rows, and the layer runs dense from the first "
                                             "count where it is not faster (unless --exprune-dense-rows 0)")
    exprune_held_out: float = option(0.25, metavar="F", help="exprune: fraction of the calibration samples held "
                                                             "out for --tolerance (default 0.25)")
    exprune_confidence: float = option(DEFAULT_CONFIDENCE, metavar="C",
                                       help="exprune: confidence that --tolerance holds on new data like the held-out "
                                            "samples (one-sided bound; default 0.95; 0: the held-out value itself)")

    def __post_init__(self) -> None:
        super().__post_init__()
        probe, fnr, held_out = self.exprune_probe, self.exprune_fnr, self.exprune_held_out
        if probe is not None and not 0.0 < float(probe) < 1.0:
            raise OptionError(f"--exprune-probe must be in (0, 1), got {probe}")
        if fnr is not None and not 0.0 <= float(fnr) < 1.0:
            raise OptionError(f"--exprune-fnr must be in [0, 1), got {fnr}")
        if not 0.0 < float(held_out) < 1.0:
            raise OptionError(f"--exprune-held-out must be in (0, 1), got {held_out}")
        if not 0.0 <= float(self.exprune_confidence) < 1.0:
            raise OptionError(f"--exprune-confidence must be in [0, 1), got {self.exprune_confidence}")
        for flag, value in (("--exprune-rows", self.exprune_rows), ("--exprune-maps", self.exprune_maps)):
            if int(value) < 1:
                raise OptionError(f"{flag} must be at least 1, got {value}")
        if int(self.exprune_dense_rows) < 0:
            raise OptionError(f"--exprune-dense-rows must be at least 0, got {self.exprune_dense_rows}")
        if self.tolerance is not None:
            self.tolerance = tolerance_text(str(self.tolerance))


EXPRUNE = register_method(Method(ExPrune.name, ExPrune.description, needs_data=True, passes=(ExPrune.name,),
                                 options=ExPruneOptions))

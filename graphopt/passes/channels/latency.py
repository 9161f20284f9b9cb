"""Predicted latency as the channel budget's cost model (`--target-latency`), after HALP's lookup tables.

For every Conv, Gemm and MatMul with a constant weight whose input or output channel count a prunable
group changes, a table of its measured time over a grid of channel counts (graphopt.calibration.latency)
predicts its time at any count; the model's predicted latency is
    L(k) = T * (1 - s) + T * s * sum_layers table_l(in_l(k), out_l(k)) / sum_layers table_l(in_l(full),
                                                                                        out_l(full)),
where T is the measured latency of the unpruned model and in_l(k), out_l(k) the features along the
layer's channel axes with k_g channels kept in group g (graphopt.passes.channels.budget.Axis; a depthwise
Conv has one count for both). The tables give how the time changes, the measurement its scale. s is the
share of T that follows the timed layers, measured (`timed_share`): the whole model is timed once more
with those groups at half width. On a CNN what the tables do not cover (residual adds, pooling, reorders,
the memory traffic between layers) follows the widths of the layers it sits between, s is about 1 or
above and it is charged to the layers in proportion to their time (measured on ResNet-50 at batch 8:
treating it as constant predicted 42% of the original for a model that ran at 3%); on a transformer the
attention's softmax and layout ops, the norms and residual adds stay when FFN units go, and s is below
1. Attention heads are priced by a probe of their own (graphopt.passes.heads.latency): the time saved per
head MAC with every head block at half its heads, and the overlap of the two savings by a timing of both
cuts together. The prediction stays approximate (linear between the timings); the written model's measured
latency is reported next to it.
The grid of an axis holds its smallest reachable width, its full width and the widths at 1/4, 1/2 and 3/4
between, in steps of the groups' rounding multiples, so the counts the solver picks lie on the grid's lattice.
Timings are at batch `bench_batch`, with `threads` and `device`, as `--bench` measures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.analysis.groups import Analysis, CostTerm, find_groups
from graphopt.analysis.state import group_key
from graphopt.calibration.data import fixed_batch
from graphopt.calibration.latency import (LatencyCache, LayerTable, Runtime, build_table, model_latency,
                                          paired_latency)
from graphopt.calibration.layer_models import ACTIVATIONS, Activation, LayerSpec, plain_attrs
from graphopt.calibration.shapes import batch1_shapes
from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.ir.shapes import batch_axes
from graphopt.passes.base import PassContext
from graphopt.passes.channels.budget import Axis, CostModel, MacModel, RoundTo, channel_axis, restore_stats, round_up
from graphopt.passes.channels.engine import apply_kept

log = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 0.75)
PROBE_FRACTION = 0.5  # the whole model is timed once with its timed groups cut to this fraction
# above 1: the untimed ops fall faster than the tables (a MobileNet's reorders, which go when counts land on
# the blocked layout: its probe ran at 0.38 of the original where the tables said 0.50); the prediction is
# then linear in the tables' ratio, exact at full width and at the probe, and never below 0
MAX_SHARE = 1.5


@dataclass
class Layer:
    name: str
    table: LayerTable
    inputs: Axis | None   # None: the input width does not change
    outputs: Axis | None  # None: the output width does not change (depthwise: the input's)
    cin: int
    cout: int

    def time(self, counts: dict[int, int]) -> float:
        cin = self.inputs.features(counts) if self.inputs is not None else self.cin
        cout = self.outputs.features(counts) if self.outputs is not None else self.cout
        return self.table(cin, cout)


@dataclass
class Timing:
    """How the unpruned model was timed: the model, its input shapes at the timed batch, where, its ms."""

    model: onnx.ModelProto
    inputs: dict[str, tuple[int, ...]]
    where: Runtime
    ms: float

    def probe(self, cut: Callable[[], onnx.ModelProto], what: str) -> float | None:
        """The ms of the copy `cut()` builds, timed interleaved against the model (`paired_latency`); None,
        logged with the reason, when it cannot be built or run or is not clearly faster (p10 of the per-round
        speedup at most 1: the machine's noise, not a measurement)."""
        try:
            paired = paired_latency(self.model, cut(), self.inputs, self.where)
        except GraphoptError as exc:  # the copy could not be cut, or onnxruntime could not load or run it
            log.info("latency probe with %s not timed (%s)", what, exc)
            return None
        if paired["speedup_p10"] <= 1.0:
            log.info("latency probe with %s within noise (speedup %.2f, p10 %.2f)", what, paired["speedup"],
                     paired["speedup_p10"])
            return None
        return self.ms / paired["speedup"]


class LatencyModel:
    """Predicted milliseconds per run (at the timed batch) as a function of the kept count per group: the
    `share` of the measured time that follows the timed layers, scaled by their tables, plus the rest, fixed.
    `timing`: how the unpruned model was timed, for other probes (heads); `probe`: where the share was measured
    on a copy, that copy's counts and how to build it again."""

    def __init__(self, layers: list[Layer], measured_ms: float, share: float = 1.0, timing: Timing | None = None,
                 probe: tuple[dict[int, int], Callable[[onnx.ModelProto], onnx.ModelProto]] | None = None) -> None:
        self.layers = layers
        self.timing = timing
        self.probe = probe
        self.total = float(measured_ms)
        timed = sum(layer.table(layer.cin, layer.cout) for layer in layers)
        share = share if timed > 0 else 0.0  # nothing timed: the latency cannot change
        self.scale = self.total * share / timed if timed > 0 else 0.0
        self.fixed = self.total * (1.0 - share)

    def cost(self, counts: dict[int, int]) -> float:
        return max(self.fixed + self.scale * sum(layer.time(counts) for layer in self.layers), 0.0)

    def ratio(self, counts: dict[int, int]) -> float:
        return self.cost(counts) / self.total if self.total else 1.0


@dataclass
class Budget:
    """The cost model a channel-pruning pass budgets and its target (a fraction of `model.total`)."""

    model: CostModel
    target: float
    kind: str  # "target_macs" or "target_latency"
    info: dict[str, float]

    def stats(self, counts: dict[int, int]) -> dict[str, float]:
        """What the pass reports about the budget for the counts it chose."""
        if self.kind != "target_latency":
            return {}
        return {"target_latency": self.target, "predicted_latency_ratio": self.model.cost(counts) / self.model.total,
                **self.info}


def budget_restore_stats(budget: Budget | None, counts: dict[int, int], sizes: dict[int, int], round_to: RoundTo,
                         macs_scale: float) -> dict[str, float]:
    """`cheapest_restore` for the counts a budget chose (graphopt.passes.channels.budget.restore_stats): a
    fraction of the given model's MACs (`macs_scale`: the fraction of them the pass's graph holds), or of the
    predicted latency; nothing without a budget (--keep-variance, --zscore)."""
    if budget is None:
        return {}
    return restore_stats(counts, sizes, round_to, budget.model, macs_scale if budget.kind == "target_macs" else 1.0)


def channel_budget(graph: gs.Graph, ctx: PassContext, analysis: Analysis, macs: MacModel,
                   multiples: dict[int, int]) -> Budget:
    """`--target-latency`'s latency model when it is given, else `macs` with `--target-macs`."""
    target = ctx.option("target_latency")
    if target is None:
        return Budget(macs, float(ctx.option("target_macs")) * ctx.macs_scale, "target_macs", {})
    model, info = latency_model(graph, ctx, analysis, set(multiples), multiples)
    return Budget(model, float(target), "target_latency", info)


def latency_model(graph: gs.Graph, ctx: PassContext, analysis: Analysis, prunable: set[int],
                  multiples: dict[int, int], cache: LatencyCache | None = None) -> tuple[LatencyModel, dict[str, float]]:
    """Times `graph` whole, and each layer a prunable group changes over its grid (cached), at the
    timed batch; returns the model and what building it cost."""
    model = ir.export_model(graph, ctx.template, infer=False)
    inputs = _timed_inputs(model, ctx.input_shapes, int(ctx.option("bench_batch", 8)))
    shapes = batch1_shapes(model, inputs)
    where = Runtime.current(ctx.option("device") or "cpu", int(ctx.option("threads") or 0))
    cache = cache or LatencyCache(where)
    measured = model_latency(model, inputs, where)
    sizes = {group.root: group.size for group in analysis.groups()}
    layers = []
    for term in analysis.costs:
        layer = _layer(term, analysis, shapes, prunable, sizes, multiples, cache)
        if layer is not None:
            layers.append(layer)
    timing = Timing(model, inputs, where, measured)
    share, probe, cut = timed_share(timing, ctx, analysis, (layers, sizes, multiples))
    info = {"latency_ms_before": measured, "latency_layers": len(layers), "latency_share_timed": share, **probe,
            "latency_table_entries": cache.entries_hit + cache.entries_built,
            "latency_table_hits": cache.entries_hit, "latency_points_measured": cache.points_measured,
            "latency_table_build_s": cache.build_seconds}
    log.info("latency tables: %d layers, %d entries from cache, %d points measured in %.1f s",
             len(layers), cache.entries_hit, cache.points_measured, cache.build_seconds)
    return LatencyModel(layers, measured, share, timing, cut), info


def timed_share(timing: Timing, ctx: PassContext, analysis: Analysis,
                timed: tuple[list[Layer], dict[int, int], dict[int, int]]
                ) -> tuple[float, dict[str, float], tuple[dict[int, int], Callable] | None]:
    """(the share of the measured latency that follows the timed layers, the probe's report entries: its
    measured ms and the tables' predicted ratio for it, `latency_probe_ms` and `latency_probe_table_ratio`,
    and (the probe's counts, a function cutting a model like it), None without one):
    the model with every group the layers' axes count cut to about `PROBE_FRACTION` of its channels is
    timed against the original, interleaved (`paired_latency`), and its fall in time set against the fall the
    tables predict for it; a probe not clearly faster (p10 of the per-round speedup at most 1) is noise. On a
    CNN all of it follows or more (1.01-1.26 on ResNet-50 and the MobileNet/EfficientNet nets at batch 8: the
    reorders, adds and pooling between the layers narrow with them, reorders go at block counts); on a transformer the
    softmax, the rotary and head layout ops, the norms and residual adds do not narrow with its FFN units,
    and charging their time to the FFN tables predicted 0.60 of the original for a decoder that ran at
    0.85. Clamped to [0, `MAX_SHARE`]; 1 (every untimed op in proportion) where no group can be cut or the
    probe cannot be built. `timed`: the layers, every group's size and rounding multiple."""
    layers, sizes, multiples = timed
    full, half = _probe_counts(layers, sizes, multiples)
    timed_full = sum(layer.table(layer.cin, layer.cout) for layer in layers)
    timed_half = sum(layer.time({**full, **half}) for layer in layers)
    if not half or timed_full <= 0 or timed_half >= timed_full:
        return 1.0, {}, None

    def cut(model: onnx.ModelProto) -> onnx.ModelProto:
        return _cut_copy(model, ctx, analysis, half)

    probe_ms = timing.probe(lambda: cut(timing.model), "the groups at half width")
    if probe_ms is None:
        log.info("untimed ops are charged in proportion to the layers")
        return 1.0, {}, None
    measured = timing.ms
    ratio = timed_half / timed_full
    share = min(max((measured - probe_ms) / (measured * (1.0 - ratio)), 0.0), MAX_SHARE)
    log.info("latency probe: %.3f ms with the groups at half width (%.3f ms whole, the tables' ratio %.3f); "
             "%.0f%% of the time follows the timed layers", probe_ms, measured, ratio, 100 * share)
    return share, {"latency_probe_ms": probe_ms, "latency_probe_table_ratio": ratio}, ({**full, **half}, cut)


def _probe_counts(layers: list[Layer], sizes: dict[int, int],
                  multiples: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """(every group the layers' axes count at its full size, those of them that can be cut at the probe's
    count: about `PROBE_FRACTION` of their channels, rounded up to their multiple)."""
    roots = {root for layer in layers for axis in (layer.inputs, layer.outputs) if axis is not None
             for root in axis.weights}
    half = {root: round_up(max(1, int(sizes[root] * PROBE_FRACTION)), sizes[root], multiples.get(root, 1))
            for root in roots}
    return {root: sizes[root] for root in roots}, {root: count for root, count in half.items() if count < sizes[root]}


def _cut_copy(model: onnx.ModelProto, ctx: PassContext, analysis: Analysis,
              counts: dict[int, int]) -> onnx.ModelProto:
    """`model` with each group (a root of `analysis`) cut to its first `counts` channels, weights sliced
    as pruning slices them (the values do not matter to its time)."""
    trial = ir.import_graph(model)
    fresh = find_groups(trial, analysis.shapes)
    wanted = {group_key(analysis.atoms, group): group.root for group in analysis.groups() if group.root in counts}
    kept = {}
    for group in fresh.groups():
        root = wanted.get(group_key(fresh.atoms, group))
        if root is not None:
            kept[group.root] = np.arange(counts[root])
    if len(kept) != len(counts):
        raise GraphoptError(f"{len(counts) - len(kept)} of the {len(counts)} groups to cut were not found again in "
                            "a copy of the graph")
    apply_kept(trial, fresh, kept)
    ir.cleanup(trial)
    return ir.export_model(trial, ctx.template, infer=False)


def _timed_inputs(model: Any, shapes: dict[str, tuple[int, ...]], batch: int) -> dict[str, tuple[int, ...]]:
    """Input shapes at the timed batch (a model with a fixed batch keeps it)."""
    if fixed_batch(model) is not None:
        return dict(shapes)
    axes = batch_axes(model)
    timed = {}
    for name, shape in shapes.items():
        axis = axes.get(name)
        timed[name] = shape if axis is None else (*shape[:axis], batch, *shape[axis + 1:])
    return timed


def grid(axis: Axis | None, full: int, sizes: dict[int, int], multiples: dict[int, int]) -> list[int]:
    """Widths at which a layer is timed along one axis (see the module docstring)."""
    if axis is None or not axis.weights:
        return [full]
    low = axis.fixed + sum(w * min(sizes[root], multiples.get(root, 1)) for root, w in axis.weights.items())
    step = min(w * multiples.get(root, 1) for root, w in axis.weights.items())
    points = {int(full), int(round(low))}
    for fraction in FRACTIONS:
        points.add(int(round(min(full, low + round((full - low) * fraction / step) * step))))
    return sorted(points)


def _roles(node: gs.Node, term_states: list[Any], analysis: Analysis, spec: LayerSpec) -> tuple[Any, Any]:
    """(input state, output state) of a cost term (None where the axis is not tracked)."""
    if spec.depthwise:
        return (term_states[0], None) if term_states else (None, None)
    out_state = analysis.state(node.outputs[0])
    outputs = next((s for s in term_states if s == out_state), None)
    inputs = next((s for s in term_states if s != out_state), None)
    return inputs, outputs


def _layer(term: CostTerm, analysis: Analysis, shapes: dict[str, tuple[int, ...]], prunable: set[int],
           sizes: dict[int, int], multiples: dict[int, int], cache: LatencyCache) -> Layer | None:
    node = term.node
    spec_and_widths = layer_spec(node, shapes)
    if spec_and_widths is None:
        return None
    spec, cin, cout = spec_and_widths
    in_state, out_state = _roles(node, term.states, analysis, spec)
    inputs = channel_axis(analysis, in_state, prunable) if in_state is not None else None
    outputs = channel_axis(analysis, out_state, prunable) if out_state is not None else None
    inputs = inputs if inputs is not None and inputs.weights else None
    outputs = outputs if outputs is not None and outputs.weights else None
    if inputs is None and outputs is None:
        return None
    if (inputs is not None and int(inputs.total) != cin) or (outputs is not None and int(outputs.total) != cout):
        log.info("%s: channel axes do not match its shapes; its time counts as fixed", node.name)
        return None
    try:
        table = build_table(cache, spec, grid(inputs, cin, sizes, multiples), grid(outputs, cout, sizes, multiples))
    except GraphoptError as exc:  # onnxruntime refused the layer alone: its time is charged to the others
        log.info("%s: not timed (%s)", node.name, exc)
        return None
    return Layer(node.name, table, inputs, outputs, cin, cout)


def layer_spec(node: gs.Node, shapes: dict[str, tuple[int, ...]]) -> tuple[LayerSpec, int, int] | None:
    """The layer as a `LayerSpec` with its full input and output widths, or None when it is not one the
    tables time (a grouped non-depthwise Conv, a variable weight, an unknown shape)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = shapes.get(node.inputs[0].name) if node.inputs else None
    if node.op not in _SPECS or not isinstance(weight, gs.Constant) or shape is None \
            or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    base = LayerSpec(node.op, tuple(shape), 1, (), False, bias, _activation(node), str(np.dtype(weight.dtype)))
    return _SPECS[node.op](node, base, tuple(weight.shape))


def _conv_spec(node: gs.Node, base: LayerSpec, w_shape: tuple[int, ...]) -> tuple[LayerSpec, int, int] | None:
    group = int(node.attrs.get("group", 1))
    depthwise = group > 1 and w_shape[0] == group and w_shape[1] == 1
    if group > 1 and not depthwise:
        return None
    attrs = (*plain_attrs(node.attrs, drop=("group", "kernel_shape")), ("kernel_shape", tuple(w_shape[2:])))
    return replace(base, attrs=tuple(sorted(attrs)), depthwise=depthwise), base.input_shape[1], w_shape[0]


def _gemm_spec(node: gs.Node, base: LayerSpec, w_shape: tuple[int, ...]) -> tuple[LayerSpec, int, int] | None:
    if node.attrs.get("transA", 0) or len(base.input_shape) != 2:
        return None
    cout = w_shape[0] if node.attrs.get("transB", 0) else w_shape[1]
    return replace(base, attrs=plain_attrs(node.attrs)), base.input_shape[1], cout


def _matmul_spec(node: gs.Node, base: LayerSpec, w_shape: tuple[int, ...]) -> tuple[LayerSpec, int, int] | None:
    rank = len(base.input_shape)
    if len(w_shape) != 2 or rank < 2:
        return None
    return replace(base, channel_axis=rank - 1, bias=False), base.input_shape[-1], w_shape[1]


_SPECS = {"Conv": _conv_spec, "Gemm": _gemm_spec, "MatMul": _matmul_spec}


def _activation(node: gs.Node) -> Activation | None:
    """The elementwise activation that alone reads `node`'s output, timed with it (fused by onnxruntime)."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op not in ACTIVATIONS:
        return None
    follower = out.outputs[0]
    extra = follower.inputs[1:]
    if any(t.name and not isinstance(t, gs.Constant) for t in extra) or follower.inputs[0] is not out:
        return None
    constants = tuple(float(np.asarray(t.values).reshape(-1)[0]) if t.name else None for t in extra)
    attrs = dict(plain_attrs(follower.attrs))
    if follower.op == "Clip" and ("min" in attrs or "max" in attrs):  # Clip-6 attributes as Clip-11 inputs
        constants, attrs = (attrs.pop("min", None), attrs.pop("max", None)), {}
    return Activation(follower.op, tuple(sorted(attrs.items())), constants)

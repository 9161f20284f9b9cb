"""ExPrune's layers: finding the linear+ReLU and Conv+ReLU layers it can take, scoring them on sampled inputs
for every probe length (and rule, under "auto"), choosing the probe that skips most at a false-negative rate,
and building the model with chosen layers replaced (graphopt.passes.exprune.prune runs the pass; linear.py
and conv.py hold each kind's maths and surgery)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from graphopt.ir import graph as ir
from graphopt.ops.exprune import RULES, build_exprune_function, doubling_checkpoints
from graphopt.passes.base import PassContext
from graphopt.passes.exprune.calib import Calibrated, probe_length
from graphopt.passes.exprune.conv import ConvLayer, ConvScoring, match_conv, replace_conv
from graphopt.passes.exprune.linear import LinearLayer, LinearScoring, match_linear, replace_linear

POSITIONS_PER_ROW = 4  # convolution output positions scored per linear-layer row allowed
AUTO = "auto"  # --exprune-rule: each layer's rule chosen with its rate

Layer = LinearLayer | ConvLayer
Scoring = LinearScoring | ConvScoring
Choice = tuple[Scoring, Calibrated]


def match(graph: gs.Graph, node: gs.Node) -> Layer | str | None:
    if node.op in ("Gemm", "MatMul"):
        return match_linear(graph, node)
    if node.op == "Conv":
        return match_conv(graph, node)
    return None


SLOWER_CONV = ("left dense: the native kernels are not built (graphopt ops build), and graphopt.ExPruneConvRelu's "
               "function body runs slower than the convolution (--exprune-layers all replaces it to skip MACs)")


def discover(graph: gs.Graph, kinds: str) -> tuple[list[Layer], list[str]]:
    """The layers to search for `kinds` ("auto": linear layers, and the convolutions where the native kernel is
    built, else named as left dense; "all", "linear", "conv"), and why others were not."""
    from graphopt.calibration.session import native_conv_kernel

    layers, skipped = [], []
    native_conv = kinds == "auto" and native_conv_kernel()
    for node in list(graph.nodes):
        if kinds in ("linear", "conv") and (node.op == "Conv") != (kinds == "conv"):
            continue
        found = match(graph, node)
        if isinstance(found, str):
            skipped.append(f"{node.name}: {found}")
        elif found is not None and kinds == "auto" and isinstance(found, ConvLayer) and not native_conv:
            skipped.append(f"{node.name}: Conv+Relu {SLOWER_CONV}")
        elif found is not None:
            layers.append(found)
    return layers, skipped


def replace(graph: gs.Graph, layer: Layer, found: Calibrated) -> gs.Node:
    """The op node now in the layer's place, with the rule `found` was calibrated for."""
    if isinstance(layer, ConvLayer):
        return replace_conv(graph, layer, found, found.rule)
    return replace_linear(graph, layer, found, found.rule)


def best(scorings: list[Scoring], fnr: float, rule: str | None = None) -> Choice:
    """The probe length (and, without `rule`, the rule) skipping the largest fraction of the layer's MACs at this
    rate; with `rule`, among that rule's scorings (all of them where a layer too narrow for a second checkpoint
    has none: its sequential rule is the threshold rule)."""
    calibrated = [(s, s.calibrate(fnr)) for s in [s for s in scorings if rule is None or s.rule == rule] or scorings]
    return max(calibrated, key=lambda pair: pair[1].macs_skipped)


def candidate_model(model: onnx.ModelProto, choices: dict[str, Calibrated]) -> onnx.ModelProto:
    """`model` with the layers whose output is in `choices` replaced (the pass's graph is untouched)."""
    graph = ir.import_graph(model)
    for node in list(graph.nodes):
        found = match(graph, node)
        if found is not None and not isinstance(found, str) and found.output.name in choices:
            replace(graph, found, choices[found.output.name])
            if isinstance(found, LinearLayer):
                ir.add_function(graph, build_exprune_function(graph.opset))
    ir.cleanup(graph)
    return ir.export_model(graph, model)


def scorings(ctx: PassContext, model: onnx.ModelProto, layers: list[Layer], options: dict[str, Any],
              data: Any) -> list[list[Scoring]]:
    """Per layer, a scoring per probe length and rule (both rules under "auto"; a sequential rule whose probe
    leaves room for one checkpoint only is the threshold rule and is not scored twice)."""
    samples = sample(ctx, model, layers, data)
    seed, positions = int(ctx.option("seed", 0)), int(ctx.option("exprune_rows", 4096)) * POSITIONS_PER_ROW
    rules = RULES if options["rule"] == AUTO else (options["rule"],)
    found = []
    for layer in tqdm(layers, desc="exprune scores", disable=not ctx.progress, leave=False):
        scored = []
        for probe, rule in ((probe, rule) for probe in options["probes"] for rule in rules):
            if rule == "sequential" and len(rules) > 1 and _one_checkpoint(layer.terms, probe):
                continue
            rows = samples[layer.source.name]
            scored.append(ConvScoring(rows, layer, probe, rule, max_positions=positions, seed=seed)
                          if isinstance(layer, ConvLayer) else LinearScoring(rows, layer, probe, rule))
        found.append(scored)
    return found


def _one_checkpoint(terms: int, probe: float) -> bool:
    """Whether the sequential rule at this probe has a single checkpoint (then it is the threshold rule)."""
    return len(doubling_checkpoints(terms, probe_length(probe, terms))) == 1


def sample(ctx: PassContext, model: onnx.ModelProto, layers: list[Layer], data: Any) -> dict[str, np.ndarray]:
    """Input rows of linear layers and whole input maps of convolutions (float64)."""
    from graphopt.calibration.distributed import gather_maps, gather_rows

    batch_size, seed = int(ctx.option("batch_size", 32)), int(ctx.option("seed", 0))
    linear = {layer.source.name: -1 for layer in layers if isinstance(layer, LinearLayer)}
    conv = [layer.source.name for layer in layers if isinstance(layer, ConvLayer)]
    # on the run's Ray cluster when it has one (--workers, --ray-address): the same rows and maps
    rows = gather_rows(ctx.cluster, model, data, linear, max_rows=int(ctx.option("exprune_rows", 4096)),
                       batch_size=batch_size, seed=seed)
    maps = gather_maps(ctx.cluster, model, data, conv, max_items=int(ctx.option("exprune_maps", 64)),
                       batch_size=batch_size)
    return {**rows, **{name: values.astype(np.float64) for name, values in maps.items()}}

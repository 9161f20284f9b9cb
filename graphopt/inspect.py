"""`graphopt inspect`: a model's cost, interface and op histogram as a JSON-ready dict."""

from __future__ import annotations

import os
from typing import Any

import onnx

from graphopt.analysis.macs import op_histogram, parameter_count
from graphopt.calibration.shapes import count_cost
from graphopt.errors import OptionError
from graphopt.ir.io import load_model
from graphopt.ir.shapes import input_specs, resolve_input_shapes


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "?"
    return {"name": value.name, "dtype": dtype, "shape": dims}


def channel_groups(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """The channel groups structured methods see: found after the normalising pre-passes."""
    return structures(model, input_shapes)[0]


def structures(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The channel groups structured methods see and the attention head blocks SNP cuts (a head block's q/k/v
    channel groups are left to its heads): found after the normalising pre-passes, with QDQ weights read as the
    float values they stand for and dynamically quantized layers as float layers, as the pruning methods read them
    (graphopt.passes.quantize.through and .dynamic)."""
    from graphopt.ir import graph as ir
    from graphopt.passes import PassContext, PassManager, normalising_passes
    from graphopt.passes.channels.magnitude import analyse
    from graphopt.passes.heads.select import describe_block, head_blocks
    from graphopt.passes.quantize.dynamic import unquantize_layers
    from graphopt.passes.quantize.through import unquantize_weights

    graph = ir.import_graph(model)
    ctx = PassContext(template=model, input_shapes=input_shapes, progress=False)
    PassManager(normalising_passes()).run(graph, ctx)
    unquantize_weights(graph)
    unquantize_layers(graph)
    analysis, _ = analyse(graph, ctx)
    blocks = [describe_block(block, reason) for block, reason in head_blocks(graph, analysis.shapes)]
    return [group.describe() for group in analysis.groups()], blocks


def inspect_model(model: str | os.PathLike[str] | onnx.ModelProto,
                  input_shapes: dict[str, tuple[int, ...]] | None = None, groups: bool = False) -> dict[str, Any]:
    """Given no `input_shapes` for a model with dynamic non-batch axes, MACs cannot be counted: `macs` is None,
    `macs_unknown` says which shapes to give, and the rest is reported (channel groups need the shapes)."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    try:
        shapes = resolve_input_shapes(proto, input_shapes)
    except OptionError as missing:
        if groups or input_shapes:  # shapes given and wrong, or channel groups asked for: an error
            raise
        return {**_described(proto), "macs": None, "params": parameter_count(proto), "input_shapes": {},
                "op_histogram": op_histogram(proto), "macs_per_node": {}, "macs_uncounted": {},
                "macs_unknown": str(missing).replace(" or a data file", "")}
    cost = count_cost(proto, shapes)
    extra = dict(zip(("groups", "head_blocks"), structures(proto, shapes))) if groups else {}
    return {
        **_described(proto),
        "macs": cost.macs,
        "params": cost.params,
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "op_histogram": cost.op_histogram,
        "macs_per_node": cost.per_node,
        "macs_uncounted": cost.uncounted,
        **extra,
    }


def _described(proto: onnx.ModelProto) -> dict[str, Any]:
    """What a model declares: nodes, opsets, interface, metadata keys, local functions."""
    real_inputs = {s.name for s in input_specs(proto)}
    return {
        "nodes": len(proto.graph.node),
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": [_value_info(v) for v in proto.graph.input if v.name in real_inputs],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "metadata_props": {p.key: p.value for p in proto.metadata_props},
        "functions": [f"{f.domain}::{f.name}" for f in proto.functions],
    }

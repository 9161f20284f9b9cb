"""Installing graphopt's ops into a model: every op's function builder, found by op name.

This module sits above the op modules (they import only graphopt.ops.functions), so the table of
builders is the one place that knows every op; adding an op adds one entry here.
"""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

from graphopt.ir.graph import supersedes
from graphopt.ops.exprune import build_exprune_function
from graphopt.ops.exprune_conv import build_exprune_conv_function
from graphopt.ops.functions import DOMAIN
from graphopt.ops.rms_norm import build_rms_norm_function
from graphopt.ops.tsra import build_tsra_function

# op name -> its function body for a default-domain opset
BUILDERS: dict[str, Callable[[int], onnx.FunctionProto]] = {
    "TSRA": build_tsra_function,
    "RMSNorm": build_rms_norm_function,
    "ExPruneLinearRelu": build_exprune_function,
    "ExPruneConvRelu": build_exprune_conv_function,
}


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def declared_attributes(function: onnx.FunctionProto) -> set[str]:
    """Attribute names a function accepts: required ones and those with a default."""
    return set(function.attribute) | {a.name for a in function.attribute_proto}


def ensure_function(model: onnx.ModelProto, name: str, build: Callable[[int], onnx.FunctionProto]) -> None:
    """Add graphopt function `name` (built for the model's opset) and the domain import, if missing.

    A copy written by an older graphopt that lacks an attribute the current body declares with a
    default (RMSNorm's `axis`, ExPrune's `checkpoints`) is replaced: those defaults keep the old
    meaning, so the nodes it served still compute what they did."""
    current = build(default_opset(model))
    existing = [i for i, f in enumerate(model.functions) if f.domain == DOMAIN and f.name == name]
    stale = [i for i in existing if supersedes(current, declared_attributes(model.functions[i]))]
    for index in reversed(stale):
        del model.functions[index]
    if len(stale) == len(existing):
        model.functions.append(current)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def ensure_functions(model: onnx.ModelProto) -> None:
    """Install the function of every graphopt op the main graph uses but the model does not define."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    for op in sorted(used & BUILDERS.keys()):
        ensure_function(model, op, BUILDERS[op])

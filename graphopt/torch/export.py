"""Export torch modules to self-contained ONNX files with either torch exporter.

Both exporters produce one ``.onnx`` file (weights embedded, no external data) with a single
input named ``input`` and a single output named ``output``; ``dynamic_batch`` makes axis 0 of
both symbolic (``batch``).

BatchNorm handling (``fold_bn``), for a module in eval mode:

* legacy (TorchScript) exporter: ``training=EVAL`` runs the exporter's eval peephole pass, which
  folds every Conv -> BatchNormalization pair into the Conv; ``training=PRESERVE`` skips that
  pass (the module stays in eval mode, so BN uses its running statistics) and keeps
  ``BatchNormalization`` nodes. ``do_constant_folding`` stays on in both cases.
* dynamo exporter: the graph is translated unoptimised and then cleaned with onnxscript's
  optimiser, whose default rewrite rules fold BN into a preceding Conv/ConvTranspose/Gemm. With
  ``fold_bn=False`` the BN nodes are hidden from the optimiser (moved to a private domain for
  the duration) so everything else is cleaned identically and only the BN folding is skipped.

In both exporters a BatchNormalization without a foldable producer stays a node either way.

Opsets: the legacy exporter emits the requested opset directly. The dynamo exporter translates
at ``max(opset, 18)`` (torchlib has no lower implementations). Below 18 the model is relabelled
to the requested opset with the few structural rewrites that span opsets 13-18 (see
``_downgrade_opset``; the stock ONNX version converter lacks down-conversion adapters for
common ops such as Relu and Split) and must then pass ``onnx.checker`` with ``full_check``. If
the target opset cannot express the graph (HardSwish needs 14, LayerNormalization 17) a
``ValueError`` names the offending ops instead of silently writing a different opset.
Verified combinations: legacy at 13/17/20 and dynamo at 17/18/20 for every zoo model, and dynamo
at 13 for every zoo model except ``se_hardswish`` and ``transformer``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx import numpy_helper
from torch import nn

EXPORTERS = ("legacy", "dynamo")
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_AXIS_NAME = "batch"

_TORCHLIB_MIN_OPSET = 18
_HIDDEN_BN_DOMAIN = "graphopt.unfused_bn"
_REDUCE_OPS_WITH_AXES_INPUT = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSumSquare",
})


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    exporter: str = "legacy",
    opset: int = 17,
    fold_bn: bool = True,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (called on ``example``) to ``path`` and return the path.

    The model must be in eval mode: with ``fold_bn=False`` the legacy exporter preserves the
    module's mode, and a module in training mode would export training-time BatchNorm.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    if any(module.training for module in model.modules()):
        raise ValueError("export_onnx needs a model in eval mode; call model.eval() first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "legacy":
        proto = _export_legacy(model, example, opset, fold_bn, dynamic_batch)
    else:
        proto = _export_dynamo(model, example, opset, fold_bn, dynamic_batch)
    onnx.save(proto, path)
    return path


def _export_legacy(model: nn.Module, example: torch.Tensor, opset: int, fold_bn: bool,
                   dynamic_batch: bool) -> onnx.ModelProto:
    training = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    dynamic_axes = ({INPUT_NAME: {0: BATCH_AXIS_NAME}, OUTPUT_NAME: {0: BATCH_AXIS_NAME}}
                    if dynamic_batch else None)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # PRESERVE + constant folding is only risky for modules in training mode, refused above
        warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
        try:
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=opset, training=training,
                do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
            )
        except torch.onnx.errors.UnsupportedOperatorError as error:  # an op the opset cannot express
            raise ValueError(f"legacy export cannot be expressed in opset {opset}: "
                             f"{str(error).splitlines()[0]}") from error
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int, fold_bn: bool,
                   dynamic_batch: bool) -> onnx.ModelProto:
    dynamic_shapes = ({0: BATCH_AXIS_NAME},) if dynamic_batch else None
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=max(opset, _TORCHLIB_MIN_OPSET),
        optimize=False, verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
    )
    _optimize(program.model, fold_bn)
    proto = ir.to_proto(program.model)
    if opset < _TORCHLIB_MIN_OPSET:
        _downgrade_opset(proto, opset)
    return proto


def _optimize(model: ir.Model, fold_bn: bool) -> None:
    """Run onnxscript's optimiser; with ``fold_bn=False`` keep every BatchNormalization node."""
    hidden = [] if fold_bn else _hide_batchnorms(model)
    onnxscript.optimizer.optimize_ir(model)
    for node in hidden:
        node.domain = ""
    model.opset_imports.pop(_HIDDEN_BN_DOMAIN, None)


def _hide_batchnorms(model: ir.Model) -> list[ir.Node]:
    """Move BN nodes to a private domain so no rewrite rule matches them."""
    batchnorms = [node for node in ir.traversal.RecursiveGraphIterator(model.graph)
                  if node.op_type == "BatchNormalization" and node.domain == ""]
    for node in batchnorms:
        node.domain = _HIDDEN_BN_DOMAIN
    if batchnorms:
        model.opset_imports[_HIDDEN_BN_DOMAIN] = 1
    return batchnorms


def _downgrade_opset(model: onnx.ModelProto, opset: int) -> None:
    """Relabel an opset-18 model as ``opset``, rewriting the constructs whose form changed.

    Between opsets 13 and 18 most ops changed only in the types they accept. The structural
    changes handled here: Reduce* ``axes`` moved from attribute to input (18), Split gained
    ``num_outputs`` (18), Reshape gained ``allowzero`` (14), and attributes added later that
    sit at their default value (e.g. Resize ``antialias``). Everything else is left to the
    checker: a node the target opset cannot express (HardSwish below 14, LayerNormalization
    below 17, ...) raises ``ValueError``.
    """
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    shapes = {info.name: info.type.tensor_type.shape for info in graph.value_info}
    _require_ops(graph, opset)
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            _downgrade_node(node, constants, shapes, opset)
            _drop_default_attributes(node, opset)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for opset_import in model.opset_import:
        if opset_import.domain in ("", "ai.onnx"):
            opset_import.version = opset
    _check_expressible(model, opset)


def _require_ops(graph: onnx.GraphProto, opset: int) -> None:
    missing = sorted({node.op_type for node in graph.node
                      if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, opset)})
    if missing:
        raise ValueError(f"dynamo export uses ops that do not exist in opset {opset}: {', '.join(missing)}; "
                         f"use opset >= {_TORCHLIB_MIN_OPSET} or the legacy exporter")


def _check_expressible(model: onnx.ModelProto, opset: int) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ValueError(
            f"dynamo export cannot be expressed in opset {opset} ({error}); "
            f"use opset >= {_TORCHLIB_MIN_OPSET} or the legacy exporter"
        ) from error


def _downgrade_node(node: onnx.NodeProto, constants: dict[str, np.ndarray],
                    shapes: dict[str, onnx.TensorShapeProto], opset: int) -> None:
    if node.op_type in _REDUCE_OPS_WITH_AXES_INPUT and len(node.input) > 1:
        _axes_to_attribute(node, constants)
    if node.op_type == "Split" and len(node.input) < 2 and _splits_evenly(node, shapes):
        # without ``split`` sizes, opset 13-17 Split divides the axis evenly among the outputs
        _pop_attribute(node, "num_outputs", 0)
    if node.op_type == "Reshape" and opset < 14:
        _drop_allowzero(node, constants)


def _axes_to_attribute(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> None:
    """A Reduce* node's ``axes`` input (opset 18) as the attribute of earlier opsets."""
    axes = constants.get(node.input[1]) if node.input[1] else np.array([], np.int64)
    noop = _pop_attribute(node, "noop_with_empty_axes", 0)
    if axes is None or (axes.size == 0 and noop):
        raise ValueError(f"{node.name}: Reduce axes must be a non-empty constant below opset 18")
    del node.input[1:]
    if axes.size:
        node.attribute.append(onnx.helper.make_attribute("axes", axes.tolist()))


def _drop_allowzero(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> None:
    """Reshape below opset 14 has no ``allowzero``: dropping it is exact unless the shape has a literal 0."""
    shape = constants.get(node.input[1])
    if _pop_attribute(node, "allowzero", 0) and shape is not None and (shape == 0).any():
        raise ValueError(f"{node.name}: Reshape to a literal 0 dimension needs opset >= 14")


def _splits_evenly(node: onnx.NodeProto, shapes: dict[str, onnx.TensorShapeProto]) -> bool:
    axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)
    sizes = set()
    for output in node.output:
        dims = shapes[output].dim if output in shapes else []
        sizes.add(dims[axis].dim_value if -len(dims) <= axis < len(dims) else 0)
    return len(sizes) == 1 and 0 not in sizes


def _drop_default_attributes(node: onnx.NodeProto, opset: int) -> None:
    """Remove attributes unknown to the target schema that hold their opset-18 default."""
    target = onnx.defs.get_schema(node.op_type, opset, node.domain)
    source = onnx.defs.get_schema(node.op_type, _TORCHLIB_MIN_OPSET, node.domain)
    kept = [attribute for attribute in node.attribute
            if attribute.name in target.attributes or not _holds_default(attribute, source)]
    del node.attribute[:]
    node.attribute.extend(kept)


def _holds_default(attribute: onnx.AttributeProto, schema: onnx.defs.OpSchema) -> bool:
    if attribute.name not in schema.attributes:
        return False
    default = schema.attributes[attribute.name].default_value
    return (default.type != onnx.AttributeProto.UNDEFINED
            and onnx.helper.get_attribute_value(default) == onnx.helper.get_attribute_value(attribute))


def _pop_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    """Remove integer attribute ``name`` from ``node`` and return its value (``default`` if absent)."""
    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[index]
            return int(attribute.i)
    return default

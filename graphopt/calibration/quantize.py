"""Static INT8 quantization in the QDQ format, by onnxruntime's quantizer, on graphopt's calibration data.

Every quantized tensor x is stored or simulated as q = clamp(round(x / s) + z, qmin, qmax) and read back
as s (q - z): weights as int8 constants behind DequantizeLinear (one scale per output channel by
default, symmetric, z = 0), activations through QuantizeLinear/DequantizeLinear pairs whose scale and
zero point come from the calibration batches (min/max, entropy or percentile of each tensor's values,
as onnxruntime's calibrators measure them). The rounding error is at most s/2 per element (values inside
the calibrated range); outside it, values saturate. Nothing here is exact: the caller measures fidelity.
A quantized tensor also rounds small values to exactly 0, and the quantizer drops a Clip or Relu floor into
the quantization range: where that sends 0 into a Log (a log-mel front end's Clip(eps) -> Log) or a divisor,
the outputs turn infinite. `quantize_checked` runs the first calibration batch through both models and, where
the quantized one is no longer finite, quantizes again with the producers of such inputs left in float.

onnxruntime's CPU provider runs DQ -> Conv/MatMul/Gemm -> Q as integer kernels (QLinearConv,
MatMulIntegerToFloat, ...), so the saved model is a plain ONNX model any onnxruntime runs.
Types: int8 weights and uint8 activations (U8S8) by default: onnxruntime's x86 integer convolution and
MatMul kernels are built for u8 x s8 (`python bench/quantize.py`, ResNet-50 at 160x160, 2-core AVX-512
Xeon, onnxruntime 1.32: U8S8 ran 2.23x (batch 1) and 2.86x (batch 8) as fast as the float model, S8S8
0.83x and 0.95x with `--quant-activations int8`); int8
activations (S8S8) remain available. On x86 CPUs without VNNI, per-channel int8 weights can saturate the
u8*s8 multiply-add; `reduce_range` (7-bit weights) is the guide's remedy there.

Invariants: a model that already holds quantized ops is refused (`QuantizeError`), never quantized
twice; a model below opset 13 (per-axis QDQ) is converted to opset 13 by ONNX's version converter, not
merely relabelled, and a float16 or bfloat16 model below opset 19 to opset 19 (the quantizer writes its
scales in the model's float type, which DequantizeLinear reads from opset 19 on); graph input and output
names are those of the model given.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from graphopt.calibration.data import Dataset
from graphopt.calibration.session import runtime
from graphopt.errors import GraphoptError
from graphopt.ir.graph import at_opset
from graphopt.ir.shapes import input_specs

log = logging.getLogger(__name__)

QDQ_OPSET = 13  # QuantizeLinear/DequantizeLinear with an `axis` (per-channel scales)
HALF_QDQ_OPSET = 19  # DequantizeLinear with float16/bfloat16 scales
CALIBRATIONS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")

# ops that mean the model is quantized already (ONNX's own and onnxruntime's com.microsoft kernels)
_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
              "MatMulIntegerToFloat", "MatMulNBits", "QGemm", "QAttention", "QEmbedLayerNormalization"}
_QUANTIZED_PREFIXES = ("QLinear", "DynamicQuantize")


class QuantizeError(GraphoptError):
    """The model cannot be quantized as given (already quantized, or refused by the quantizer)."""


@dataclass(frozen=True)
class QuantizeSettings:
    """What `quantize_qdq` asks onnxruntime's quantizer for."""

    calibration: str = "minmax"
    per_channel: bool = True
    activations: str = "uint8"
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()  # op types left in float
    batch_size: int = 32


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each quantized op type in the model's graph (subgraphs included)."""
    found: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        if node.op_type in _QUANTIZED or node.op_type.startswith(_QUANTIZED_PREFIXES):
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Raise `QuantizeError` naming the quantized ops when the model already has some."""
    found = quantized_ops(model)
    if found:
        listed = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
        raise QuantizeError(f"the model is already quantized ({listed}): quantizing it again would stack "
                            "scales on integer weights; quantize the float model instead (the pruning methods prune a QDQ "
                            "model as it is)")


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def half_precision(model: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 or bfloat16 (an initializer or a graph input of that type)."""
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(t.data_type in half for t in model.graph.initializer) or \
        any(v.type.tensor_type.elem_type in half for v in model.graph.input)


def qdq_opset(model: onnx.ModelProto) -> int:
    """The opset QDQ quantization of `model` needs: 13 (per-axis scales), 19 for half-precision models."""
    return HALF_QDQ_OPSET if half_precision(model) else QDQ_OPSET


def _at_qdq_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at the opset `qdq_opset` asks: converted by ONNX's version converter where it is lower."""
    needed = qdq_opset(model)
    if default_opset(model) >= needed:
        return model
    why = "per-channel QDQ quantization" if needed == QDQ_OPSET else "DequantizeLinear with float16 scales"
    try:
        converted = at_opset(model, needed)
    except ValueError as exc:
        raise QuantizeError(f"the model is at opset {default_opset(model)}; {why} needs opset {needed} and "
                            f"ONNX's converter refused: {exc}") from exc
    log.info("opset raised from %d to %d for %s", default_opset(model), needed, why)
    return converted


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a unique name on every main-graph node (the quantizer excludes nodes by name)."""
    if all(node.name for node in model.graph.node) and len({n.name for n in model.graph.node}) == len(model.graph.node):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for index, node in enumerate(named.graph.node):
        node.name = f"{node.op_type}_{index}_graphopt"
    return named


# ops whose input 2 the quantizer stores as an int32 bias with scale = input scale x weight scale
_BIASED = {"Conv", "ConvTranspose", "Gemm", "InstanceNormalization", "LayerNormalization"}


def _unshared_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its own copy of every bias initializer that more than one node reads.

    Each node's int32 bias has its own scale, so the quantizer copies a shared bias, naming the copy by
    appending a number to the initializer's name without checking activation names: in tf2onnx exports
    (one zero bias shared by many convolutions, tensors named after the layer) `conv1d_25` + `2` is an
    activation's name already, and the written model does not load. Copies named here are unique among
    every tensor name."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    shared = [index for index, node in enumerate(model.graph.node) if node.op_type in _BIASED
              and len(node.input) > 2 and node.input[2] in initializers and readers[node.input[2]] > 1]
    if not shared:
        return model
    unshared = onnx.ModelProto()
    unshared.CopyFrom(model)
    taken = _tensor_names(model)
    for index in shared:
        node = unshared.graph.node[index]
        bias = node.input[2]
        if readers[bias] == 1:  # the last reader keeps the original
            continue
        readers[bias] -= 1
        name = next(f"{bias}_bias{k}" for k in range(len(taken) + 1) if f"{bias}_bias{k}" not in taken)
        taken.add(name)
        copy = unshared.graph.initializer.add()
        copy.CopyFrom(initializers[bias])
        copy.name = name
        node.input[2] = name
    return unshared


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name the model uses: node inputs and outputs (subgraphs included), initializers, graph
    inputs, outputs and value_info."""
    names = {name for node in _all_nodes(model.graph) for name in (*node.input, *node.output)}
    names |= {tensor.name for tensor in model.graph.initializer}
    return names | {value.name for value in (*model.graph.input, *model.graph.output, *model.graph.value_info)}


def _reader(dataset: Dataset, model: onnx.ModelProto, batch_size: int) -> Any:
    """An onnxruntime CalibrationDataReader over the dataset's batches (the inputs `model` reads)."""
    base = runtime().quantization.CalibrationDataReader
    names = {value.name for value in model.graph.input}

    class BatchReader(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.batches = iter(dataset.batches(batch_size, trimmed=False))

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self.batches, None)
            return None if feed is None else {k: v for k, v in feed.items() if k in names}

    return BatchReader()


# ops whose input must stay away from zero, and which input: a quantized tensor rounds small values to exactly 0
_AWAY_FROM_ZERO = {"Log": 0, "Reciprocal": 0, "Sqrt": 0, "Div": 1}
# floors the quantizer folds into the quantization range of the tensor they read (and so drops)
_FLOORS = ("Clip", "Relu", "Max")


def guarded_producers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose output reaches a Log, Reciprocal, Sqrt or a Div's divisor, directly or through
    a floor (Clip, Relu, Max) or a constant added (x + eps), and those guards: a log-mel filterbank's MatMul
    before Clip(eps) and Log, or before NeMo's guard Add. Quantizing such an output lets exact zeros reach the
    op (the floor is dropped with the quantization)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}

    def guard(node: onnx.NodeProto) -> bool:  # a floor, or a constant guard added (x + eps)
        added = node.op_type == "Add" and len(node.input) == 2 and node.input[1] in constants
        return node.op_type in _FLOORS or added

    found: list[str] = []
    for node in model.graph.node:
        index = _AWAY_FROM_ZERO.get(node.op_type)
        source = producers.get(node.input[index]) if index is not None and index < len(node.input) else None
        while source is not None:
            if source.name and source.name not in found:
                found.append(source.name)
            source = producers.get(source.input[0]) if guard(source) and source.input else None
    return found


def quantize_qdq(model: onnx.ModelProto, dataset: Dataset, settings: QuantizeSettings) -> onnx.ModelProto:
    """`model` with static QDQ quantization calibrated on `dataset` (see the module docstring)."""
    return quantize_checked(model, dataset, settings)[0]


def quantize_checked(model: onnx.ModelProto, dataset: Dataset,
                     settings: QuantizeSettings) -> tuple[onnx.ModelProto, list[str]]:
    """`quantize_qdq`, then the first calibration batch through both models: where the quantized model's
    outputs hold NaN or infinity that the float model's do not, the model is quantized again with every
    `guarded_producers` node left in float, and those nodes ("name (OpType)") are returned beside it. A model
    still not finite then is refused (QuantizeError)."""
    quantized = _quantize(model, dataset, settings, [])
    if _finite_as_before(model, quantized, dataset, settings.batch_size):
        return quantized, []
    named = _prepared(model)  # named as the copy the quantizer gets
    kept = guarded_producers(named)
    if kept:
        quantized = _quantize(model, dataset, settings, kept)
    ops = {node.name: node.op_type for node in named.graph.node}
    described = [f"{name} ({ops[name]})" for name in kept]
    if not kept or not _finite_as_before(model, quantized, dataset, settings.batch_size):
        also = f", also with {', '.join(described)} left in float" if kept else ""
        raise QuantizeError("the quantized model's outputs hold NaN or infinity on the calibration data where the "
                            f"float model's do not{also}; leave the op types that cause it in float with "
                            "--quant-exclude")
    return quantized, described


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` as the quantizer needs it: at the QDQ opset, every node named, biases unshared."""
    refuse_quantized(model)
    runtime()
    prepared = _unshared_biases(_named(_at_qdq_opset(model)))
    if prepared is model:  # the quantizer rewrites the proto it is given (its weights become external data of a
        prepared = onnx.ModelProto()  # file it deletes): the caller's model is left as it was
        prepared.CopyFrom(model)
    return prepared


def _finite_as_before(model: onnx.ModelProto, quantized: onnx.ModelProto, dataset: Dataset, batch_size: int) -> bool:
    """No output of `quantized` on the first batch holds NaN or infinity where `model`'s is finite (the float
    model runs only when the quantized one has a non-finite value)."""
    from graphopt.calibration.session import make_session

    feed = next(iter(dataset.batches(batch_size, trimmed=False)), None)
    if feed is None:
        return True
    names = [value.name for value in model.graph.output]

    def outputs(m: onnx.ModelProto) -> list[np.ndarray]:
        session = make_session(m)
        reads = {i.name for i in session.get_inputs()}
        return session.run(names, {k: v for k, v in feed.items() if k in reads})

    after = outputs(quantized)
    if all(np.isfinite(b).all() for b in after if np.issubdtype(b.dtype, np.floating)):
        return True
    return all(not (np.issubdtype(a.dtype, np.floating) and np.any(np.isfinite(a) & ~np.isfinite(b)))
               for a, b in zip(outputs(model), after))


def _quantize(model: onnx.ModelProto, dataset: Dataset, settings: QuantizeSettings,
              kept: list[str]) -> onnx.ModelProto:
    """onnxruntime's static QDQ quantization of a prepared copy of `model`, `kept` nodes left in float."""
    import onnxruntime.quantization as quantization  # after runtime(): a missing onnxruntime reads as one line

    prepared = _prepared(model)
    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    activation = quantization.QuantType.QInt8 if settings.activations == "int8" else quantization.QuantType.QUInt8
    excluded = [node.name for node in prepared.graph.node if node.op_type in settings.exclude and node.name] + kept
    with tempfile.TemporaryDirectory(prefix="graphopt-quantize-") as folder, _Quiet():
        output = Path(folder) / "quantized.onnx"
        try:
            quantization.quantize_static(
                prepared, output, _reader(dataset, prepared, settings.batch_size),
                quant_format=quantization.QuantFormat.QDQ, per_channel=settings.per_channel,
                reduce_range=settings.reduce_range, activation_type=activation,
                weight_type=quantization.QuantType.QInt8, nodes_to_exclude=excluded,
                calibrate_method=methods[settings.calibration],
                extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False})
        except GraphoptError:
            raise
        except Exception as exc:  # the quantizer raises plain exceptions for models it cannot handle
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QuantizeError(f"onnxruntime's quantizer refused the model: {first}") from exc
        quantized = onnx.load(str(output))
    _check_interface(model, quantized)
    return quantized


class _Quiet(logging.Filter):
    """While the quantizer runs: its progress prints go to the debug log, not stdout (where `--json`
    writes), and its advice to run its pre-processing (shape inference, BatchNorm and constant folding)
    is dropped: graphopt's pre-passes did that, so the advice would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "out-of-range for weight" in message:  # per-channel asked of a 1-D weight (a norm's): per-tensor
            log.debug("quantizer: %s", message)
            return False
        return "pre-processing" not in message

    def __enter__(self) -> None:
        self.printed = io.StringIO()
        self.redirect = contextlib.redirect_stdout(self.printed)
        self.redirect.__enter__()
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self)
        self.redirect.__exit__(None, None, None)
        if self.printed.getvalue().strip():
            log.debug("quantizer: %s", self.printed.getvalue().strip())


def _check_interface(model: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """The quantizer keeps graph input and output names; a change would break every caller of the model.

    Graph inputs that are also initializers (every weight, in models of IR version 3) are defaults, not
    part of what callers feed: their float weights become quantized initializers, so those entries go."""
    before = ([s.name for s in input_specs(model)], [v.name for v in model.graph.output])
    after = ([s.name for s in input_specs(quantized)], [v.name for v in quantized.graph.output])
    if before != after:
        raise RuntimeError(f"quantization changed the graph interface: {before} -> {after}")

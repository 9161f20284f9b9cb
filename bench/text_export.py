"""ONNX exports of the transformer benchmark's torch models, with batch and sequence dynamic on every input.

Exporters: `legacy` (torch.onnx.export dynamo=False, opset 17, constant folding), `dynamo` (dynamo=True,
opset 18, onnxscript's optimiser; the sequence axis bounded by `sequence_max` where the model has a position
table) and `legacy+ortopt` (the legacy export of a BERT encoder through onnxruntime's transformers optimizer,
opt_level 0: fusions into com.microsoft Attention, SkipLayerNormalization, BiasGelu, no graph
optimisations); `legacy+int8` (the legacy export quantized by onnxruntime's `quantize_dynamic`, as CPU serving
often ships an encoder: MatMulInteger with int8 weights behind DynamicQuantizeLinear; not in the default set).
Each export is checked against torch on the example in onnxruntime without graph
optimisation (`max_abs_diff`) and saved, so that the CLI can be run on it.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from graphopt.calibration.session import make_session

EXPORTERS = ("legacy", "dynamo", "legacy+ortopt", "legacy+int8")
DEFAULT_EXPORTERS = ("legacy", "dynamo", "legacy+ortopt")


@dataclass
class Exported:
    model: onnx.ModelProto | None
    error: str | None = None  # why there is no model
    max_abs_diff: float | None = None  # onnxruntime against torch on the example
    file: str | None = None


@dataclass(frozen=True)
class Interface:
    output: str  # the output's name
    output_axes: dict[int, str]  # its dynamic axes
    sequence_max: int | None  # the largest sequence the model accepts (a position table), None: any
    bert_heads: int | None = None  # attention heads, for onnxruntime's BERT fusions (None: not a BERT encoder)


def export(module: torch.nn.Module, example: dict[str, np.ndarray], exporter: str,
           interface: Interface) -> onnx.ModelProto:
    """`module` (called with the example's arrays in order, named as its keys) exported by `exporter`."""
    if exporter == "legacy+int8":
        return dynamic_int8(export(module, example, "legacy", interface))
    if exporter == "legacy+ortopt":
        if interface.bert_heads is None:
            raise ValueError("onnxruntime's BERT fusions apply to BERT encoders only")
        return ort_fused(export(module, example, "legacy", interface), interface.bert_heads)
    names, args = list(example), tuple(torch.from_numpy(value) for value in example.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if exporter == "legacy":
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                                  output_names=[interface.output], do_constant_folding=True,
                                  dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names},
                                                interface.output: interface.output_axes})
                return onnx.load(str(path))
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence", max=interface.sequence_max) if interface.sequence_max \
            else torch.export.Dim("sequence")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=18, input_names=names,
                                    output_names=[interface.output], optimize=True, verbose=False,
                                    dynamic_shapes={name: {0: batch, 1: sequence} for name in names})
        return program.model_proto


def dynamic_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` quantized by onnxruntime's `quantize_dynamic` (its defaults: int8 weights per tensor)."""
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, str(source))
        quantize_dynamic(str(source), str(target))
        return onnx.load(str(target))


def ort_fused(model: onnx.ModelProto, heads: int) -> onnx.ModelProto:
    """onnxruntime's transformers optimizer on a BERT export (fusions only, opt_level 0; hidden size found)."""
    from onnxruntime.transformers.optimizer import optimize_model
    fused = optimize_model(model, model_type="bert", num_heads=heads, hidden_size=0, opt_level=0).model
    if not any(entry.domain == "com.microsoft" for entry in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the optimizer leaves it out
    return fused


def exported_models(module: torch.nn.Module, example: dict[str, np.ndarray], exporters: list[str],
                    interface: Interface, folder: Path, stem: str) -> dict[str, Exported]:
    """Each exporter's model, checked against torch and saved as folder/STEM_EXPORTER.onnx, or the error that
    stopped it (an exporter that fails is a result to report)."""
    with torch.no_grad():
        expected = module(*(torch.from_numpy(value) for value in example.values())).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, Exported] = {}
    for exporter in exporters:
        try:
            model = export(module, example, exporter, interface)
            got = make_session(model).run(None, example)[0]
            path = folder / f"{stem}_{exporter.replace('+', '_')}.onnx"
            onnx.save(model, str(path))
            found[exporter] = Exported(model, max_abs_diff=float(np.abs(got - expected).max()), file=str(path))
        except Exception as error:  # noqa: BLE001
            text = str(error).strip()
            found[exporter] = Exported(None, error=f"{type(error).__name__}: {text.splitlines()[0] if text else ''}")
    return found

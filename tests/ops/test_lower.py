"""graphopt.RMSNorm over the last axis is written out as the pattern onnxruntime fuses into one
SimplifiedLayerNormalization kernel, with the same values (a pruned width keeps the original divisor); other
axes and unknown widths keep the function; optimize's written models carry the fusible form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.ops.library import ensure_functions
from graphopt.ops.lower import lower_rms_norms
from graphopt.ops.rms_norm import make_rms_norm_node, rms_norm_reference
from tests.conftest import run_ort


def _norm_model(shape: list[int | str], channels: int, axis: int, opset: int) -> onnx.ModelProto:
    """graphopt.RMSNorm over `axis`, then a gain per entry of that axis (one gain for all where it is not fixed)."""
    node = make_rms_norm_node("x", "n", channels, eps=1e-3, name="norm", axis=axis)
    gain = helper.make_node("Mul", ["n", "g"], ["y"], name="gain")
    width = shape[axis] if isinstance(shape[axis], int) else 1
    gains = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, width).astype(np.float32), "g")
    gains.dims[:] = [width] + [1] * (len(shape) - 1 - axis % len(shape))
    graph = helper.make_graph([node, gain], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [gains])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ensure_functions(model)
    return model


def _fused_ops(model: onnx.ModelProto, path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("channels", [24, 40], ids=["whole", "pruned"])
def test_a_last_axis_norm_becomes_one_fused_kernel_with_the_same_values(channels: int, opset: int, tmp_path) -> None:
    model = _norm_model(["batch", "tokens", 24], channels, -1, opset)
    x = np.random.default_rng(0).standard_normal((3, 7, 24)).astype(np.float32)
    before = run_ort(model, {"x": x})["y"]
    lowered, count = lower_rms_norms(model)
    assert count == 1 and not lowered.functions and all(o.domain != "graphopt" for o in lowered.opset_import)
    onnx.checker.check_model(lowered, full_check=True)
    after = run_ort(lowered, {"x": x})["y"]
    want = rms_norm_reference(x, channels, 1e-3, axis=-1) * np.linspace(0.5, 1.5, 24)
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    # the model's own gain Mul takes the factor sqrt(C / d) and is the fused kernel's scale: no Mul is added
    assert [n.op_type for n in lowered.graph.node].count("Mul") == 1
    gain = next(onnx.numpy_helper.to_array(t) for t in lowered.graph.initializer if t.name == "g")
    np.testing.assert_allclose(gain, np.linspace(0.5, 1.5, 24) * np.sqrt(channels / 24), rtol=1e-6)
    assert _fused_ops(lowered, tmp_path / "fused.onnx") == ["SimplifiedLayerNormalization"]


def test_a_channel_axis_norm_and_an_unknown_width_keep_the_function() -> None:
    image = _norm_model(["batch", 6, 5, 5], 6, 1, 17)
    assert lower_rms_norms(image)[1] == 0 and image.functions
    unknown = _norm_model(["batch", "tokens", "width"], 6, -1, 17)
    assert lower_rms_norms(unknown)[1] == 0 and unknown.functions


def test_a_norm_without_a_gain_of_its_own_gets_one() -> None:
    """A gain shared with another reader (or none at all) is not touched: the norm writes its own Mul."""
    model = _norm_model(["batch", "tokens", 24], 40, -1, 17)
    model.graph.node.append(helper.make_node("Mul", ["x", "g"], ["z"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "tokens", 24]))
    x = np.random.default_rng(1).standard_normal((2, 3, 24)).astype(np.float32)
    before = run_ort(model, {"x": x})
    lowered, count = lower_rms_norms(model)
    assert count == 1 and [n.op_type for n in lowered.graph.node].count("Mul") == 3
    after = run_ort(lowered, {"x": x})
    for name in ("y", "z"):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-6)

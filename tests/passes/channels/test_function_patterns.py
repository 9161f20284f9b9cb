"""Decomposed RMS norms become graphopt.RMSNorm where the model's opset allows the function's body, and stay
decomposed below it (PaddleOCR's PP-OCRv6 recogniser is exported at opset 11) without breaking any method.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir.graph import import_graph
from graphopt.ops.functions import MIN_OPSET
from graphopt.passes.channels.function_patterns import canonicalise


def rms_mlp(opset: int) -> onnx.ModelProto:
    """MatMul -> x / sqrt(mean(x^2) + eps) -> Relu -> MatMul, then a second hidden layer no norm touches."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (12, 16)), ("w2", (16, 16)), ("w3", (16, 4)))]
    inits += [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    mean = (helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1) if opset < 18 else
            helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1))
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Pow", ["h", "two"], ["sq"]), mean,
             helper.make_node("Add", ["ms", "eps"], ["shifted"]), helper.make_node("Sqrt", ["shifted"], ["rms"]),
             helper.make_node("Div", ["h", "rms"], ["normed"]), helper.make_node("Relu", ["normed"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["g"]), helper.make_node("Relu", ["g"], ["b"]),
             helper.make_node("MatMul", ["b", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "rms_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
def test_recognised_only_where_the_opset_allows(opset: int) -> None:
    graph = import_graph(onnx.shape_inference.infer_shapes(rms_mlp(opset)))  # the matcher reads the channel count
    assert canonicalise(graph) == ((1, 0) if opset >= MIN_OPSET else (0, 0))
    assert any(node.op == "RMSNorm" for node in graph.nodes) == (opset >= MIN_OPSET)


@pytest.mark.parametrize("method", ["magnitude", "snp", "cob"])
@pytest.mark.parametrize("opset", [11, 17])
def test_methods_run_below_the_function_opset(method: str, opset: int) -> None:
    """Below MIN_OPSET the norm's group is refused with the reason, the other hidden layer still prunes."""
    model = rms_mlp(opset)
    calib = {"x": np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)}
    result = graphopt.optimize(model, method=method, target_macs=0.8, calib=calib, round_to=1)
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.version for o in result.model.opset_import if o.domain == ""] == [opset]
    record = result.report["passes"][-1]
    if method == "cob":
        return  # rotations: Relu is not equivariant, nothing to rotate; what matters is that it ran
    kept = {i.name: list(i.dims) for i in result.model.graph.initializer}
    if opset < MIN_OPSET:  # the norm's group stays whole, the budget goes to the other hidden layer
        assert kept["w1"] == [12, 16] and kept["w3"][0] < 16
        assert any("statistic over them" in reason for reason in record["skipped"]), record["skipped"]
    else:  # recognised: graphopt.RMSNorm passes its channels (written back out as standard ops), its group prunes
        assert kept["w1"][1] < 16

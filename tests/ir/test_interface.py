"""The declared interface survives: graph inputs' and outputs' dims stay as the model declares them,
unless a pass changed a fixed size or a rank, which the report lists."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.ir import graph as ir
from graphopt.ir.interface import interface_changes, keep_declared
from graphopt.ir.io import load_model
from tests.conftest import assert_equivalent, init, random_inputs, tiny, weights


def _dims(value: onnx.ValueInfoProto) -> list | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in value.type.tensor_type.shape.dim]


def _io_model(inputs: list, outputs: list) -> onnx.ModelProto:
    def value(name: str, dims: list | None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
    return helper.make_model(helper.make_graph([], "g", [value(*i) for i in inputs], [value(*o) for o in outputs]))


@pytest.mark.parametrize("declared,found,kept", [
    (["N", "Concatoutput_dim_1", None], ["N", 84, 8400], ["N", "Concatoutput_dim_1", None]),
    (["N", 84], ["N", "unk__3"], ["N", 84]),
    (["N", 84, 8400], ["N", 80, 8400], ["N", 80, 8400]),  # a pass changed a fixed size: kept, reported
    (["N", 84], ["N", 84, 1], ["N", 84, 1]),  # a pass changed the rank
    (None, ["N", 84], ["N", 84]),  # declared without a shape: the inferred one is filled in, not a change
    ([], [], []),  # a scalar stays a declared scalar
])
def test_keep_declared_axis_by_axis(declared, found, kept):
    template = _io_model([("x", declared)], [("y", declared)])
    model = _io_model([("x", found)], [("y", found)])
    keep_declared(model, template)
    assert _dims(model.graph.input[0]) == kept and _dims(model.graph.output[0]) == kept
    changed = [] if kept == declared or declared is None else [{"role": role, "name": name, "before": declared, "after": kept}
                                           for role, name in (("input", "x"), ("output", "y"))]
    assert interface_changes(template, model) == changed


def _yolo_like() -> onnx.ModelProto:
    """Two heads concatenated into an output whose dims a torch export names `Concatoutput_dim_1` and
    leaves unnamed, although shape inference can prove them (8 and 64)."""
    return tiny("""c = Conv <pads = [1, 1, 1, 1]> (x, w1)
                   r = Relu (c)
                   a = Conv (r, w2)
                   b = Conv (r, w3)
                   cat = Concat <axis = 1> (a, b)
                   y = Reshape (cat, shape)""",
                inputs="float[N, 3, 8, 8] x", outputs="float[N, Concatoutput_dim_1, ?] y",
                inits=", ".join([init("w1", weights(8, 3, 3, 3)), init("w2", weights(4, 8, 1, 1, seed=1)),
                                 init("w3", weights(4, 8, 1, 1, seed=2)),
                                 init("shape", np.array([0, 8, -1]), dtype="int64")]))


def test_export_does_not_write_inferred_sizes_into_the_interface():
    model = _yolo_like()
    inferred = onnx.shape_inference.infer_shapes(model)
    assert _dims(inferred.graph.output[0]) == ["N", 8, 64]  # what inference alone would write
    exported = ir.export_model(ir.import_graph(model), model)
    assert _dims(exported.graph.output[0]) == ["N", "Concatoutput_dim_1", None]


@pytest.mark.parametrize("method", ["none", "magnitude", "snp"])
def test_symbolic_output_dims_survive_every_method(tmp_path, method):
    model = _yolo_like()
    options = {} if method == "none" else {"target_macs": 0.6}
    calib = {"x": weights(16, 3, 8, 8, seed=3)} if method == "snp" else None
    result = graphopt.optimize(model, method=method, calib=calib, output=tmp_path / "out.onnx", **options)
    saved = load_model(tmp_path / "out.onnx")
    for written in (result.model, saved):
        assert _dims(written.graph.output[0]) == ["N", "Concatoutput_dim_1", None]
        assert _dims(written.graph.input[0]) == ["N", 3, 8, 8]
    assert result.report["interface_changes"] == []
    if method != "none":
        assert result.report["macs_ratio"] < 0.7
    else:
        assert_equivalent(model, saved, random_inputs(model, batch=3))

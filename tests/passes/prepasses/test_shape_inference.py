"""shape_inference: intermediate tensors get dtypes and shapes; nothing is computed differently."""

from __future__ import annotations

import numpy as np

from graphopt.ir import graph as ir
from graphopt.passes import PassContext, get_pass
from tests.conftest import assert_equivalent, init, random_inputs, run_pass, tiny, weights

MODEL_BODY = """c = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w)
                f = Flatten (c)
                y = MatMul (f, m)"""


def _model():
    return tiny(MODEL_BODY, inputs="float[N, 3, 8, 8] x", outputs="float[N, 5] y",
                inits=", ".join([init("w", weights(4, 3, 3, 3)), init("m", weights(64, 5))]))


def test_intermediate_shapes_are_annotated():
    model = _model()
    graph = ir.import_graph(model)
    result = get_pass("shape_inference").run(graph, PassContext(template=model, progress=False))
    tensors = graph.tensors()
    assert not result.modified and result.stats["tensors_typed"] >= 3
    assert tensors["c"].shape == ["N", 4, 4, 4] and tensors["c"].dtype == np.float32
    assert tensors["f"].shape == ["N", 64]


def test_exported_model_records_shapes_and_computes_the_same():
    model = _model()
    typed, result = run_pass(model, "shape_inference")
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in typed.graph.value_info}
    assert shapes["c"] == ["N", 4, 4, 4] and shapes["f"] == ["N", 64]
    assert_equivalent(model, typed, random_inputs(model))


def test_the_passes_see_inferred_output_dims_but_the_export_keeps_the_declared_ones():
    model = tiny(MODEL_BODY, inputs="float[N, 3, 8, 8] x", outputs="float[N, MatMuloutput_dim_1] y",
                 inits=", ".join([init("w", weights(4, 3, 3, 3)), init("m", weights(64, 5))]))
    graph = ir.import_graph(model)
    get_pass("shape_inference").run(graph, PassContext(template=model, progress=False))
    assert graph.outputs[0].shape == ["N", 5]
    exported = ir.export_model(graph, model)
    assert [d.dim_param or d.dim_value for d in exported.graph.output[0].type.tensor_type.shape.dim] == \
        ["N", "MatMuloutput_dim_1"]
    assert_equivalent(model, exported, random_inputs(model))

"""fold_batchnorm: exact folds into Conv/ConvTranspose/Gemm/MatMul, declines with reasons, shared weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import (assert_equivalent, bn_inputs, bn_params, init, op_types, random_inputs, run_pass,
                            run_passes, tiny, weights)

BN = bn_inputs("bn")

# (id, body, inputs, outputs, initializers) -- the BatchNormalization output `y` is the graph output
CONV_CASES = [
    ("conv", "c = Conv <pads = [1, 1, 1, 1]> (x, w)", "float[N, 4, 6, 6] x", "float[N, 6, 6, 6] y",
     [init("w", weights(6, 4, 3, 3))], 6),
    ("conv_bias_strided", "c = Conv <strides = [2, 2]> (x, w, b)", "float[N, 4, 7, 7] x", "float[N, 6, 3, 3] y",
     [init("w", weights(6, 4, 3, 3)), init("b", weights(6, seed=3))], 6),
    ("conv_groups", "c = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w, b)", "float[N, 4, 6, 6] x",
     "float[N, 6, 6, 6] y", [init("w", weights(6, 2, 3, 3)), init("b", weights(6, seed=3))], 6),
    ("depthwise", "c = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w)", "float[N, 4, 6, 6] x", "float[N, 4, 6, 6] y",
     [init("w", weights(4, 1, 3, 3))], 4),
    ("conv1d", "c = Conv (x, w, b)", "float[N, 4, 9] x", "float[N, 6, 7] y",
     [init("w", weights(6, 4, 3)), init("b", weights(6, seed=3))], 6),
    ("convtranspose", "c = ConvTranspose <strides = [2, 2]> (x, w)", "float[N, 4, 5, 5] x", "float[N, 6, 10, 10] y",
     [init("w", weights(4, 6, 2, 2))], 6),
    ("convtranspose_groups_bias", "c = ConvTranspose <group = 2, strides = [2, 2]> (x, w, b)", "float[N, 4, 5, 5] x",
     "float[N, 6, 10, 10] y", [init("w", weights(4, 3, 2, 2)), init("b", weights(6, seed=3))], 6),
    ("convtranspose_depthwise", "c = ConvTranspose <group = 4, pads = [1, 1, 1, 1]> (x, w)", "float[N, 4, 5, 5] x",
     "float[N, 8, 5, 5] y", [init("w", weights(4, 2, 3, 3))], 8),
]


def _bn_model(body: str, inputs: str, outputs: str, inits: list[str], channels: int, opset: int = 17,
              bn_attrs: str = "") -> onnx.ModelProto:
    return tiny(f"{body}\n y = BatchNormalization {bn_attrs} (c, {BN})", inputs=inputs, outputs=outputs,
                inits=", ".join([*inits, bn_params("bn", channels)]), opset=opset)


@pytest.mark.parametrize("body,inputs,outputs,inits,channels", [c[1:] for c in CONV_CASES],
                         ids=[c[0] for c in CONV_CASES])
def test_conv_family_folds_exactly(body, inputs, outputs, inits, channels):
    model = _bn_model(body, inputs, outputs, inits, channels, bn_attrs="<epsilon = 0.01>")
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == [op_types(model)[0]]
    assert folded.graph.node[0].output[0] == "y"
    assert len(folded.graph.node[0].input) == 3  # a bias was created or updated
    assert result.modified and result.stats["folded"] == 1 and not result.skipped
    assert_equivalent(model, folded, random_inputs(model, batch=3))


@pytest.mark.parametrize("opset", [11, 14, 15])
def test_fold_across_batchnorm_versions(opset):
    model = _bn_model(*CONV_CASES[0][1:], opset=opset)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["Conv"] and result.stats["folded"] == 1
    assert_equivalent(model, folded, random_inputs(model))


GEMM_CASES = [  # (id, attrs, weight shape, C initializer or None)
    ("transB0_noC", "", (8, 5), None),
    ("transB1_noC", "<transB = 1>", (5, 8), None),
    ("transB0_C", "", (8, 5), (5,)),
    ("transB1_C_row", "<transB = 1, alpha = 0.5, beta = 2.0>", (5, 8), (1, 5)),
    ("transB1_C_scalar", "<transB = 1, beta = 0.25>", (5, 8), (1,)),
]


@pytest.mark.parametrize("attrs,w_shape,c_shape", [c[1:] for c in GEMM_CASES], ids=[c[0] for c in GEMM_CASES])
def test_gemm_folds_exactly(attrs, w_shape, c_shape):
    inits = [init("w", weights(*w_shape))]
    operands = "x, w"
    if c_shape is not None:
        inits.append(init("c_bias", weights(*c_shape, seed=5)))
        operands += ", c_bias"
    model = _bn_model(f"c = Gemm {attrs} ({operands})", "float[N, 8] x", "float[N, 5] y", inits, 5)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["Gemm"] and result.stats["folded"] == 1
    gemm = folded.graph.node[0]
    assert len(gemm.input) == 3
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}.get("beta", 1.0) == 1.0
    assert_equivalent(model, folded, random_inputs(model, batch=4))


def test_gemm_with_empty_optional_c_folds():
    model = _bn_model('c = Gemm <transB = 1> (x, w, "")', "float[N, 8] x", "float[N, 5] y",
                      [init("w", weights(5, 8))], 5)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["Gemm"] and list(folded.graph.node[0].input)[2] != ""
    assert_equivalent(model, folded, random_inputs(model))


@pytest.mark.parametrize("c_shape", [(3, 4), (4, 1)], ids=["matrix", "column"])
def test_gemm_with_non_row_bias_is_left_with_reason(c_shape):
    # C of shape [M, N] or [M, 1] (M == N == 4 here) does not act per output column
    model = _bn_model("c = Gemm <transB = 1> (x, w, c_bias)", f"float[{c_shape[0]}, 8] x", f"float[{c_shape[0]}, 4] y",
                      [init("w", weights(4, 8)), init("c_bias", weights(*c_shape, seed=5))], 4)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["Gemm", "BatchNormalization"]
    assert not result.modified and result.stats["folded"] == 0
    assert len(result.skipped) == 1 and "Gemm bias C" in result.skipped[0]
    np.testing.assert_array_equal(numpy_helper.to_array(_initializer(folded, "w")), weights(4, 8))
    assert_equivalent(model, folded, random_inputs(model))


def test_matmul_rank2_folds_into_matmul_and_add():
    model = _bn_model("c = MatMul (x, w)", "float[N, 8] x", "float[N, 5] y", [init("w", weights(8, 5))], 5)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["MatMul", "Add"] and result.stats["folded"] == 1
    assert folded.graph.node[-1].output[0] == "y"
    assert_equivalent(model, folded, random_inputs(model, batch=5))


def test_matmul_rank2_known_only_through_shape_inference():
    # Flatten of a dynamic input: the model records no intermediate shapes, the pass infers rank 2
    model = _bn_model("f = Flatten (x)\n c = MatMul (f, w)", "float[N, 2, 4] x", "float[N, 5] y",
                      [init("w", weights(8, 5))], 5)
    assert not model.graph.value_info
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["Flatten", "MatMul", "Add"] and result.stats["folded"] == 1
    assert folded.graph.output == model.graph.output  # inferred shapes do not rewrite the interface
    assert_equivalent(model, folded, random_inputs(model))


def test_matmul_rank3_is_left_with_reason():
    # BN normalises axis 1, which is not MatMul's output column axis for a rank-3 product
    model = _bn_model("c = MatMul (x, w)", "float[N, 5, 8] x", "float[N, 5, 5] y", [init("w", weights(8, 5))], 5)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["MatMul", "BatchNormalization"] and not result.modified
    assert result.skipped and "rank 2" in result.skipped[0]
    assert_equivalent(model, folded, random_inputs(model))


NEGATIVE_CASES = [  # (id, body, inputs, extra initializers, expected reason fragment)
    ("after_relu", "c = Relu (x)", "float[N, 4, 6, 6] x", [], "produced by Relu"),
    ("graph_input", "c = Identity (x)\n", "float[N, 4, 6, 6] x", [], "produced by Identity"),
    ("conv_output_read_twice", "c = Conv <pads = [1, 1, 1, 1]> (x, w)\n r = Relu (c)\n z = Add (r, c)",
     "float[N, 4, 6, 6] x", [init("w", weights(4, 4, 3, 3))], "read elsewhere"),
    ("weight_not_constant", "c = Conv <pads = [1, 1, 1, 1]> (x, w)", "float[N, 4, 6, 6] x, float[4, 4, 3, 3] w",
     [], "weight is not constant"),
]


@pytest.mark.parametrize("body,inputs,inits,reason", [c[1:] for c in NEGATIVE_CASES],
                         ids=[c[0] for c in NEGATIVE_CASES])
def test_unfoldable_batchnorm_is_left_with_reason(body, inputs, inits, reason):
    model = _bn_model(body, inputs, "float[N, 4, 6, 6] y", inits, 4)
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded).count("BatchNormalization") == 1
    assert not result.modified and result.stats["folded"] == 0
    assert len(result.skipped) == 1 and reason in result.skipped[0]
    assert_equivalent(model, folded, random_inputs(model))


def test_batchnorm_with_runtime_scale_is_left_with_reason():
    model = tiny("c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = BatchNormalization (c, scale, bn_bias, bn_mean, bn_var)",
                 inputs="float[N, 4, 6, 6] x, float[4] scale", outputs="float[N, 4, 6, 6] y",
                 inits=", ".join([init("w", weights(4, 4, 3, 3)), bn_params("bn", 4)]))
    folded, result = run_pass(model, "fold_batchnorm")
    assert op_types(folded) == ["Conv", "BatchNormalization"]
    assert result.skipped and "not constant" in result.skipped[0]


def test_training_mode_batchnorm_is_left_with_reason():
    model = tiny(f"c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y, m, v = BatchNormalization <training_mode = 1> (c, {BN})",
                 inputs="float[N, 4, 6, 6] x", outputs="float[N, 4, 6, 6] y, float[4] m, float[4] v",
                 inits=", ".join([init("w", weights(4, 4, 3, 3)), bn_params("bn", 4)]))
    folded, result = run_pass(model, "fold_batchnorm")
    assert "BatchNormalization" in op_types(folded) and not result.modified
    assert result.skipped and "training-mode" in result.skipped[0]


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_shared_weight_is_copied_not_edited():
    # Conv A -> BN and Conv B share w and b; B's output must not change and w/b keep their values
    model = tiny(f"""a = Conv <pads = [1, 1, 1, 1]> (x, w, b)
                     y = BatchNormalization (a, {BN})
                     z = Conv <pads = [1, 1, 1, 1]> (x, w, b)""",
                 inputs="float[N, 4, 6, 6] x", outputs="float[N, 4, 6, 6] y, float[N, 4, 6, 6] z",
                 inits=", ".join([init("w", weights(4, 4, 3, 3)), init("b", weights(4, seed=2)), bn_params("bn", 4)]))
    folded, result = run_pass(model, "fold_batchnorm")
    assert result.stats["folded"] == 1 and op_types(folded) == ["Conv", "Conv"]
    conv_b = next(n for n in folded.graph.node if n.output[0] == "z")
    conv_a = next(n for n in folded.graph.node if n.output[0] == "y")
    assert list(conv_b.input) == ["x", "w", "b"]
    assert conv_a.input[1] != "w" and conv_a.input[2] != "b"
    np.testing.assert_array_equal(numpy_helper.to_array(_initializer(folded, "w")), weights(4, 4, 3, 3))
    np.testing.assert_array_equal(numpy_helper.to_array(_initializer(folded, "b")), weights(4, seed=2))
    assert_equivalent(model, folded, random_inputs(model))


def test_weight_shared_with_graph_output_path_via_gemm():
    # the Gemm weight is also read by a MatMul: folding must write a new initializer
    model = tiny(f"""g = Gemm <transB = 1> (x, w)
                     y = BatchNormalization (g, {BN})
                     wt = Transpose (w)
                     z = MatMul (x, wt)""",
                 inputs="float[N, 8] x", outputs="float[N, 4] y, float[N, 4] z",
                 inits=", ".join([init("w", weights(4, 8)), bn_params("bn", 4)]))
    folded, result = run_pass(model, "fold_batchnorm")
    assert result.stats["folded"] == 1
    np.testing.assert_array_equal(numpy_helper.to_array(_initializer(folded, "w")), weights(4, 8))
    assert_equivalent(model, folded, random_inputs(model))


def test_fold_is_idempotent():
    model = _bn_model(*CONV_CASES[6][1:])
    once, first = run_pass(model, "fold_batchnorm")
    twice, second = run_pass(once, "fold_batchnorm")
    assert first.modified and not second.modified and second.stats["folded"] == 0
    assert twice.graph.node == once.graph.node
    assert_equivalent(model, twice, random_inputs(model))


def test_chained_batchnorms_sharing_parameters_both_fold():
    model = tiny(f"""c = Conv <pads = [1, 1, 1, 1]> (x, w)
                     d = BatchNormalization (c, {BN})
                     y = BatchNormalization (d, {BN})""",
                 inputs="float[N, 4, 6, 6] x", outputs="float[N, 4, 6, 6] y",
                 inits=", ".join([init("w", weights(4, 4, 3, 3)), bn_params("bn", 4)]))
    folded, result = run_passes(model, "fold_batchnorm", "fold_batchnorm")
    assert op_types(folded) == ["Conv"]
    assert [r.result.stats["folded"] for r in result] == [2, 0]
    assert_equivalent(model, folded, random_inputs(model))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["conv_stack", "linear_stack"])
def test_torch_exported_batchnorms_fold(torch_export, name, exporter):
    model = torch_export(name, exporter)
    assert "BatchNormalization" in op_types(model)
    folded, result = run_pass(model, "fold_batchnorm")
    assert "BatchNormalization" not in op_types(folded)
    assert result.stats["folded"] == op_types(model).count("BatchNormalization")
    assert_equivalent(model, folded, random_inputs(model, batch=3))

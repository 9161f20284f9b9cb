"""normalize_constants: Constant nodes and constant ConstantOfShape/Identity/Cast chains become initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import assert_equivalent, init, op_types, random_inputs, run_pass, tiny, weights


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _text(values: np.ndarray) -> str:
    return ", ".join(repr(v.item()) for v in values.reshape(-1))


def test_constant_node_weight_becomes_initializer():
    w = weights(4, 3, 3, 3)
    model = tiny(f"""w = Constant <value = float[4, 3, 3, 3] {{{_text(w)}}}> ()
                     y = Conv <pads = [1, 1, 1, 1]> (x, w)""")
    normalized, result = run_pass(model, "normalize_constants")
    assert op_types(normalized) == ["Conv"]
    assert result.modified and result.stats == {"Constant_folded": 1}
    np.testing.assert_array_equal(_initializers(normalized)["w"], w)
    assert_equivalent(model, normalized, random_inputs(model))


@pytest.mark.parametrize("attr,expected", [
    ("value_float = 2.5", np.array(2.5, np.float32)),
    ("value_floats = [1.0, -2.0, 0.5]", np.array([1.0, -2.0, 0.5], np.float32)),
    ("value_int = 7", np.array(7, np.int64)),
    ("value_ints = [3, 1, 4]", np.array([3, 1, 4], np.int64)),
])
def test_scalar_attribute_constants(attr, expected):
    op = "Add" if expected.dtype == np.float32 else "Mul"
    x = "float[N, 3] x" if expected.dtype == np.float32 else "int64[N, 3] x"
    y = "float[N, 3] y" if expected.dtype == np.float32 else "int64[N, 3] y"
    model = tiny(f"k = Constant <{attr}> ()\n y = {op} (x, k)", inputs=x, outputs=y)
    normalized, result = run_pass(model, "normalize_constants")
    value = _initializers(normalized)["k"]
    assert value.dtype == expected.dtype and value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)
    assert op_types(normalized) == [op]
    assert_equivalent(model, normalized, random_inputs(model))


def test_constant_of_shape_and_identity_cast_chains():
    model = tiny("""shape = Constant <value = int64[2] {3, 4}> ()
                    fill = ConstantOfShape <value = float[1] {0.25}> (shape)
                    zeros = ConstantOfShape (shape)
                    a = Identity (w)
                    b = Identity (a)
                    h = Cast <to = 10> (b)
                    c = Cast <to = 1> (h)
                    s = Add (fill, c)
                    t = Add (s, zeros)
                    y = MatMul (x, t)""",
                 inputs="float[N, 3] x", outputs="float[N, 4] y", inits=init("w", weights(3, 4)))
    normalized, result = run_pass(model, "normalize_constants")
    assert op_types(normalized) == ["Add", "Add", "MatMul"]
    assert result.stats == {"Constant_folded": 1, "ConstantOfShape_folded": 2, "Identity_folded": 2, "Cast_folded": 2}
    values = _initializers(normalized)
    np.testing.assert_array_equal(values["fill"], np.full((3, 4), 0.25, np.float32))
    assert values["zeros"].dtype == np.float32 and not values["zeros"].any()
    np.testing.assert_array_equal(values["c"], weights(3, 4).astype(np.float16).astype(np.float32))
    assert_equivalent(model, normalized, random_inputs(model))


def test_int64_constant_of_shape_keeps_dtype():
    model = tiny("""shape = Constant <value = int64[1] {3}> ()
                    k = ConstantOfShape <value = int64[1] {5}> (shape)
                    y = Add (x, k)""", inputs="int64[N, 3] x", outputs="int64[N, 3] y")
    normalized, _ = run_pass(model, "normalize_constants")
    value = _initializers(normalized)["k"]
    assert value.dtype == np.int64 and value.tolist() == [5, 5, 5]
    assert_equivalent(model, normalized, random_inputs(model))


def test_non_constant_and_graph_output_nodes_are_left_alone():
    # Identity of a graph input is not constant; a Constant that is a graph output keeps its node
    model = tiny("""i = Identity (x)
                    y = Relu (i)
                    k = Constant <value = float[2] {1.0, 2.0}> ()""",
                 inputs="float[N, 3] x", outputs="float[N, 3] y, float[2] k")
    normalized, result = run_pass(model, "normalize_constants")
    assert not result.modified and result.stats == {} and result.skipped == []
    assert op_types(normalized) == op_types(model)
    assert_equivalent(model, normalized, random_inputs(model))


def test_string_constant_is_left_with_reason():
    model = tiny("""k = Constant <value_strings = ["a", "b"]> ()
                    y = Identity (x)
                    z = Identity (k)""", inputs="float[N, 3] x", outputs="float[N, 3] y, string[2] z")
    normalized, result = run_pass(model, "normalize_constants")
    assert "Constant" in op_types(normalized) and not result.modified
    assert len(result.skipped) == 1 and "value_strings" in result.skipped[0]
    assert_equivalent(model, normalized, random_inputs(model))


def test_constant_captured_by_if_branch_is_moved_into_it():
    # the main-graph Constant `k` is read only inside the branches; subgraph Constants stay untouched
    model = tiny("""k = Constant <value = float[1] {2.0}> ()
                    s = ReduceSum <keepdims = 0> (x)
                    zero = Constant <value = float {0.0}> ()
                    cond = Greater (s, zero)
                    y = If (cond) <then_branch = then_g () => (float[N, 3] t) {
                          three = Constant <value = float[1] {3.0}> ()
                          u = Mul (x, three)
                          t = Mul (u, k)
                        }, else_branch = else_g () => (float[N, 3] e) {
                          e = Sub (x, k)
                        }>""", inputs="float[N, 3] x", outputs="float[N, 3] y")
    normalized, result = run_pass(model, "normalize_constants")
    assert op_types(normalized) == ["ReduceSum", "Greater", "If"]
    then_branch = normalized.graph.node[-1].attribute[0].g
    assert [n.op_type for n in then_branch.node] == ["Constant", "Mul", "Mul"]
    positive = {"x": np.abs(random_inputs(model)["x"])}
    assert_equivalent(model, normalized, positive)
    assert_equivalent(model, normalized, {"x": -positive["x"]})


def test_normalize_is_idempotent():
    w = weights(4, 3, 1, 1)
    model = tiny(f"""w = Constant <value = float[4, 3, 1, 1] {{{_text(w)}}}> ()
                     v = Identity (w)
                     y = Conv (x, v)""")
    once, first = run_pass(model, "normalize_constants")
    _, second = run_pass(once, "normalize_constants")
    assert first.modified and not second.modified and second.stats == {}
    assert_equivalent(model, once, random_inputs(model))


def test_cast_like_a_typed_input_becomes_an_initializer():
    # the dynamo exporter writes a zero bias as CastLike(0.0, input): only the input's dtype matters
    model = tiny("""zero = Constant <value = float {0.25}> ()
                    k = CastLike (zero, x)
                    y = Add (x, k)""", inputs="double[N, 3] x", outputs="double[N, 3] y")
    normalized, result = run_pass(model, "normalize_constants")
    assert op_types(normalized) == ["Add"] and result.stats == {"Constant_folded": 1, "CastLike_folded": 1}
    value = _initializers(normalized)["k"]
    assert value.dtype == np.float64 and value == 0.25
    assert_equivalent(model, normalized, random_inputs(model))


def test_cast_like_an_untyped_tensor_is_left_alone():
    model = tiny("""r = Relu (x)
                    k = CastLike (c, r)
                    y = Add (r, k)""", inputs="float[N, 3] x", outputs="float[N, 3] y", inits="float c = {1.0}")
    normalized, result = run_pass(model, "normalize_constants")
    assert op_types(normalized) == ["Relu", "CastLike", "Add"] and not result.modified

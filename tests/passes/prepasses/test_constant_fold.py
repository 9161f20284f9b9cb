"""constant_fold: nodes with all-constant inputs become initializers; random ops and subgraphs stay."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import (assert_equivalent, init, op_types, random_inputs, run_pass, session, tiny,
                            weights)


def test_constant_arithmetic_is_folded_into_one_initializer():
    model = tiny("""s = Add (a, b)
                    t = Mul (s, a)
                    u = Transpose <perm = [1, 0]> (t)
                    y = MatMul (x, u)""", inputs="float[N, 3] x", outputs="float[N, 4] y",
                 inits=", ".join([init("a", weights(4, 3)), init("b", weights(4, 3, seed=1))]))
    folded, result = run_pass(model, "constant_fold")
    assert op_types(folded) == ["MatMul"]
    assert result.modified and result.stats == {"nodes_folded": 3}
    (weight,) = [t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1]]
    expected = ((weights(4, 3) + weights(4, 3, seed=1)) * weights(4, 3)).T
    np.testing.assert_allclose(numpy_helper.to_array(weight), expected, rtol=1e-6)
    assert_equivalent(model, folded, random_inputs(model))


def test_static_shape_arithmetic_is_folded():
    # Reshape to [N, 12] where 12 comes from Shape(x)[1] * Shape(x)[2] of a static-tailed input
    model = tiny("""shape = Shape (x)
                    idx = Constant <value = int64[2] {1, 2}> ()
                    tail = Gather (shape, idx)
                    prod = ReduceProd <keepdims = 1> (tail)
                    minus = Constant <value = int64[1] {-1}> ()
                    target = Concat <axis = 0> (minus, prod)
                    y = Reshape (x, target)""", inputs="float[N, 3, 4] x", outputs="float[N, 12] y")
    folded, result = run_pass(model, "constant_fold")
    assert op_types(folded) == ["Reshape"] and result.modified
    assert_equivalent(model, folded, random_inputs(model, batch=5))


def test_random_ops_are_not_frozen():
    model = tiny("""r = RandomUniform <shape = [1, 3]> ()
                    n = RandomNormalLike (w)
                    s = Add (r, n)
                    y = Add (x, s)""", inputs="float[N, 3] x", outputs="float[N, 3] y",
                 inits=init("w", weights(1, 3)))
    folded, result = run_pass(model, "constant_fold")
    assert op_types(folded) == op_types(model)
    assert not result.modified and result.stats == {"nodes_folded": 0}
    runner, feeds = session(folded), random_inputs(model)
    assert not np.array_equal(*(runner.run(["y"], feeds)[0] for _ in range(2)))  # fresh draws per run


def test_nothing_constant_is_left_exactly_as_is():
    model = tiny("""r = Relu (x)
                    s = Sigmoid (x)
                    y = Mul (r, s)""", inputs="float[N, 3] x", outputs="float[N, 3] y")
    folded, result = run_pass(model, "constant_fold")
    assert not result.modified and result.stats == {"nodes_folded": 0}
    assert [(n.op_type, list(n.input)) for n in folded.graph.node] == \
        [(n.op_type, list(n.input)) for n in model.graph.node]


def test_if_with_constant_condition_is_left_in_place():
    model = tiny("""cond = Constant <value = bool {1}> ()
                    y = If (cond) <then_branch = then_g () => (float[N, 3] t) {
                          t = Relu (x)
                        }, else_branch = else_g () => (float[N, 3] e) {
                          e = Neg (x)
                        }>""", inputs="float[N, 3] x", outputs="float[N, 3] y")
    folded, _ = run_pass(model, "constant_fold")
    assert op_types(folded)[-1] == "If"
    assert [n.op_type for n in folded.graph.node[-1].attribute[0].g.node] == ["Relu"]
    assert_equivalent(model, folded, random_inputs(model))


def test_constant_fold_is_idempotent():
    model = tiny("""s = Add (a, a)
                    y = Mul (x, s)""", inputs="float[N, 3] x", outputs="float[N, 3] y",
                 inits=init("a", weights(3)))
    once, first = run_pass(model, "constant_fold")
    twice, second = run_pass(once, "constant_fold")
    assert first.stats == {"nodes_folded": 1} and second.stats == {"nodes_folded": 0} and not second.modified
    assert onnx.printer.to_text(twice.graph) == onnx.printer.to_text(once.graph)
    assert_equivalent(model, twice, random_inputs(model))

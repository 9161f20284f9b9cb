"""constant_fold: nodes with all-constant inputs become initializers; random ops, subgraphs and results above
the size limit stay."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import (assert_equivalent, init, op_types, random_inputs, run_pass, run_passes, session, tiny,
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


# [4096, 4096, 4] float32 is 256 MiB computed from a 4-byte scalar and a 24-byte shape
BLOW_UP = dict(body="""shape = Constant <value = int64[3] {4096, 4096, 4}> ()
                       big = Expand (one, shape)
                       y = Gather <axis = 0> (big, i)""",
               inputs="int64[2] i", outputs="float[2, 4096, 4] y", inits="float one = {1.5}")


def test_a_result_far_larger_than_its_inputs_is_left_to_run_time():
    model = tiny(**BLOW_UP)
    folded, result = run_pass(model, "constant_fold")
    assert "Expand" in op_types(folded) and op_types(folded)[-1] == "Gather"
    assert folded.ByteSize() < 4096  # nothing of 256 MiB was written in
    assert len(result.skipped) == 1 and "(Expand): result of 256 MiB from 28 bytes" in result.skipped[0]
    assert "above the folding limit" in result.skipped[0]
    feeds = {"i": np.array([0, 4095], dtype=np.int64)}
    np.testing.assert_array_equal(session(folded).run(["y"], feeds)[0], np.full((2, 4096, 4), 1.5, np.float32))


def test_the_size_limit_is_what_keeps_the_expand(monkeypatch):
    from graphopt.passes.prepasses import constant_fold

    # the same model with a 2 KiB result against a limit lowered to 1 KiB: refused, then folded at 4 KiB
    model = tiny(BLOW_UP["body"].replace("4096, 4096, 4", "8, 16, 4"), inputs="int64[2] i",
                 outputs="float[2, 16, 4] y", inits=BLOW_UP["inits"])
    monkeypatch.setattr(constant_fold, "FOLD_LIMIT_BYTES", 1024)
    kept, result = run_pass(model, "constant_fold")
    assert op_types(kept) == ["Expand", "Gather"]
    assert result.skipped == ["big (Expand): result of 2 KiB from 28 bytes of constants is above the folding "
                              "limit (1 KiB and 10x its inputs), left to run time"]
    monkeypatch.setattr(constant_fold, "FOLD_LIMIT_BYTES", 4096)
    folded, result = run_pass(model, "constant_fold")
    assert op_types(folded) == ["Gather"] and result.skipped == [] and result.stats == {"nodes_folded": 2}
    (table,) = [t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[0]]
    np.testing.assert_array_equal(numpy_helper.to_array(table), np.full((8, 16, 4), 1.5, np.float32))
    feeds = {"i": np.array([7, 0], dtype=np.int64)}
    assert_equivalent(model, folded, feeds)
    assert_equivalent(model, kept, feeds)


def test_a_large_weight_transposed_still_folds(monkeypatch):
    from graphopt.passes.prepasses import constant_fold

    monkeypatch.setattr(constant_fold, "FOLD_LIMIT_BYTES", 64)  # 48 bytes in, 48 out: no growth, folded
    model = tiny("""t = Transpose <perm = [1, 0]> (w)
                    y = MatMul (x, t)""", inputs="float[N, 3] x", outputs="float[N, 4] y",
                 inits=init("w", weights(4, 3)))
    folded, result = run_pass(model, "constant_fold")
    assert op_types(folded) == ["MatMul"] and result.skipped == []
    assert_equivalent(model, folded, random_inputs(model))


def test_constant_of_shape_above_the_limit_stays_a_node_through_the_prepasses():
    model = tiny("""shape = Constant <value = int64[3] {4096, 4096, 4}> ()
                    big = ConstantOfShape <value = float[1] {1.5}> (shape)
                    y = Gather <axis = 0> (big, i)""", inputs="int64[2] i", outputs="float[2, 4096, 4] y")
    folded, records = run_passes(model, "normalize_constants", "constant_fold")
    assert op_types(folded) == ["ConstantOfShape", "Gather"] and folded.ByteSize() < 4096
    assert records[0].result.skipped == ["big: ConstantOfShape to [4096, 4096, 4] is above the folding limit, "
                                         "left as a node"]
    (reason,) = records[1].result.skipped
    assert "(ConstantOfShape): result of 256 MiB" in reason

"""dead_code: unreachable nodes and initializers go; graph inputs and values captured by subgraphs stay."""

from __future__ import annotations

from tests.conftest import assert_equivalent, init, op_types, random_inputs, run_pass, tiny, weights


def test_dangling_nodes_and_unused_initializers_are_removed():
    model = tiny("""r = Relu (x)
                    dead = MatMul (r, w)
                    dead2 = Neg (dead)
                    y = Sigmoid (r)""", inputs="float[N, 3] x, float[N, 2] unused_input", outputs="float[N, 3] y",
                 inits=", ".join([init("w", weights(3, 4)), init("never_read", weights(5))]))
    cleaned, result = run_pass(model, "dead_code")
    assert op_types(cleaned) == ["Relu", "Sigmoid"]
    # `never_read` is dropped on import already (onnx-graphsurgeon keeps only tensors nodes touch)
    assert result.modified and result.stats == {"nodes_removed": 2, "initializers_removed": 1}
    assert [i.name for i in cleaned.graph.input] == ["x", "unused_input"]
    assert not cleaned.graph.initializer
    assert_equivalent(model, cleaned, random_inputs(model))


def test_values_read_only_by_a_subgraph_are_kept():
    model = tiny("""k = Mul (x, two)
                    s = ReduceSum <keepdims = 0> (x)
                    cond = Greater (s, zero)
                    y = If (cond) <then_branch = then_g () => (float[N, 3] t) {
                          t = Add (k, w)
                        }, else_branch = else_g () => (float[N, 3] e) {
                          e = Sub (k, w)
                        }>""", inputs="float[N, 3] x", outputs="float[N, 3] y",
                 inits=", ".join([init("w", weights(3)), "float two = {2.0}", "float zero = {0.0}"]))
    cleaned, result = run_pass(model, "dead_code")
    assert op_types(cleaned) == op_types(model)
    assert not result.modified and result.stats == {"nodes_removed": 0, "initializers_removed": 0}
    feeds = random_inputs(model)
    assert_equivalent(model, cleaned, feeds)
    assert_equivalent(model, cleaned, {"x": -feeds["x"]})


def test_dead_code_is_idempotent():
    model = tiny("""d = Neg (x)
                    y = Relu (x)""", inputs="float[N, 3] x", outputs="float[N, 3] y")
    once, first = run_pass(model, "dead_code")
    _, second = run_pass(once, "dead_code")
    assert first.stats["nodes_removed"] == 1
    assert not second.modified and second.stats == {"nodes_removed": 0, "initializers_removed": 0}

"""Graph helpers: model-level fields survive export; shared initializers are copied, never edited."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphopt.ir import graph as ir
from tests.conftest import assert_equivalent, init, parse, random_inputs, run_ort, tiny, weights

RICH_MODEL = """<ir_version: 8, opset_import: ["" : 17, "local" : 1], producer_name: "me", producer_version: "9",
  domain: "org.test", model_version: 3, doc_string: "model doc", metadata_props: ["author": "alice", "k": "v"]>
main_graph (float[N, 3] x) => (float[N, 3] y) {
  r = Relu (x)
  y = local.Scale (r)
}
<domain: "local", opset_import: ["" : 17]>
Scale (a) => (b) {
  two = Constant <value = float {2.0}> ()
  b = Mul (a, two)
}
"""


def rich_model() -> onnx.ModelProto:
    """A model with every model-level field set, a model-local function and doc strings everywhere."""
    model = parse(RICH_MODEL)
    model.graph.doc_string = "graph doc"
    model.graph.node[0].name = "my_relu"
    model.graph.node[0].doc_string = "relu doc"
    model.graph.input[0].doc_string = "input doc"
    model.graph.output[0].doc_string = "output doc"
    return model


def assert_model_fields_equal(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(result, field) == getattr(original, field), field
    assert result.opset_import == original.opset_import
    assert result.metadata_props == original.metadata_props
    assert result.functions == original.functions
    assert result.graph.name == original.graph.name and result.graph.doc_string == original.graph.doc_string
    assert [(v.name, v.doc_string, v.type) for v in result.graph.input] == \
        [(v.name, v.doc_string, v.type) for v in original.graph.input]
    assert [(v.name, v.doc_string, v.type) for v in result.graph.output] == \
        [(v.name, v.doc_string, v.type) for v in original.graph.output]


def test_export_keeps_model_fields_functions_and_doc_strings():
    model = rich_model()
    exported = ir.export_model(ir.import_graph(model), model)
    onnx.checker.check_model(exported, full_check=True)
    assert_model_fields_equal(exported, model)
    assert [(n.name, n.doc_string) for n in exported.graph.node] == [("my_relu", "relu doc"), ("", "")]
    assert_equivalent(model, exported, random_inputs(model))


def test_export_adds_opset_for_a_new_custom_domain():
    model = tiny("y = Relu (x)", inputs="float[N, 3] x", outputs="float[N, 3] y")
    graph = ir.import_graph(model)
    graph.nodes[0].domain = "com.example"
    exported = ir.export_model(graph, model, infer=False)
    assert {o.domain: o.version for o in exported.opset_import} == {"": 17, "com.example": 1}


def test_export_drops_stale_intermediate_shapes():
    model = tiny("c = MatMul (x, w)\n y = Relu (c)", inputs="float[N, 3] x", outputs="float[N, 4] y",
                 inits=init("w", weights(3, 4)))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 99]))
    exported = ir.export_model(ir.import_graph(model), model)
    (info,) = [v for v in exported.graph.value_info if v.name == "c"]
    assert [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim] == ["N", 4]


def _shared_model() -> onnx.ModelProto:
    return tiny("a = MatMul (x, w)\n b = MatMul (x, w)\n y = Add (a, b)", inputs="float[N, 3] x",
                outputs="float[N, 4] y", inits=init("w", weights(3, 4)))


def test_set_input_array_copies_a_shared_initializer():
    model = _shared_model()
    graph = ir.import_graph(model)
    first, second = graph.nodes[0], graph.nodes[1]
    original = first.inputs[1]
    written = ir.set_input_array(graph, first, 1, np.zeros((3, 4), np.float32))
    assert written is not original and written.name != "w" and first.inputs[1] is written
    assert second.inputs[1] is original
    np.testing.assert_array_equal(original.values, weights(3, 4))
    exported = ir.export_model(graph, model)
    values = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    np.testing.assert_array_equal(values["w"], weights(3, 4))
    np.testing.assert_array_equal(values[written.name], np.zeros((3, 4), np.float32))


def test_set_input_array_edits_a_private_initializer_in_place():
    model = tiny("y = MatMul (x, w)", inputs="float[N, 3] x", outputs="float[N, 4] y", inits=init("w", weights(3, 4)))
    graph = ir.import_graph(model)
    node = graph.nodes[0]
    written = ir.set_input_array(graph, node, 1, np.ones((3, 4), np.float32))
    assert written.name == "w" and node.inputs[1] is written
    np.testing.assert_array_equal(written.values, np.ones((3, 4), np.float32))


def test_set_input_array_on_a_variable_creates_an_initializer():
    model = tiny("y = MatMul (x, w)", inputs="float[N, 3] x, float[3, 4] w", outputs="float[N, 4] y")
    graph = ir.import_graph(model)
    written = ir.set_input_array(graph, graph.nodes[0], 1, np.ones((3, 4), np.float32))
    assert isinstance(written, gs.Constant) and written.name == "w_1"
    assert [t.name for t in graph.inputs] == ["x", "w"]


def test_private_producer_keeps_the_nodes_in_topological_order():
    """Two reshapes share a target built at run time; the first one's private copy of the Concat must come
    before it (exporters such as torch's dynamo share one target between all the attention reshapes)."""
    model = tiny("""s = Shape (x)
        n = Slice (s, zero, one)
        target = Concat <axis = 0> (n, two)
        a = Reshape (x, target)
        b = Reshape (x, target)
        y = Add (a, b)""", inputs="float[N, 4] x", outputs="float[N, 2, 2] y",
                 inits=", ".join([init("zero", [0], "int64"), init("one", [1], "int64"), init("two", [2, 2], "int64")]))
    graph = ir.import_graph(model)
    first = next(node for node in graph.nodes if node.op == "Reshape")
    copy = ir.private_producer(graph, first, 1)
    assert copy.op == "Concat" and first.inputs[1] is copy.outputs[0]
    order = {id(node): index for index, node in enumerate(graph.nodes)}
    assert order[id(copy)] < order[id(first)]
    exported = ir.export_model(graph, model)
    onnx.checker.check_model(exported, full_check=True)
    assert_equivalent(model, exported, random_inputs(model))


def test_unique_name_avoids_every_tensor_name():
    graph = ir.import_graph(_shared_model())
    assert ir.unique_name(graph, "w") == "w_1"
    assert ir.unique_name(graph, "fresh") == "fresh"


def test_replace_uses_reaches_subgraphs():
    model = tiny("""k = Neg (x)
                    s = ReduceSum <keepdims = 0> (x)
                    cond = Greater (s, zero)
                    y = If (cond) <then_branch = then_g () => (float[N, 3] t) {
                          t = Relu (k)
                        }, else_branch = else_g () => (float[N, 3] e) {
                          e = Abs (k)
                        }>""", inputs="float[N, 3] x", outputs="float[N, 3] y", inits="float zero = {0.0}")
    graph = ir.import_graph(model)
    k, x = graph.tensors()["k"], graph.tensors()["x"]
    ir.replace_uses(graph, k, x)
    ir.cleanup(graph)
    exported = ir.export_model(graph, model)
    onnx.checker.check_model(exported, full_check=True)
    assert [n.op_type for n in exported.graph.node] == ["ReduceSum", "Greater", "If"]
    feeds = random_inputs(model)
    expected = np.where(feeds["x"].sum() > 0, np.maximum(feeds["x"], 0), np.abs(feeds["x"]))
    np.testing.assert_allclose(run_ort(exported, feeds)["y"], expected, rtol=1e-6)


def test_infer_shapes_tolerates_unknown_ops():
    model = tiny("y = Relu (x)", inputs="float[N, 3] x", outputs="float[N, 3] y")
    model.graph.node[0].op_type = "NoSuchOp"
    model.graph.node[0].domain = "com.unknown"
    model.opset_import.append(onnx.helper.make_opsetid("com.unknown", 1))
    assert ir.infer_shapes(model).graph.node[0].op_type == "NoSuchOp"


def _all_initializers(graph: onnx.GraphProto) -> list[str]:
    names = [t.name for t in graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            for subgraph in [attr.g] if attr.HasField("g") else attr.graphs:
                names += _all_initializers(subgraph)
    return names


def test_weights_captured_by_subgraphs_are_stored_once():
    model = tiny("""s = ReduceSum <keepdims = 0> (x)
                    cond = Greater (s, zero)
                    m = MatMul (x, w)
                    y = If (cond) <then_branch = then_g () => (float[N, 64] t) {
                          t = MatMul (x, w)
                        }, else_branch = else_g () => (float[N, 64] e) {
                          k = Constant <value = float {3.0}> ()
                          e = Loop (trip, "", x) <body = body_g (int64 i, bool c, float[N, 64] acc)
                                                               => (bool c_out, float[N, 64] out) {
                              c_out = Identity (c)
                              p = MatMul (acc, w)
                              out = Mul (p, k)
                            }>
                        }>""", inputs="float[N, 64] x", outputs="float[N, 64] y, float[N, 64] m",
                 inits=", ".join([init("w", weights(64, 64) / 8), "float zero = {0.0}", "int64 trip = {2}"]))
    exported = ir.export_model(ir.import_graph(model), model)
    onnx.checker.check_model(exported, full_check=True)
    assert sorted(_all_initializers(exported.graph)) == ["trip", "w", "zero"]
    assert exported.ByteSize() < 1.1 * model.ByteSize()
    feeds = random_inputs(model)
    assert_equivalent(model, exported, feeds)
    assert_equivalent(model, exported, {"x": -feeds["x"]})


def test_weights_only_branches_read_are_stored_once_where_both_see_them():
    """A weight the main graph does not read but both branches of an If do (Silero VAD's sample-rate switch)
    is written once, in the main graph, and one that one branch alone reads stays in the main graph where the
    model held it; a constant local to a branch stays in it."""
    model = tiny("""s = ReduceSum <keepdims = 0> (x)
                    cond = Greater (s, zero)
                    y = If (cond) <then_branch = then_g () => (float[N, 64] t) {
                          t = MatMul (x, w)
                        }, else_branch = else_g () => (float[N, 64] e) {
                          p = MatMul (x, w)
                          q = MatMul (p, v)
                          half = Constant <value = float {0.5}> ()
                          e = Mul (q, half)
                        }>""", inputs="float[N, 64] x", outputs="float[N, 64] y",
                 inits=", ".join([init("w", weights(64, 64) / 8), init("v", weights(64, 64, seed=1) / 8),
                                  "float zero = {0.0}"]))
    exported = ir.export_model(ir.import_graph(model), model)
    onnx.checker.check_model(exported, full_check=True)
    assert sorted(_all_initializers(exported.graph)) == ["v", "w", "zero"]
    assert sorted(t.name for t in exported.graph.initializer) == ["v", "w", "zero"]
    branch = next(a.g for a in exported.graph.node[-1].attribute if a.name == "else_branch")
    assert "half" in {output for node in branch.node for output in node.output}
    assert exported.ByteSize() < 1.1 * model.ByteSize()
    feeds = random_inputs(model)
    assert_equivalent(model, exported, feeds)
    assert_equivalent(model, exported, {"x": -feeds["x"]})


def test_shipped_shapes_are_declared_as_the_template_declared_them():
    """What the template declared and still holds stays as declared (onnxruntime fuses more where it knows more
    shapes, and those fusions ran slower: see ir.like_template_value_info); a declaration pruning made false takes
    the inferred shape; tensors the template did not declare carry none."""
    model = tiny("c = MatMul (x, w)\n d = Relu (c)\n e = Sigmoid (d)\n y = Neg (e)", inputs="float[N, 3] x",
                 outputs="float[N, 4] y", inits=init("w", weights(3, 4)))
    model.graph.value_info.extend([onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["a", "b"]),
                                   onnx.helper.make_tensor_value_info("d", onnx.TensorProto.FLOAT, ["N", 5])])
    exported = ir.like_template_value_info(ir.export_model(ir.import_graph(model), model), model)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in exported.graph.value_info}
    assert shapes == {"c": ["a", "b"], "d": ["N", 4]}

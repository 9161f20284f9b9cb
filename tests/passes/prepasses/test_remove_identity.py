"""remove_identity: Identity and inference Dropout go; output names never change; masks in use stay."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_equivalent, init, op_types, random_inputs, run_pass, tiny, weights


@pytest.mark.parametrize("opset,dropout", [
    (11, "d = Dropout <ratio = 0.5> (i)"),
    (13, "d = Dropout (i, ratio)"),
    (17, "d = Dropout (i, ratio, off)"),
    (17, "d, unused_mask = Dropout (i)"),
])
def test_identity_and_dropout_in_the_middle_are_removed(opset, dropout):
    model = tiny(f"""r = Relu (x)
                     i = Identity (r)
                     {dropout}
                     y = Neg (d)""", inputs="float[N, 3] x", outputs="float[N, 3] y", opset=opset,
                 inits="float ratio = {0.5}, bool off = {0}")
    cleaned, result = run_pass(model, "remove_identity")
    assert op_types(cleaned) == ["Relu", "Neg"]
    assert result.modified and result.stats == {"removed": 2} and not result.skipped
    assert_equivalent(model, cleaned, random_inputs(model))


def test_identity_writing_a_graph_output_keeps_the_name():
    model = tiny("""r = Relu (x)
                    a = Identity (r)
                    y = Identity (a)
                    z = Sigmoid (x)
                    w = Identity (z)""", inputs="float[N, 3] x", outputs="float[N, 3] y, float[N, 3] w")
    cleaned, result = run_pass(model, "remove_identity")
    assert op_types(cleaned) == ["Relu", "Sigmoid"]
    assert [o.name for o in cleaned.graph.output] == ["y", "w"]
    assert {n.output[0] for n in cleaned.graph.node} == {"y", "w"}
    assert result.stats == {"removed": 3}
    assert_equivalent(model, cleaned, random_inputs(model))


def test_identity_of_initializer_is_bypassed():
    model = tiny("""v = Identity (w)
                    y = MatMul (x, v)""", inputs="float[N, 3] x", outputs="float[N, 4] y",
                 inits=init("w", weights(3, 4)))
    cleaned, result = run_pass(model, "remove_identity")
    assert op_types(cleaned) == ["MatMul"] and list(cleaned.graph.node[0].input) == ["x", "w"]
    assert_equivalent(model, cleaned, random_inputs(model))


def test_identity_between_interface_tensors_is_kept():
    # input -> Identity -> output: removing it would rename the output; a tensor read twice likewise
    model = tiny("""y = Identity (x)
                    r = Relu (x)
                    s = Neg (r)
                    z = Identity (r)""", inputs="float[N, 3] x", outputs="float[N, 3] y, float[N, 3] s, float[N, 3] z")
    cleaned, result = run_pass(model, "remove_identity")
    assert op_types(cleaned) == op_types(model)
    assert not result.modified and result.stats == {"removed": 0}
    assert len(result.skipped) == 2
    assert_equivalent(model, cleaned, random_inputs(model))


@pytest.mark.parametrize("body,outputs,reason", [
    ("d, m = Dropout (x)\n y = Relu (d)\n mf = Cast <to = 1> (m)\n z = Add (y, mf)",
     "float[N, 3] z", "mask is consumed"),
    ("d, m = Dropout (x)\n y = Relu (d)", "float[N, 3] y, bool[N, 3] m", "mask"),
    ("d = Dropout (x, ratio, on)\n y = Relu (d)", "float[N, 3] y", "training_mode"),
    ("d = Dropout (x, ratio, mode)\n y = Relu (d)", "float[N, 3] y", "training_mode"),
], ids=["mask_consumed", "mask_is_output", "training_true", "training_runtime"])
def test_dropout_that_is_not_identity_is_kept_with_reason(body, outputs, reason):
    model = tiny(body, inputs="float[N, 3] x, bool mode" if "mode)" in body else "float[N, 3] x", outputs=outputs,
                 inits="float ratio = {0.0}, bool on = {1}")
    cleaned, result = run_pass(model, "remove_identity")
    assert "Dropout" in op_types(cleaned) and not result.modified
    assert len(result.skipped) == 1 and reason in result.skipped[0]
    feeds = random_inputs(model)
    if "mode" in feeds:
        feeds["mode"] = np.array(False)
    assert_equivalent(model, cleaned, feeds)


def test_remove_identity_is_idempotent():
    model = tiny("""a = Identity (x)
                    b = Dropout (a)
                    y = Identity (b)""", inputs="float[N, 3] x", outputs="float[N, 3] y")
    once, first = run_pass(model, "remove_identity")
    _, second = run_pass(once, "remove_identity")
    assert first.stats["removed"] == 2 and op_types(once) == ["Identity"]
    assert not second.modified and second.stats["removed"] == 0
    assert_equivalent(model, once, random_inputs(model))

"""The per-op registry: one lookup by (domain, op_type, opset), and rotation rules that hold numerically.

Every op whose rule says it commutes with a rotation of the channel axis is run in onnxruntime on
rotated and unrotated inputs: rotate-then-op equals op-then-rotate (on the output axis the rule
names). Every op whose rule declines is shown to break that identity, so a refusal is never wrong
for the case tested.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.analysis.oprules import rule_for
from graphopt.analysis.registry import DEFAULT_RULE, lookup, opsets_of, register, registered
from graphopt.ir import graph as ir
from tests.conftest import init, run_ort, tiny, weights

C = 6


def _rotation(seed: int = 3) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((C, C)))
    return q.astype(np.float32)


def _rotate(x: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(np.moveaxis(x, axis, -1), q, axes=([-1], [0])), -1, axis)


# (case, node lines, input type, output type, initializers, channel axis of x)
EQUIVARIANT = [
    ("identity", "y = Identity(x)", f"float[2, {C}, 4, 4] x", f"float[2, {C}, 4, 4] y", "", 1),
    ("dropout", "y = Dropout(x)", f"float[2, {C}, 4, 4] x", f"float[2, {C}, 4, 4] y", "", 1),
    ("transpose", "y = Transpose <perm = [0, 2, 3, 1]> (x)", f"float[2, {C}, 4, 5] x", f"float[2, 4, 5, {C}] y", "", 1),
    ("average pool", "y = AveragePool <kernel_shape = [2, 2]> (x)", f"float[2, {C}, 4, 4] x",
     f"float[2, {C}, 3, 3] y", "", 1),
    ("global average pool", "y = GlobalAveragePool(x)", f"float[2, {C}, 4, 4] x", f"float[2, {C}, 1, 1] y", "", 1),
    ("reduce mean over H, W", "y = ReduceMean <axes = [2, 3]> (x)", f"float[2, {C}, 4, 4] x",
     f"float[2, {C}, 1, 1] y", "", 1),
    ("flatten of a 1x1 map", "y = Flatten(x)", f"float[2, {C}, 1, 1] x", f"float[2, {C}] y", "", 1),
    ("reshape of a 1x1 map", "y = Reshape(x, shape)", f"float[2, {C}, 1, 1] x", f"float[2, {C}] y",
     init("shape", [2, C], "int64"), 1),
]
DECLINED = [
    ("relu", "y = Relu(x)", f"float[2, {C}, 4, 4] x", f"float[2, {C}, 4, 4] y", "", 1, "nonlinearity"),
    ("max pool", "y = MaxPool <kernel_shape = [2, 2]> (x)", f"float[2, {C}, 4, 4] x", f"float[2, {C}, 3, 3] y", "",
     1, "max pooling"),
    ("per-channel scale", "y = Mul(x, s)", f"float[2, {C}, 4, 4] x", f"float[2, {C}, 4, 4] y",
     init("s", weights(C, 1, 1, seed=5)), 1, "per-channel scale"),
    ("flatten of a 2x2 map", "y = Flatten(x)", f"float[2, {C}, 2, 2] x", f"float[2, {4 * C}] y", "", 1,
     "mixes the channel axis"),
    ("reduce mean over channels", "y = ReduceMean <axes = [1]> (x)", f"float[2, {C}, 4, 4] x",
     "float[2, 1, 4, 4] y", "", 1, "mixes the channel axis"),
]


def _node_and_input(model: onnx.ModelProto):
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = ir.import_graph(inferred)
    node = graph.nodes[-1]
    return graph, node, node.inputs[0]


def _outputs(model: onnx.ModelProto, x: np.ndarray, extra: dict[str, np.ndarray]) -> np.ndarray:
    return run_ort(model, {"x": x, **extra})["y"]


@pytest.mark.parametrize("case", EQUIVARIANT, ids=[c[0] for c in EQUIVARIANT])
def test_ops_registered_as_equivariant_commute_with_a_channel_rotation(case: tuple) -> None:
    _, body, inputs, outputs, inits, axis = case
    model = tiny(body, inputs=inputs, outputs=outputs, inits=inits)
    graph, node, tensor = _node_and_input(model)
    out_axis = rule_for(node, opsets_of(graph)).rotation(node, tensor, axis)
    assert isinstance(out_axis, int), out_axis  # residual joins: tests/analysis/test_axis_rules.py
    x = np.random.default_rng(0).standard_normal([int(d.dim_value) for d in model.graph.input[0].type.tensor_type
                                                  .shape.dim]).astype(np.float32)
    q = _rotation()
    rotated_first = _outputs(model, _rotate(x, q, axis), {})
    rotated_after = _rotate(_outputs(model, x, {}), q, out_axis)
    np.testing.assert_allclose(rotated_first, rotated_after, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", DECLINED, ids=[c[0] for c in DECLINED])
def test_ops_registered_as_not_equivariant_say_why_and_really_are_not(case: tuple) -> None:
    _, body, inputs, outputs, inits, axis, reason = case
    model = tiny(body, inputs=inputs, outputs=outputs, inits=inits)
    graph, node, tensor = _node_and_input(model)
    outcome = rule_for(node, opsets_of(graph)).rotation(node, tensor, axis)
    assert isinstance(outcome, str) and reason in outcome, outcome
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, C, *[int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim][2:]))
    x = x.astype(np.float32)
    extra = {"z": rng.standard_normal(x.shape).astype(np.float32)} if "z" in inputs else {}
    q = _rotation()
    rotated_first = _outputs(model, _rotate(x, q, axis), extra)
    plain = _outputs(model, x, extra)
    if plain.ndim > axis and plain.shape[axis] == C:
        assert not np.allclose(rotated_first, _rotate(plain, q, axis), rtol=1e-3, atol=1e-4)
    else:  # the channel axis is gone: no rotation of the output can match
        assert not np.allclose(rotated_first, plain, rtol=1e-3, atol=1e-4)


def test_lookup_is_by_domain_op_type_and_opset_range() -> None:
    def first(node, a) -> None:  # pragma: no cover - never walked
        pass

    def second(node, a) -> None:  # pragma: no cover - never walked
        pass

    register("RegistryProbe", domain="test.registry", until=12, channels=first)
    register("RegistryProbe", domain="test.registry", since=13, channels=second)
    assert lookup("test.registry", "RegistryProbe", 11).channels is first
    assert lookup("test.registry", "RegistryProbe", 13).channels is second
    assert lookup("", "RegistryProbe", 13) is None
    with pytest.raises(ValueError, match="duplicate rule for test.registry::RegistryProbe"):
        register("RegistryProbe", domain="test.registry", since=12, until=14, channels=first)


def test_the_default_domain_has_one_name_and_unknown_ops_get_the_default_rule() -> None:
    assert lookup("ai.onnx", "Conv", 17) is lookup("", "Conv", 17) is not None
    graph = ir.import_graph(tiny("y = Relu(x)", inputs="float[2, 4] x", outputs="float[2, 4] y"))
    unknown = graph.nodes[0]
    unknown.op = "NotAnOnnxOp"
    assert rule_for(unknown, opsets_of(graph)) is DEFAULT_RULE


def test_every_op_is_registered_once_per_domain_and_opset_range() -> None:
    seen: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for rule in registered():
        ranges = seen.setdefault((rule.domain, rule.op_type), [])
        upper = rule.until or 10**9
        assert all(upper < lo or hi < rule.since for lo, hi in ranges), rule
        ranges.append((rule.since, upper))
    for op in ("Conv", "Gemm", "MatMul", "Add", "Relu", "BatchNormalization", "Reshape", "Concat", "Split", "Slice",
               "Transpose", "GlobalAveragePool", "ReduceMean", "LayerNormalization", "Softmax", "Resize"):
        assert ("", op) in seen, op
    assert ("graphopt", "RMSNorm") in seen and ("graphopt", "TSRA") in seen

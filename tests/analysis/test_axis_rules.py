"""Axis-aware rotation rules: each op states the axes it mixes, and a channel rotation passes every op
that leaves the channel axis alone. One numerical proof per op in onnxruntime (graph optimisations
disabled): rotate the inputs that carry the channels, run, rotate the plain outputs, compare at
rtol 1e-4. Ops that mix or gate the channels decline with the reason named, and really are not
equivariant on the case tested."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.oprules import rule_for
from graphopt.analysis.registry import Carried, opsets_of
from graphopt.ir import graph as ir
from tests.conftest import run_ort

C = 6
X = [2, C, 4, 4]


def _q(seed: int = 3) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((C, C)))
    return q


def _rotate(x: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    rotated = np.tensordot(q, x.astype(np.float64), axes=([1], [axis]))
    return np.moveaxis(rotated, 0, axis).astype(x.dtype)


def _model(node: onnx.NodeProto, inputs: dict[str, list[int]], outputs: int = 1,
           constants: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """One node over float inputs `inputs` (name -> shape) and `constants`; outputs y0, y1, ... of
    inferred shape."""
    node.output[:] = [f"y{i}" for i in range(outputs)]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                            for n, s in inputs.items()],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.UNDEFINED, None)
                               for i in range(outputs)],
                              [numpy_helper.from_array(v, n) for n, v in (constants or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _outcome(model: onnx.ModelProto, axis: int, reads: str = "x") -> Carried | str:
    graph = ir.import_graph(model)
    node = graph.nodes[0]
    tensor = next(t for t in node.inputs if t.name == reads)
    found = rule_for(node, opsets_of(graph)).rotation(node, tensor, axis)
    return Carried(found) if isinstance(found, int) else found


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# (case, node, inputs, outputs, constants, channel axis of x)
EQUIVARIANT = [
    ("ReduceMean over H, W", helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3]), {"x": X}, 1, {}, 1),
    ("ReduceMean over -1, -2 without keepdims", helper.make_node("ReduceMean", ["x"], ["y"], axes=[-1, -2], keepdims=0),
     {"x": X}, 1, {}, 1),
    ("ReduceSum over H, W without keepdims", helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0),
     {"x": X}, 1, {"axes": _i64(2, 3)}, 1),
    ("ReduceSum over T of token-major", helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0),
     {"x": [2, 5, C]}, 1, {"axes": _i64(1)}, 2),
    ("GlobalAveragePool", helper.make_node("GlobalAveragePool", ["x"], ["y"]), {"x": X}, 1, {}, 1),
    ("AveragePool counting padding", helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                                      pads=[1, 1, 1, 1], count_include_pad=1), {"x": X}, 1, {}, 1),
    ("Resize linear", helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear"), {"x": X}, 1,
     {"scales": np.array([1, 1, 2, 2], np.float32)}, 1),
    ("Resize nearest by sizes", helper.make_node("Resize", ["x", "", "", "sizes"], ["y"]), {"x": X}, 1,
     {"sizes": _i64(2, C, 8, 6)}, 1),
    ("Pad with zeros", helper.make_node("Pad", ["x", "pads"], ["y"]), {"x": X}, 1, {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)}, 1),
    ("Pad reflect", helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), {"x": X}, 1,
     {"pads": _i64(0, 0, 1, 1, 0, 0, 1, 1)}, 1),
    ("Slice of H", helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"]), {"x": X}, 1,
     {"starts": _i64(1), "ends": _i64(3), "axes": _i64(2)}, 1),
    ("Slice keeping every channel", helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"]), {"x": X}, 1,
     {"starts": _i64(0, 1), "ends": _i64(2**62, 4), "axes": _i64(1, 3)}, 1),
    ("Split along W", helper.make_node("Split", ["x", "split"], ["y"], axis=3), {"x": X}, 2, {"split": _i64(1, 3)}, 1),
    ("Concat along H", helper.make_node("Concat", ["x", "z"], ["y"], axis=2), {"x": X, "z": [2, C, 3, 4]}, 1, {}, 1),
    ("Transpose", helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1]), {"x": X}, 1, {}, 1),
    ("Reshape keeping channels whole", helper.make_node("Reshape", ["x", "shape"], ["y"]), {"x": X}, 1,
     {"shape": _i64(2, C, 16)}, 1),
    ("Reshape of token rows", helper.make_node("Reshape", ["x", "shape"], ["y"]), {"x": [2, 5, C]}, 1,
     {"shape": _i64(-1, C)}, 2),
    ("Flatten of a 1x1 map", helper.make_node("Flatten", ["x"], ["y"]), {"x": [2, C, 1, 1]}, 1, {}, 1),
    ("Unsqueeze", helper.make_node("Unsqueeze", ["x", "axes"], ["y"]), {"x": X}, 1, {"axes": _i64(2)}, 1),
    ("Squeeze", helper.make_node("Squeeze", ["x", "axes"], ["y"]), {"x": [2, C, 1, 4]}, 1, {"axes": _i64(2)}, 1),
    ("Mul by a scalar", helper.make_node("Mul", ["s", "x"], ["y"]), {"x": X}, 1, {"s": np.array(1.7, np.float32)}, 1),
    ("Mul by a per-position gate", helper.make_node("Mul", ["x", "g"], ["y"]), {"x": X, "g": [2, 1, 4, 4]}, 1, {}, 1),
    ("Div by a constant along channels", helper.make_node("Div", ["x", "d"], ["y"]), {"x": X}, 1,
     {"d": np.random.default_rng(2).uniform(0.5, 2.0, (1, 1, 4, 4)).astype(np.float32)}, 1),
    ("Identity", helper.make_node("Identity", ["x"], ["y"]), {"x": X}, 1, {}, 1),
    ("Dropout", helper.make_node("Dropout", ["x"], ["y"]), {"x": X}, 1, {}, 1),
    ("Cast to float", helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT), {"x": X}, 1, {}, 1),
    ("Cast to double", helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE), {"x": X}, 1, {}, 1),
    ("residual Add", helper.make_node("Add", ["x", "z"], ["y"]), {"x": X, "z": X}, 1, {}, 1),
    ("Sub of two branches", helper.make_node("Sub", ["z", "x"], ["y"]), {"x": X, "z": X}, 1, {}, 1),
]

# (case, node, inputs, outputs, constants, channel axis of x, reason)
DECLINED = [
    ("ReduceMean over channels", helper.make_node("ReduceMean", ["x"], ["y"], axes=[1]), {"x": X}, 1, {}, 1,
     "mixes the channel axis 1"),
    ("Pad with ones", helper.make_node("Pad", ["x", "pads", "one"], ["y"]), {"x": X}, 1,
     {"pads": _i64(0, 0, 1, 1, 0, 0, 1, 1), "one": np.array(1.0, np.float32)}, 1, "not zero"),
    ("Slice of channels", helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"]), {"x": X}, 1,
     {"starts": _i64(0), "ends": _i64(4), "axes": _i64(1)}, 1, "mixes the channel axis 1"),
    ("Concat along channels", helper.make_node("Concat", ["x", "z"], ["y"], axis=1), {"x": X, "z": X}, 1, {}, 1,
     "along the channel axis"),
    ("Reshape splitting channels", helper.make_node("Reshape", ["x", "shape"], ["y"]), {"x": X}, 1,
     {"shape": _i64(2, 3, 2, 16)}, 1, "mixes the channel axis 1"),
    ("Flatten of a 2x2 map", helper.make_node("Flatten", ["x"], ["y"]), {"x": [2, C, 2, 2]}, 1, {}, 1,
     "mixes the channel axis 1"),
    ("Mul by a per-channel gate", helper.make_node("Mul", ["x", "g"], ["y"]), {"x": X, "g": [2, C, 1, 1]}, 1, {}, 1,
     "per-channel gate"),
    ("Div into the channels", helper.make_node("Div", ["g", "x"], ["y"]), {"x": X, "g": [2, 1, 4, 4]}, 1, {}, 1,
     "divides by the channels"),
    ("Add of a scalar", helper.make_node("Add", ["x", "s"], ["y"]), {"x": X}, 1, {"s": np.array(0.5, np.float32)}, 1,
     "adds a constant"),
    ("Cast to integers", helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32), {"x": X}, 1, {}, 1,
     "not float"),
]


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: (rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]) * 2).astype(np.float32)
            for v in model.graph.input}


def _rotated_feeds(feeds: dict[str, np.ndarray], axes: dict[str, int], q: np.ndarray) -> dict[str, np.ndarray]:
    return {name: _rotate(value, q, axes[name]) if name in axes else value for name, value in feeds.items()}


@pytest.mark.parametrize("case", EQUIVARIANT, ids=[c[0] for c in EQUIVARIANT])
def test_a_rotation_passes_ops_that_do_not_mix_the_channel_axis(case: tuple) -> None:
    _, node, inputs, outputs, constants, axis = case
    model = _model(node, inputs, outputs, constants)
    carried = _outcome(model, axis)
    assert isinstance(carried, Carried), carried
    names = [i for i in model.graph.node[0].input]
    axes = {"x": axis, **{names[i]: joined for i, joined in carried.joins}}
    q, feeds = _q(), _feeds(model)
    plain = run_ort(model, feeds)
    rotated = run_ort(model, _rotated_feeds(feeds, axes, q))
    assert set(carried.outputs) == set(range(outputs))
    for index in carried.outputs:
        expected = _rotate(plain[f"y{index}"], q, carried.axis)
        np.testing.assert_allclose(rotated[f"y{index}"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", DECLINED, ids=[c[0] for c in DECLINED])
def test_ops_that_mix_or_gate_the_channels_decline_and_really_are_not_equivariant(case: tuple) -> None:
    _, node, inputs, outputs, constants, axis, reason = case
    model = _model(node, inputs, outputs, constants)
    outcome = _outcome(model, axis)
    assert isinstance(outcome, str) and reason in outcome, outcome
    q, feeds = _q(), _feeds(model)
    joined = {"x": axis, **({"z": axis} if "z" in inputs else {})}
    plain, rotated = run_ort(model, feeds)["y0"], run_ort(model, _rotated_feeds(feeds, joined, q))["y0"]
    if plain.ndim > axis and plain.shape[axis] == C:
        assert not np.allclose(rotated, _rotate(plain, q, axis).astype(plain.dtype), rtol=1e-3, atol=1e-4)
    else:  # the channel axis is gone or resized: no rotation of the output can match
        assert plain.shape != rotated.shape or not np.allclose(rotated, plain, rtol=1e-3, atol=1e-4)


def test_a_residual_add_names_the_branch_it_joins() -> None:
    model = _model(helper.make_node("Add", ["z", "x"], ["y"]), {"x": X, "z": [2, 1, 4, 4]})
    assert "does not carry the channels" in _outcome(model, 1)  # z is constant along the channels
    model = _model(helper.make_node("Add", ["z", "x"], ["y"]), {"x": X, "z": [2, C, 1, 4]})
    assert _outcome(model, 1) == Carried(1, joins=((0, 1),))  # z carries them, broadcast over H

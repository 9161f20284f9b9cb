"""LSTM, GRU and RNN layers: their MACs are counted, and the channels that feed them prune through their input
weight W (its columns go; SNP's reconstruction and bias shift fold into W and the input half of B). Planted
zero and duplicate channels in front of each are removed exactly: magnitude drops the zero ones, SNP both.
Their hidden units prune too (rows of every gate, R's columns, outputs, initial states): a planted silent
unit goes exactly, a repeated one and a constant one through the recurrence too (GRU with linear_before_reset:
its hidden gate as well), the MACs of a cut are counted exactly, a zero initial state computed at run time is
dropped, one given as a model input blocks with the reason, and a unit R still reads is not dead."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.calibration.shapes import count_cost
from graphopt.inspect import inspect_model
from tests.conftest import assert_equivalent

T, FEATURES, WIDTH, HIDDEN, OUT = 5, 16, 12, 8, 3
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
ZERO, COPIED, ORIGINAL = 9, 7, 5  # planted: channel 9 is always 0, channel 7 repeats channel 5


def recurrent_model(op: str, bias: bool = True, seed: int = 0, **attrs: int) -> onnx.ModelProto:
    """x [N, T, 16] -> MatMul+Add+Relu to 12 channels (two planted) -> transpose to [T, N, 12] -> bidirectional
    `op` (hidden 8) -> Y [T, 2, N, 8] -> [N, T, 16] -> MatMul to 3."""
    rng = np.random.default_rng(seed)
    gates = GATES[op]
    w1, b1 = rng.standard_normal((FEATURES, WIDTH)), rng.standard_normal(WIDTH)
    w1[:, ZERO], b1[ZERO] = 0.0, -1.0
    w1[:, COPIED], b1[COPIED] = w1[:, ORIGINAL], b1[ORIGINAL]
    arrays = {"w1": w1, "b1": b1, "W": rng.standard_normal((2, gates * HIDDEN, WIDTH)) * 0.3,
              "R": rng.standard_normal((2, gates * HIDDEN, HIDDEN)) * 0.3,
              "w2": rng.standard_normal((2 * HIDDEN, OUT)), "back": np.array([0, 0, 2 * HIDDEN])}
    if bias:
        arrays["B"] = rng.standard_normal((2, 2 * gates * HIDDEN)) * 0.1
    inits = [numpy_helper.from_array(v.astype(np.int64 if k == "back" else np.float32), k) for k, v in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Transpose", ["r"], ["seq"], perm=[1, 0, 2]),
             helper.make_node(op, ["seq", "W", "R", "B" if bias else ""], ["Y"], hidden_size=HIDDEN,
                              direction="bidirectional", **attrs),
             helper.make_node("Transpose", ["Y"], ["yt"], perm=[2, 0, 1, 3]),
             helper.make_node("Reshape", ["yt", "back"], ["flat"]), helper.make_node("MatMul", ["flat", "w2"], ["y"])]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", T, FEATURES])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", T, OUT])
    graph = helper.make_graph(nodes, op.lower(), [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def macs(op: str, width: int = WIDTH) -> int:
    return T * FEATURES * width + T * 2 * GATES[op] * HIDDEN * (width + HIDDEN) + T * 2 * HIDDEN * OUT


VARIANTS = [("LSTM", {}), ("GRU", {}), ("GRU", {"linear_before_reset": 1}), ("RNN", {})]
IDS = ["lstm", "gru", "gru-linear-before-reset", "rnn"]


@pytest.mark.parametrize("op,attrs", VARIANTS, ids=IDS)
def test_recurrent_macs_count_the_input_and_recurrent_products(op: str, attrs: dict) -> None:
    assert count_cost(recurrent_model(op, **attrs), {"x": (1, T, FEATURES)}).macs == macs(op)


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, T, FEATURES)).astype(np.float32)}


@pytest.mark.parametrize("bias", [True, False], ids=["with-B", "without-B"])
@pytest.mark.parametrize("op,attrs", VARIANTS, ids=IDS)
def test_snp_removes_planted_channels_in_front_of_a_recurrent_layer_exactly(op: str, attrs: dict, bias: bool) -> None:
    model = recurrent_model(op, bias=bias, **attrs)
    calib = {"x": np.random.default_rng(2).standard_normal((64, T, FEATURES)).astype(np.float32)}
    target = macs(op, WIDTH - 2) / macs(op) + 1e-9
    for options in ({"criterion": "variance", "reconstruct_target": "self"}, {}):  # the self fit, then the refit
        result = graphopt.optimize(model, method="snp", target_macs=target, calib=calib, round_to=1, **options)
        assert result.report["macs_after"] == macs(op, WIDTH - 2)
        weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
        layer = next(n for n in result.model.graph.node if n.op_type == op)
        assert weights[layer.input[1]].shape == (2, GATES[op] * HIDDEN, WIDTH - 2)
        assert_equivalent(model, result.model, _feeds(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,attrs", VARIANTS, ids=IDS)
def test_magnitude_removes_a_zero_channel_in_front_of_a_recurrent_layer_exactly(op: str, attrs: dict) -> None:
    model = recurrent_model(op, **attrs)
    result = graphopt.optimize(model, method="magnitude", target_macs=macs(op, WIDTH - 1) / macs(op) + 1e-9,
                               round_to=1)
    assert result.report["macs_after"] == macs(op, WIDTH - 1)
    assert_equivalent(model, result.model, _feeds(), rtol=1e-5, atol=1e-5)


# -- hidden units ------------------------------------------------------------------------------------

UNIT = 3  # planted: hidden unit 3 is always 0


def _silent_unit(model: onnx.ModelProto, op: str) -> onnx.ModelProto:
    """Hidden unit UNIT of `model`'s layer is 0 at every step: its rows of the candidate gate (LSTM's cell
    input, GRU's hidden gate, RNN's only gate) are zero in W, R and both biases, so the cell, and the output,
    stay 0 from the zero initial state. Its column of R stays nonzero (a zero unit adds nothing there)."""
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    gate = GATES[op] - 1 if op != "LSTM" else 3  # LSTM gates i, o, f, c; GRU z, r, h; RNN one
    row = gate * HIDDEN + UNIT
    weights["W"][:, row] = 0.0
    weights["R"][:, row] = 0.0
    if "B" in weights:
        weights["B"][:, row] = 0.0
        weights["B"][:, GATES[op] * HIDDEN + row] = 0.0
    silent = onnx.ModelProto()
    silent.CopyFrom(model)
    del silent.graph.initializer[:]
    silent.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return silent


def _hidden_size(model: onnx.ModelProto, op: str) -> int:
    layer = next(n for n in model.graph.node if n.op_type == op)
    return next(a.i for a in layer.attribute if a.name == "hidden_size")


def full_macs(op: str, width: int = WIDTH, hidden: int = HIDDEN) -> int:
    return T * FEATURES * width + T * 2 * GATES[op] * hidden * (width + hidden) + T * 2 * hidden * OUT


@pytest.mark.parametrize("op,attrs", VARIANTS, ids=IDS)
def test_snp_removes_a_silent_hidden_unit_exactly(op: str, attrs: dict) -> None:
    model = _silent_unit(recurrent_model(op, **attrs), op)
    calib = {"x": np.random.default_rng(2).standard_normal((64, T, FEATURES)).astype(np.float32)}
    result = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=calib, round_to=1,
                               criterion="variance", reconstruct_target="self")
    assert _hidden_size(result.model, op) == HIDDEN - 1
    assert result.report["macs_after"] == full_macs(op, WIDTH - 2, HIDDEN - 1)  # the planted channels went too
    assert_equivalent(model, result.model, _feeds(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,attrs", VARIANTS, ids=IDS)
def test_a_cut_of_hidden_units_is_counted_exactly(op: str, attrs: dict) -> None:
    """The input products scale with the units kept, the recurrent ones with their square: the pass's MAC
    model agrees with the count of the written model."""
    model = recurrent_model(op, **attrs)
    result = graphopt.optimize(model, method="magnitude", target_macs=0.5, round_to=1)
    hidden = _hidden_size(result.model, op)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    layer = next(n for n in result.model.graph.node if n.op_type == op)
    width = weights[layer.input[1]].shape[2]
    assert hidden < HIDDEN and result.report["macs_after"] == full_macs(op, width, hidden)
    assert result.report["macs_ratio"] == pytest.approx(result.report["passes"][-1]["stats"]["estimated_macs_ratio"])
    assert weights[layer.input[2]].shape == (2, GATES[op] * hidden, hidden)


def _with_initial_state(model: onnx.ModelProto, op: str, source: str) -> onnx.ModelProto:
    """`model` with its layer's initial_h from `source`: "zeros" (a ConstantOfShape of the run's batch, as torch's
    legacy exporter writes it), "input" (a model input) or "constant" (seeded values: the model's batch becomes 3)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    graph = changed.graph
    layer = next(n for n in graph.node if n.op_type == op)
    while len(layer.input) < 6:
        layer.input.append("")
    layer.input[5] = "h0"
    if source == "zeros":
        graph.initializer.extend([numpy_helper.from_array(np.array([2], np.int64), "dirs"),
                                  numpy_helper.from_array(np.array([HIDDEN], np.int64), "units")])
        graph.node.insert(0, helper.make_node("ConstantOfShape", ["h0_shape"], ["h0"]))
        graph.node.insert(0, helper.make_node("Concat", ["dirs", "n", "units"], ["h0_shape"], axis=0))
        graph.node.insert(0, helper.make_node("Shape", ["x"], ["n"], end=1))
    elif source == "input":
        graph.input.append(helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, [2, "N", HIDDEN]))
    else:  # a model of batch 3
        values = np.random.default_rng(5).standard_normal((2, 3, HIDDEN)).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(values, "h0"))
        for value in (graph.input[0], graph.output[0]):
            value.type.tensor_type.shape.dim[0].dim_value = 3
    return changed


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_initial_states_zero_constant_or_given(op: str) -> None:
    base = recurrent_model(op)
    zeros = _with_initial_state(base, op, "zeros")
    assert_equivalent(base, zeros, _feeds(), rtol=1e-6, atol=1e-6)  # the planted state is the default zero
    result = graphopt.optimize(zeros, method="magnitude", target_macs=0.5, round_to=1)
    layer = next(n for n in result.model.graph.node if n.op_type == op)
    assert _hidden_size(result.model, op) < HIDDEN and layer.input[5] == ""  # dropped: absent means zero
    assert not any(n.op_type == "ConstantOfShape" for n in result.model.graph.node)
    constant = _with_initial_state(base, op, "constant")
    result = graphopt.optimize(constant, method="magnitude", target_macs=0.5, round_to=1)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    layer = next(n for n in result.model.graph.node if n.op_type == op)
    assert weights[layer.input[5]].shape == (2, 3, _hidden_size(result.model, op))
    groups = inspect_model(_with_initial_state(base, op, "input"), groups=True)["groups"]
    assert any(g["reason"] and "initial_h is neither a constant nor zero" in g["reason"] for g in groups)


def test_dead_units_keep_a_unit_the_recurrence_still_reads() -> None:
    """A hidden unit no later layer reads is dead only where R does not read it back either."""
    model = recurrent_model("GRU")
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for direction in range(2):  # the final MatMul ignores unit UNIT of both directions
        weights["w2"][direction * HIDDEN + UNIT] = 0.0
    unread = onnx.ModelProto()
    unread.CopyFrom(model)
    del unread.graph.initializer[:]
    unread.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    assert _hidden_size(graphopt.optimize(unread, method="dead-units").model, "GRU") == HIDDEN
    weights["R"][:, :, UNIT] = 0.0  # nor does the recurrence: the unit is dead
    del unread.graph.initializer[:]
    unread.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    result = graphopt.optimize(unread, method="dead-units")
    assert _hidden_size(result.model, "GRU") == HIDDEN - 1
    assert_equivalent(unread, result.model, _feeds(), rtol=1e-5, atol=1e-5)


def _repeated_unit(model: onnx.ModelProto, op: str, copy: int, of: int) -> onnx.ModelProto:
    """Hidden unit `copy` repeats unit `of` at every step: their rows of every gate are equal in W, R and both
    biases, in each direction (their columns of R differ: what reads them back)."""
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for gate in range(GATES[op]):
        for name in ("W", "R"):
            weights[name][:, gate * HIDDEN + copy] = weights[name][:, gate * HIDDEN + of]
        for half in range(2):
            offset = half * GATES[op] * HIDDEN + gate * HIDDEN
            weights["B"][:, offset + copy] = weights["B"][:, offset + of]
    repeated = onnx.ModelProto()
    repeated.CopyFrom(model)
    del repeated.graph.initializer[:]
    repeated.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return repeated


@pytest.mark.parametrize("op, attrs", [("LSTM", {}), ("RNN", {}), ("GRU", {"linear_before_reset": 1})])
def test_snp_removes_a_repeated_hidden_unit_exactly_through_the_recurrence(op: str, attrs: dict) -> None:
    """The reconstruction of a removed unit folds into R's columns too (the layer reads its units back), so a unit
    that repeats another goes exactly; a GRU with linear_before_reset (torch's export) reads r ⊙ (H·Rᵀ + Rb), linear
    in h, in its hidden gate as well, its shift going into Rb."""
    model = _repeated_unit(recurrent_model(op, **attrs), op, copy=6, of=2)
    calib = {"x": np.random.default_rng(2).standard_normal((64, T, FEATURES)).astype(np.float32)}
    for options in ({"criterion": "variance", "reconstruct_target": "self"}, {}):  # the self fit, then the refit
        result = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=calib, round_to=1, **options)
        assert _hidden_size(result.model, op) == HIDDEN - 1
        assert_equivalent(model, result.model, _feeds(), rtol=1e-4, atol=1e-4)


def _constant_unit(model: onnx.ModelProto, unit: int) -> onnx.ModelProto:
    """GRU hidden unit `unit` is the constant tanh(0.5) at every step and in the initial state (a constant: the
    model's batch becomes 3): its update gate is shut (z = 0), its reset gate open (r = 1), and its hidden gate
    reads only its biases (0.3 in Wb, 0.2 in Rb)."""
    model = _with_initial_state(model, "GRU", "constant")
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for gate, (input_bias, recurrent_bias) in enumerate([(-30.0, 0.0), (30.0, 0.0), (0.3, 0.2)]):
        row = gate * HIDDEN + unit
        weights["W"][:, row] = weights["R"][:, row] = 0.0
        weights["B"][:, row], weights["B"][:, 3 * HIDDEN + row] = input_bias, recurrent_bias
    weights["h0"][:, :, unit] = np.tanh(0.5)
    constant = onnx.ModelProto()
    constant.CopyFrom(model)
    del constant.graph.initializer[:]
    constant.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return constant


def test_snp_folds_a_constant_hidden_unit_into_the_recurrent_bias() -> None:
    """A constant hidden unit of a GRU with linear_before_reset goes exactly: what R's columns read from it moves
    into Rb, inside the hidden gate's reset product (Wb, outside it, would be scaled by r no more)."""
    model = _constant_unit(recurrent_model("GRU", linear_before_reset=1), unit=4)
    calib = {"x": np.random.default_rng(2).standard_normal((63, T, FEATURES)).astype(np.float32)}
    for options in ({"criterion": "variance", "reconstruct_target": "self"}, {}):
        result = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=calib, round_to=1, **options)
        assert _hidden_size(result.model, "GRU") == HIDDEN - 1
        assert_equivalent(model, result.model, _feeds(), rtol=1e-4, atol=1e-4)

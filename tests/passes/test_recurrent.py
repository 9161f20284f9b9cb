"""LSTM, GRU and RNN layers: their MACs are counted, and the channels that feed them prune through their input
weight W (its columns go; SNP's reconstruction and bias shift fold into W and the input half of B). Planted
zero and duplicate channels in front of each are removed exactly: magnitude drops the zero ones, SNP both."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.calibration.shapes import count_cost
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

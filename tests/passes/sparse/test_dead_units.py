"""dead-units: exact removal of planted dead (zero outgoing) and constant (zero incoming) units in
hand-written and torch-exported MLPs and CNNs, residual groups where only some members are dead (kept),
constants through unsupported chains or padded convolutions (kept, with the reason), idempotence.

Every rewritten model is compared with the original in onnxruntime (optimisations off) to 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import assert_equivalent, init, random_inputs, run_pass, tiny, weights

try:
    import torch
    from torch import nn

    from graphopt.torch.export import export_onnx
except ImportError:
    torch = None  # type: ignore[assignment]


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def dead_units(model: onnx.ModelProto, shape: tuple[int, ...]):
    name = model.graph.input[0].name
    return run_pass(model, "dead-units", input_shapes={name: shape})


def mlp(activation: str = "Relu") -> onnx.ModelProto:
    """x[4] -> Gemm(6) -> act -> Gemm(5) -> act -> Gemm(3): units planted in the hidden layers."""
    w1, b1 = weights(6, 4, seed=1), weights(6, seed=2)
    w2, b2 = weights(5, 6, seed=3), weights(5, seed=4)
    w3, b3 = weights(3, 5, seed=5), weights(3, seed=6)
    w1[1], b1[1] = 0, 0.75      # constant 0.75 after Relu: folded into Gemm 2
    w1[4], b1[4] = 0, -0.5      # constant 0 after Relu: removed
    w2[:, 3] = 0                # hidden-1 unit 3 read by nobody: removed
    w2[2] = 0                   # hidden-2 unit 2 constant act(b2[2]): folded into Gemm 3
    inits = ", ".join(init(n, v) for n, v in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)])
    body = f"""h1 = Gemm <transB = 1> (x, w1, b1)
a1 = {activation} (h1)
h2 = Gemm <transB = 1> (a1, w2, b2)
a2 = {activation} (h2)
y = Gemm <transB = 1> (a2, w3, b3)"""
    return tiny(body, inputs="float[N, 4] x", outputs="float[N, 3] y", inits=inits)


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "Shrink"])
def test_mlp_planted_units_removed_exactly(activation: str) -> None:
    model = mlp(activation)
    new, result = dead_units(model, (1, 4))
    assert_equivalent(model, new, random_inputs(model, batch=5))
    shapes = shapes_of(new)
    assert shapes["w1"][0] == 3  # units 1 and 4 constant (folded), 3 dead
    assert shapes["w2"] == (4, shapes["w1"][0])
    assert shapes["w3"] == (3, 4)
    assert result.stats["constants_folded"] >= 2


def test_history_says_dead_or_constant_in_the_numbering_before_the_pass() -> None:
    new, result = dead_units(mlp(), (1, 4))
    by_producer = {next(m for m in e["members"] if m.endswith(":producer")): e for e in result.history}
    gemms = [node.name for node in new.graph.node if node.op_type == "Gemm"]  # named by the pass
    first, second = (by_producer[f"{name}:producer"] for name in gemms[:2])
    assert (first["removed"], first["reasons"]) == ([1, 3, 4], ["constant", "dead", "constant"])
    assert (second["removed"], second["reasons"]) == ([2], ["constant"])
    assert all(e["by"] == "dead-units" and e["criterion"] == "zero_weights" and "scores" not in e
               for e in result.history)
    assert (first["size"], first["kept"], second["size"], second["kept"]) == (6, 3, 5, 4)


def test_history_maps_later_rounds_back_to_the_original_channels() -> None:
    """Round 1 removes hidden-1 unit 3 and hidden-2 unit 1; hidden-1 unit 5, read only by hidden-2 unit 1,
    is dead only then (round 2, where it is unit 4)."""
    w1, b1 = weights(6, 4, seed=1), weights(6, seed=2)
    w2, b2 = weights(5, 6, seed=3), weights(5, seed=4)
    w3, b3 = weights(3, 5, seed=5), weights(3, seed=6)
    w2[:, 3] = 0
    w2[:, 5] = 0
    w2[1, 5] = 1.5
    w3[:, 1] = 0
    inits = ", ".join(init(n, v) for n, v in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)])
    body = """[g1] h1 = Gemm <transB = 1> (x, w1, b1)
a1 = Tanh (h1)
[g2] h2 = Gemm <transB = 1> (a1, w2, b2)
a2 = Tanh (h2)
[g3] y = Gemm <transB = 1> (a2, w3, b3)"""
    model = tiny(body, inputs="float[N, 4] x", outputs="float[N, 3] y", inits=inits)
    new, result = dead_units(model, (1, 4))
    assert_equivalent(model, new, random_inputs(model, batch=5))
    assert result.stats["rounds"] >= 3 and shapes_of(new)["w1"] == (4, 4)
    by_producer = {next(m for m in e["members"] if m.endswith(":producer")): e for e in result.history}
    assert (by_producer["g1:producer"]["removed"], by_producer["g1:producer"]["reasons"]) == ([3, 5], ["dead"] * 2)
    assert (by_producer["g2:producer"]["removed"], by_producer["g2:producer"]["reasons"]) == ([1], ["dead"])


def test_idempotent() -> None:
    model = mlp()
    once, first = dead_units(model, (1, 4))
    twice, second = dead_units(once, (1, 4))
    assert first.modified and not second.modified
    assert [n.SerializeToString() for n in twice.graph.node] == [n.SerializeToString() for n in once.graph.node]
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in twice.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in once.graph.initializer}


def test_nothing_planted_nothing_changes() -> None:
    body = "h = Gemm <transB = 1> (x, w1, b1)\na = Relu (h)\ny = Gemm <transB = 1> (a, w2, b2)"
    inits = ", ".join(init(n, v) for n, v in [("w1", weights(6, 4)), ("b1", weights(6, seed=1)),
                                               ("w2", weights(3, 6, seed=2)), ("b2", weights(3, seed=3))])
    model = tiny(body, inputs="float[N, 4] x", outputs="float[N, 3] y", inits=inits)
    new, result = dead_units(model, (1, 4))
    assert not result.modified and result.stats["units_removed"] == 0


def conv_chain(consumer_pads: int, bias: float, activation: str = "Relu") -> onnx.ModelProto:
    """Conv(3->4) -> act -> Conv(4->2, k=2*pads+1, pads): channel 2 of the first conv is constant."""
    kernel = 2 * consumer_pads + 1
    w1, b1 = weights(4, 3, 3, 3), weights(4, seed=1)
    w1[2], b1[2] = 0, bias
    inits = ", ".join(init(n, v) for n, v in [("w1", w1), ("b1", b1), ("w2", weights(2, 4, kernel, kernel, seed=2)),
                                               ("b2", weights(2, seed=3))])
    pads = ", ".join([str(consumer_pads)] * 4)
    body = f"""h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
a = {activation} (h)
y = Conv <pads = [{pads}]> (a, w2, b2)"""
    return tiny(body, outputs="float[N, 2, 8, 8] y", inits=inits)


@pytest.mark.parametrize(("pads", "bias", "removed"), [(0, 0.6, True), (1, -0.6, True), (1, 0.6, False)])
def test_conv_constant_channel_and_padding(pads: int, bias: float, removed: bool) -> None:
    model = conv_chain(pads, bias)
    new, result = dead_units(model, (1, 3, 8, 8))
    assert_equivalent(model, new, random_inputs(model, batch=2))
    assert shapes_of(new)["w1"][0] == (3 if removed else 4)
    if not removed:
        assert any("zero padding in Conv" in reason for reason in result.skipped), result.skipped


def test_unsupported_chain_left_alone_with_reason() -> None:
    model = conv_chain(0, 0.6, activation="Softsign")
    new, result = dead_units(model, (1, 3, 8, 8))
    assert not result.modified
    assert shapes_of(new)["w1"][0] == 4
    assert any("not evaluated through Softsign" in reason for reason in result.skipped), result.skipped


def residual(zero_in_both: bool) -> onnx.ModelProto:
    """Conv_a(x) + Conv_b(x) -> Relu -> Conv_c (1x1): channel 1 has zero weights in Conv_a (and Conv_b)."""
    wa, wb = weights(4, 3, 1, 1, seed=1), weights(4, 3, 1, 1, seed=2)
    wa[1] = 0
    if zero_in_both:
        wb[1] = 0
    inits = ", ".join(init(n, v) for n, v in [("wa", wa), ("ba", weights(4, seed=3)), ("wb", wb),
                                               ("bb", np.abs(weights(4, seed=4)) + 0.1),
                                               ("wc", weights(2, 4, 1, 1, seed=5)), ("bc", weights(2, seed=6))])
    body = """a = Conv (x, wa, ba)
b = Conv (x, wb, bb)
s = Add (a, b)
r = Relu (s)
y = Conv (r, wc, bc)"""
    return tiny(body, outputs="float[N, 2, 8, 8] y", inits=inits)


@pytest.mark.parametrize("zero_in_both", [False, True])
def test_residual_group_needs_every_member(zero_in_both: bool) -> None:
    model = residual(zero_in_both)
    new, result = dead_units(model, (1, 3, 8, 8))
    assert_equivalent(model, new, random_inputs(model, batch=2))
    assert shapes_of(new)["wa"][0] == shapes_of(new)["wb"][0] == (3 if zero_in_both else 4)
    assert result.modified == zero_in_both


def test_batchnorm_chain_and_dead_output() -> None:
    """Constant through an unfolded BatchNormalization; a channel nobody reads (zero consumer column)."""
    w1, b1 = weights(4, 3, 1, 1), weights(4, seed=1)
    w1[0] = 0
    w2 = weights(2, 4, 1, 1, seed=2)
    w2[:, 3] = 0
    inits = ", ".join([init("w1", w1), init("b1", b1), init("w2", w2), init("b2", weights(2, seed=3)),
                       init("s", [1.5, -0.5, 2.0, 1.0]), init("t", [0.1, 0.2, 0.3, 0.4]),
                       init("m", [0.3, 0.0, -0.2, 0.1]), init("v", [0.5, 1.0, 2.0, 1.5])])
    body = """h = Conv (x, w1, b1)
n = BatchNormalization (h, s, t, m, v)
a = Sigmoid (n)
y = Conv (a, w2, b2)"""
    model = tiny(body, outputs="float[N, 2, 8, 8] y", inits=inits)
    new, result = dead_units(model, (1, 3, 8, 8))
    assert_equivalent(model, new, random_inputs(model, batch=2))
    assert shapes_of(new)["w1"][0] == 2 and result.stats["constants_folded"] == 1


class PlantedCNN(nn.Module if torch is not None else object):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.sigmoid(self.fc1(x)))


def planted_cnn() -> "nn.Module":
    torch.manual_seed(0)
    model = PlantedCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.bias.uniform_(-1, 1)
        model.conv1.weight[2] = 0       # constant through BN and Relu, read by a 1x1 conv: folded
        model.conv2.weight[:, 5] = 0    # conv1 channel 5 read by nobody
        model.conv2.weight[1] = 0       # constant through Relu, MaxPool and Flatten into fc1: folded
        model.fc1.weight[3] = 0         # constant Sigmoid(b): folded into fc2
        model.fc2.weight[:, 7] = 0      # fc1 unit 7 read by nobody
    return model.eval()


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("fold_bn", [True, False])
def test_torch_exported(exporter: str, fold_bn: bool, tmp_path) -> None:
    if exporter == "dynamo" and not fold_bn:
        pytest.skip("one dynamo export is enough for the time budget")
    path = export_onnx(planted_cnn(), torch.randn(1, 3, 8, 8), tmp_path / "cnn.onnx", exporter=exporter,
                       opset=17, fold_bn=fold_bn)
    model = onnx.load(str(path))
    new, result = dead_units(model, (1, 3, 8, 8))
    assert_equivalent(model, new, random_inputs(model, batch=3))
    assert result.stats["units_removed"] == 5 and result.stats["constants_folded"] == 3


def test_channels_a_grouped_convolution_reads_are_not_dead() -> None:
    # x -> Conv(2 -> 8) -> t, read by a grouped Conv (2 groups of 4; channel p of group 1 is coupled with p + 4)
    # and by a plain 1x1 Conv. Pair (1, 5): unread by either, dead. Pair (3, 7): its plain-consumer columns are
    # zero but the grouped convolution reads it, so it stays (it was once removed, changing the output).
    w1, b1 = weights(8, 2, 1, 1, seed=1), weights(8, seed=2)
    grouped, bg = weights(4, 4, 1, 1, seed=3), weights(4, seed=4)
    plain, bp = weights(3, 8, 1, 1, seed=5), weights(3, seed=6)
    grouped[:, 1] = 0
    plain[:, [1, 5, 3, 7]] = 0
    inits = ", ".join(init(n, v) for n, v in [("w1", w1), ("b1", b1), ("wg", grouped), ("bg", bg), ("wp", plain),
                                               ("bp", bp)])
    body = """t = Conv (x, w1, b1)
g = Conv <group = 2> (t, wg, bg)
p = Conv (t, wp, bp)
y = Concat <axis = 1> (g, p)"""
    model = tiny(body, inputs="float[N, 2, 5, 5] x", outputs="float[N, 7, 5, 5] y", inits=inits)
    new, result = dead_units(model, (1, 2, 5, 5))
    assert_equivalent(model, new, random_inputs(model, batch=3))
    assert shapes_of(new)["w1"][0] == 6 and shapes_of(new)["wg"][1] == 3  # only the unread pair went

"""CoB on residual TSRA networks: one rotation shared by every writer into an Add-joined stream, folded into
all writers and readers; exact alone from both exporters, pruned with budgets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from sklearn.datasets import load_digits

import graphopt
from tests.conftest import assert_equivalent, run_ort

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graphopt.torch.export import export_onnx  # noqa: E402
from graphopt.torch.tsra import TSRA, RMSNorm  # noqa: E402

CHANNELS, SPLIT = 12, 7


class Block(nn.Module):
    """x + outer(TSRA(RMSNorm(inner(x)))): a residual block joined by Add."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        make = (lambda: nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)) if conv else (lambda: nn.Linear(CHANNELS, CHANNELS))
        self.inner, self.norm, self.act, self.outer = make(), RMSNorm(), TSRA(4), make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(self.act(self.norm(self.inner(x))))


class Residual(nn.Module):
    """stem -> RMSNorm -> TSRA -> blocks -> RMSNorm (-> mean over H, W) -> Linear; `stem=False` feeds the
    input into the stream directly (a join no rotatable layer writes)."""

    def __init__(self, conv: bool, blocks: int = 2, stem: bool = True) -> None:
        super().__init__()
        inputs = 1 if conv else 64
        self.conv = conv
        self.stem = (nn.Conv2d(inputs, CHANNELS, 3, padding=1) if conv else nn.Linear(inputs, CHANNELS)) if stem else None
        self.stem_norm, self.stem_act = RMSNorm(), TSRA(SPLIT)
        self.blocks = nn.Sequential(*[Block(conv) for _ in range(blocks)])
        self.norm, self.head = RMSNorm(), nn.Linear(CHANNELS, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.stem_act(self.stem_norm(self.stem(x))) if self.stem is not None else x
        stream = self.norm(self.blocks(stream))
        return self.head(stream.mean(dim=(2, 3)) if self.conv else stream)


def _data(conv: bool, count: int = 96) -> np.ndarray:
    images = (load_digits().data[:count] / 16.0).astype(np.float32)
    return images.reshape(-1, 1, 8, 8) if conv else images


def _export(module: nn.Module, conv: bool, exporter: str, tmp_path) -> onnx.ModelProto:
    path = export_onnx(module.eval(), torch.tensor(_data(conv, 2)), tmp_path / f"{exporter}.onnx", exporter=exporter,
                       opset=17)
    return onnx.load(path)


def _cob(model: onnx.ModelProto, conv: bool, **options: object) -> tuple[graphopt.api.OptimizeResult, dict]:
    result = graphopt.optimize(model, method="cob", calib={"input": _data(conv)}, **options)
    return result, result.report["passes"][-1]


def _plant(module: Residual, ranks: tuple[int, int], seed: int = 0) -> None:
    """Every writer into the stream writes only into span(blockdiag(P_U, P_V)) (P_U: `ranks[0]` directions
    of the stem TSRA's U, P_V: `ranks[1]` of its V), so the stream has exactly that many non-zero
    rotated coordinates."""
    generator = torch.Generator().manual_seed(seed)
    projector = torch.zeros(CHANNELS, CHANNELS)
    for (low, high), rank in zip(((0, SPLIT), (SPLIT, CHANNELS)), ranks):
        basis, _ = torch.linalg.qr(torch.randn(high - low, rank, generator=generator))
        projector[low:high, low:high] = basis @ basis.T
    with torch.no_grad():
        for layer in [module.stem, *(block.outer for block in module.blocks)]:
            layer.weight.copy_((projector @ layer.weight.reshape(CHANNELS, -1)).reshape(layer.weight.shape))
            layer.bias.copy_(projector @ layer.bias)


def _out_channels(model: onnx.ModelProto, reads_input: bool) -> list[int]:
    """Output channels of the producers that read the model input (the stem)."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [weights[n.input[1]][0 if n.op_type == "Conv" else -1] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and (n.input[0] == "input") == reads_input and n.input[1] in weights]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("conv", [True, False], ids=["cnn", "mlp"])
def test_rotation_alone_is_exact_on_residual_networks_from_both_exporters(conv: bool, exporter: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _export(Residual(conv), conv, exporter, tmp_path)
    result, passed = _cob(model, conv)
    stats = passed["stats"]
    assert stats["residual_groups"] == 1 and stats["chains"] == 3, passed["skipped"]  # the stream and two inner chains
    assert stats["chains_rotated"] == 3, passed["skipped"]
    assert not any("(Add)" in reason or "(ReduceMean)" in reason for reason in passed["skipped"]), passed["skipped"]
    assert_equivalent(model, result.model, {"input": _data(conv)})


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_zero_energy_stream_dimensions_are_pruned_exactly_in_every_writer_and_reader(exporter: str, tmp_path) -> None:
    torch.manual_seed(1)
    module = Residual(conv=True)
    _plant(module, (3, 2))
    model = _export(module, True, exporter, tmp_path)
    result, passed = _cob(model, True, keep_variance=1.0, round_to=1)
    assert _out_channels(result.model, True) == [5], passed["skipped"]  # the stream keeps 3 + 2 coordinates
    weights = {t.name: t.dims for t in result.model.graph.initializer}
    blocks = [weights[n.input[1]] for n in result.model.graph.node if n.op_type == "Conv" and n.input[0] != "input"]
    assert [dims[0] for dims in blocks].count(5) >= 2 and [dims[1] for dims in blocks].count(5) >= 2  # writers, readers
    split = [a.i for n in result.model.graph.node if n.op_type == "TSRA" for a in n.attribute if a.name == "split"]
    assert 3 in split, split  # the stem TSRA's U keeps its 3 planted directions
    assert_equivalent(model, result.model, {"input": _data(True)})
    again, passed = _cob(result.model, True, keep_variance=1.0, round_to=1)
    assert passed["stats"]["channels_removed"] == 0


def test_a_budget_cuts_the_residual_stream_and_is_met(tmp_path) -> None:
    torch.manual_seed(2)
    model = _export(Residual(conv=True), True, "legacy", tmp_path)
    result, passed = _cob(model, True, target_macs=0.6, round_to=1)
    assert result.report["macs_ratio"] <= 0.6 + 0.01
    assert _out_channels(result.model, True)[0] < CHANNELS, passed["history"]  # the stream itself was cut
    stream = [entry for entry in passed["history"] if entry["size"] in (SPLIT, CHANNELS - SPLIT)]
    assert stream and all(entry["basis"] == "rotated" for entry in stream)
    logits = run_ort(result.model, {"input": _data(True)})["output"]
    assert logits.shape == (96, 10) and np.isfinite(logits).all()


def test_a_join_with_the_graph_input_declines_the_stream_and_names_it(tmp_path) -> None:
    torch.manual_seed(3)
    module = Residual(conv=False, blocks=1, stem=False)
    module.blocks[0].inner = nn.Linear(64, 64)  # the stream is the 64 input features
    module.blocks[0].outer = nn.Linear(64, 64)
    module.head = nn.Linear(64, 10)
    model = _export(module, False, "legacy", tmp_path)
    result, passed = _cob(model, False)
    assert any("which no rotatable layer writes" in reason for reason in passed["skipped"]), passed["skipped"]
    assert passed["stats"]["residual_groups"] == 0 and passed["stats"]["chains_rotated"] == 1  # the inner chain
    assert_equivalent(model, result.model, {"input": _data(False)})


class WeightedRMSNorm(nn.Module):
    """g ⊙ x / sqrt(mean(x², -1) + eps): an RMS norm with a learned gain over the last axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class PreNorm(nn.Module):
    """Token-major pre-norm stream: embed, two blocks x + down(TSRA(up(norm(x)))), norm, head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norms = nn.ModuleList([WeightedRMSNorm(dim) for _ in range(3)])
        self.ups = nn.ModuleList([nn.Linear(dim, 24) for _ in range(2)])
        self.acts = nn.ModuleList([TSRA(10, dim=-1) for _ in range(2)])
        self.downs = nn.ModuleList([nn.Linear(24, dim) for _ in range(2)])
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.embed(x)
        for norm, up, act, down in zip(self.norms, self.ups, self.acts, self.downs):
            stream = stream + down(act(up(norm(stream))))
        return self.head(self.norms[2](stream))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_weighted_norm_gains_are_folded_into_readers_and_the_stream_rotates(exporter: str, tmp_path) -> None:
    torch.manual_seed(4)
    tokens = np.random.default_rng(0).standard_normal((32, 5, 8)).astype(np.float32)
    path = export_onnx(PreNorm().eval(), torch.tensor(tokens[:2]), tmp_path / f"{exporter}.onnx", exporter=exporter,
                       opset=17)
    model = onnx.load(path)
    result = graphopt.optimize(model, method="cob", calib={"input": tokens})
    stats = result.report["passes"][-1]["stats"]
    assert stats["rms_gains_folded"] == 3, result.report["passes"][-1]["skipped"]
    assert stats["residual_groups"] == 1 and stats["chains_rotated"] == 3, result.report["passes"][-1]["skipped"]
    assert_equivalent(model, result.model, {"input": tokens})


def _gain_model(also_relu: bool) -> onnx.ModelProto:
    """x -> Gemm -> graphopt.RMSNorm -> Mul(g) -> Gemm (and, with `also_relu`, -> Relu -> Gemm)."""
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.ops.library import ensure_functions
    from graphopt.ops.rms_norm import make_rms_norm_node

    rng = np.random.default_rng(5)
    values = {"w1": rng.standard_normal((16, 64)) * 0.3, "b1": rng.standard_normal(16) * 0.1,
              "g": rng.uniform(0.5, 1.5, 16), "w2": rng.standard_normal((10, 16)) * 0.3, "b2": np.zeros(10),
              "w3": rng.standard_normal((10, 16)) * 0.3}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             make_rms_norm_node("h", "n", 16, name="norm"), helper.make_node("Mul", ["n", "g"], ["m"], name="gain"),
             helper.make_node("Gemm", ["m", "w2", "b2"], ["y"], name="fc2", transB=1)]
    if also_relu:
        nodes += [helper.make_node("Relu", ["m"], ["r"], name="relu"),
                  helper.make_node("Gemm", ["r", "w3"], ["z"], name="fc3", transB=1),
                  helper.make_node("Add", ["y", "z"], ["out"], name="sum")]
    last = "out" if also_relu else "y"
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "gain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items() if k in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ensure_functions(model)
    return model


def test_a_gain_is_folded_only_when_every_reader_is_linear() -> None:
    data = {"x": _data(False)}
    folded = graphopt.optimize(_gain_model(False), method="cob", calib=data)
    stats = folded.report["passes"][-1]["stats"]
    assert stats["rms_gains_folded"] == 1 and stats["chains_rotated"] == 1
    assert "Mul" not in [node.op_type for node in folded.model.graph.node]
    assert_equivalent(_gain_model(False), folded.model, data)
    kept = graphopt.optimize(_gain_model(True), method="cob", calib=data)
    passed = kept.report["passes"][-1]
    assert passed["stats"]["rms_gains_folded"] == 0 and passed["stats"]["chains"] == 0
    assert any("fc1 -> gain (Mul): per-channel scale" in reason for reason in passed["skipped"]), passed["skipped"]
    assert_equivalent(_gain_model(True), kept.model, data)

"""CoB on a transformer's residual stream: a pre-norm decoder (token embedding, weighted RMSNorm, rotary
grouped-query attention, SwiGLU, final norm and LM head) from both torch exporters. The embedding table,
every output and down projection write the stream; every q/k/v, gate/up projection and the head read it
through the norms, whose gains are folded into them. One rotation of the whole stream is exact; slicing
it drops hidden dimensions everywhere; `cob,snp` spends one budget on the rotated stream and SNP's groups."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.calibration.session import make_session

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

VOCAB, DIM, HEADS, KV_HEADS, FFN, LAYERS, TOKENS = 40, 32, 4, 2, 48, 2, 12


class RMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        head_dim = DIM // HEADS
        self.input_norm, self.ffn_norm = RMSNorm(), RMSNorm()
        self.q = nn.Linear(DIM, DIM, bias=False)
        self.k, self.v = (nn.Linear(DIM, KV_HEADS * head_dim, bias=False) for _ in range(2))
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.gate, self.up = nn.Linear(DIM, FFN, bias=False), nn.Linear(DIM, FFN, bias=False)
        self.down = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        head_dim, group = DIM // HEADS, HEADS // KV_HEADS
        h = self.input_norm(x)
        q = self.q(h).view(batch, tokens, HEADS, head_dim).transpose(1, 2)
        k = self.k(h).view(batch, tokens, KV_HEADS, head_dim).transpose(1, 2)
        v = self.v(h).view(batch, tokens, KV_HEADS, head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = (t[:, :, None].expand(batch, KV_HEADS, group, tokens, head_dim).reshape(batch, HEADS, tokens, head_dim)
                for t in (k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + bias
        x = x + self.o(torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, tokens, DIM))
        h = self.ffn_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.head = RMSNorm(), nn.Linear(DIM, VOCAB, bias=False)
        head_dim = DIM // HEADS
        self.register_buffer("inverse", 1.0 / 100.0 ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        positions = torch.arange(ids.shape[1])
        angles = positions[:, None].float() * self.inverse[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        bias = torch.where(positions[None, :] > positions[:, None], -1e4, 0.0)
        for block in self.blocks:
            x = block(x, angles.cos(), angles.sin(), bias)
        return self.head(self.norm(x))


def _build(rank: int | None = None) -> Decoder:
    """The decoder; with `rank`, every writer into the stream writes into one `rank`-dimensional subspace
    (so the stream has exactly DIM - rank rotated coordinates of zero energy)."""
    torch.manual_seed(0)
    module = Decoder().eval()
    if rank is not None:
        basis, _ = torch.linalg.qr(torch.randn(DIM, rank))
        projector = basis @ basis.T
        with torch.no_grad():
            module.embed.weight.copy_(module.embed.weight @ projector)
            for block in module.blocks:
                block.o.weight.copy_(projector @ block.o.weight)
                block.down.weight.copy_(projector @ block.down.weight)
    return module


def _export(module: nn.Module, exporter: str, path: Path) -> onnx.ModelProto:
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    if exporter == "legacy":
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(module, (ids,), str(path), dynamo=False, opset_version=17, input_names=["input_ids"],
                          output_names=["logits"], dynamic_axes={"input_ids": axes, "logits": axes})
    else:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
        program = torch.onnx.export(module, (ids,), dynamo=True, opset_version=18, verbose=False,
                                    input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes=({0: batch, 1: sequence},))
        program.save(str(path))
    return onnx.load(str(path))


def _ids(count: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, VOCAB, size=(count, tokens)).astype(np.int64)}


def _run(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(model).run(None, data)[0]


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _table(model: onnx.ModelProto) -> np.ndarray:
    """The embedding table (the only [VOCAB, *] initializer read by a Gather)."""
    gathered = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                if t.name in gathered and len(t.dims) == 2 and t.dims[0] == VOCAB)


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def exporter(request) -> str:
    return request.param


def test_rotating_the_residual_stream_is_exact(exporter, tmp_path) -> None:
    model = _export(_build(), exporter, tmp_path / "m.onnx")
    result = graphopt.optimize(model, method="cob", calib=_ids(32, TOKENS, 1))
    stats = result.report["passes"][-1]["stats"]
    assert stats["residual_groups"] == 1 and stats["rms_gains_folded"] == 2 * LAYERS + 1
    assert not np.allclose(_table(result.model), _table(model))  # the embedding writes the rotated stream
    held_out = _ids(4, 17, 2)  # another batch and sequence length: the axes stay dynamic
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4


def test_a_low_rank_stream_is_sliced_exactly(exporter, tmp_path) -> None:
    rank = 20
    model = _export(_build(rank), exporter, tmp_path / "m.onnx")
    result = graphopt.optimize(model, method="cob", calib=_ids(32, TOKENS, 1), keep_variance=1.0, round_to=1)
    assert _table(result.model).shape == (VOCAB, rank)
    matmuls = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if len(t.dims) == 2]
    assert sum(w.shape[0] == rank for w in matmuls) >= 5 * LAYERS + 1  # q, k, v, gate, up per layer; the head
    held_out = _ids(3, 9, 2)
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4
    assert result.report["macs_ratio"] < 0.8


def test_cob_then_snp_spend_one_budget(exporter, tmp_path) -> None:
    model = _export(_build(), exporter, tmp_path / "m.onnx")
    calib, held_out = _ids(64, TOKENS, 1), _ids(8, TOKENS, 2)
    result = graphopt.optimize(model, method="cob,snp", calib=calib, target_macs=0.6, round_to=1)
    cob, snp = (next(p for p in result.report["passes"] if p["pass"] == name) for name in ("cob", "snp"))
    assert cob["stats"]["budget_deferred"] == 1 and cob["stats"]["channels_removed"] == 0
    assert 0.58 <= result.report["macs_ratio"] <= 0.612  # one budget: not 0.6 twice over
    writers = [sum(str(m).endswith(":producer") for m in entry["members"]) for entry in snp["history"]]
    assert 1 + 2 * LAYERS in writers, "SNP's budget never reached the rotated stream"  # embedding, o and down
    assert _table(result.model).shape[1] < DIM
    alone = graphopt.optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1)
    reference = _run(model, held_out)
    assert _relative(reference, _run(result.model, held_out)) < _relative(reference, _run(alone.model, held_out))


class LayerNormBlock(nn.Module):
    """GPT-2/ViT style: LayerNorm with scale and shift, attention and GELU FFN with biases; `post` puts the norms
    after the residual Adds (BERT style), on the stream itself."""

    def __init__(self, post: bool, fused: bool = True) -> None:
        super().__init__()
        self.post = post
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM) if fused else None
        self.q, self.k, self.v = (None, None, None) if fused else (nn.Linear(DIM, DIM) for _ in range(3))
        self.o = nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, FFN), nn.Linear(FFN, DIM)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = h.shape
        parts = self.qkv(h).chunk(3, dim=-1) if self.qkv is not None else (self.q(h), self.k(h), self.v(h))
        q, k, v = (t.view(batch, tokens, HEADS, DIM // HEADS).transpose(1, 2) for t in parts)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        return self.o(torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, tokens, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.norm1(x + self._attend(x))
            return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))
        x = x + self._attend(self.norm1(x))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class LayerNormModel(nn.Module):
    def __init__(self, post: bool, fused: bool = True) -> None:
        super().__init__()
        self.embed, self.positions = nn.Embedding(VOCAB, DIM), nn.Embedding(64, DIM)
        self.blocks = nn.ModuleList(LayerNormBlock(post, fused) for _ in range(LAYERS))
        self.norm, self.head = (nn.Identity() if post else nn.LayerNorm(DIM)), nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.positions(torch.arange(ids.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("post", [False, True], ids=["pre-norm", "post-norm"])
def test_layer_norm_streams_are_centred_and_rotated_exactly_when_pre_norm(exporter, post, tmp_path) -> None:
    torch.manual_seed(0)
    model = _export(LayerNormModel(post).eval(), exporter, tmp_path / "m.onnx")
    result = graphopt.optimize(model, method="cob", calib=_ids(32, TOKENS, 1))
    stats = result.report["passes"][-1]["stats"]
    held_out = _ids(4, 17, 2)
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4
    if post:  # without a budget the post-norm shortcuts are not opened (they would only add MACs)
        assert stats["layer_norms_centred"] == 0 and stats["residual_groups"] == 0
        assert stats["post_norm_shortcuts"] == 0
        return
    assert stats["layer_norms_centred"] == 2 * LAYERS + 1 and stats["residual_groups"] == 1
    assert not any(node.op_type == "LayerNormalization" for node in result.model.graph.node)
    sliced = graphopt.optimize(model, method="cob", calib=_ids(32, TOKENS, 1), target_macs=0.8, round_to=1)
    assert _table(sliced.model).shape[1] < DIM and sliced.report["macs_ratio"] <= 0.81


@pytest.mark.parametrize("post", [False, True], ids=["pre-norm", "post-norm"])
def test_a_stream_fused_by_onnxruntimes_optimizer_rotates_exactly(post, tmp_path) -> None:
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    torch.manual_seed(0)
    _export(LayerNormModel(post=post).eval(), "legacy", tmp_path / "m.onnx")
    fused = optimizer.optimize_model(str(tmp_path / "m.onnx"), model_type="bert", num_heads=HEADS, hidden_size=DIM,
                                     opt_level=0).model
    assert any(node.op_type == "SkipLayerNormalization" for node in fused.graph.node)
    budget = {"keep_variance": 1.0, "round_to": 1} if post else {}  # post-norm shortcuts open under a budget
    result = graphopt.optimize(fused, method="cob", calib=_ids(32, TOKENS, 1), **budget)
    stats = result.report["passes"][-1]["stats"]
    assert stats["fused_norms_split"] >= LAYERS
    if post:
        assert stats["post_norm_shortcuts"] == stats["layer_norms_centred"] == 2 * LAYERS
        assert stats["residual_groups"] == 2 * LAYERS + 1
    else:
        assert stats["residual_groups"] == 1 and stats["layer_norms_centred"] == 2 * LAYERS + 1
    held_out = _ids(4, 17, 2)
    assert _relative(_run(fused, held_out), _run(result.model, held_out)) < 1e-4


@pytest.mark.parametrize("qk", [False, True], ids=["heads", "heads+qk"])
def test_the_budget_counts_heads_and_qk_dims_cut_from_a_narrowed_stream_exactly(qk, tmp_path) -> None:
    # a head (or a q/k dim) removed after the stream it reads was narrowed saves the narrowed MACs only
    torch.manual_seed(0)
    model = _export(LayerNormModel(post=False, fused=False).eval(), "legacy", tmp_path / "m.onnx")
    both = 0
    for target in (0.6, 0.45, 0.3):
        result = graphopt.optimize(model, method="cob,snp", calib=_ids(64, TOKENS, 1), target_macs=target,
                                   round_to=1, qk_dims=qk)
        stats = next(p for p in result.report["passes"] if p["pass"] == "snp")["stats"]
        assert stats["estimated_macs_ratio"] == pytest.approx(result.report["macs_ratio"], abs=1e-9)
        both += stats.get("heads_removed", 0) + stats.get("qk_dims_removed", 0) > 0 and _table(result.model).shape[1] < DIM
    assert both, "no run cut heads (or q/k dims) and the stream together"


def test_post_norm_shortcuts_open_so_every_segment_rotates_exactly(exporter, tmp_path) -> None:
    # BERT-style blocks LN(x + f(x)): each shortcut becomes a linear layer, each LayerNorm a centred RMS norm, and
    # each stream segment between two norms a rotated group of its own; nothing is cut at keep_variance 1.0
    torch.manual_seed(0)
    model = _export(LayerNormModel(post=True).eval(), exporter, tmp_path / "m.onnx")
    result = graphopt.optimize(model, method="cob", calib=_ids(64, TOKENS, 1), keep_variance=1.0, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["post_norm_shortcuts"] == 2 * LAYERS and stats["layer_norms_centred"] == 2 * LAYERS
    assert stats["residual_groups"] == 2 * LAYERS + 1  # the embedding sum and the input of every norm
    assert not any(node.op_type == "LayerNormalization" for node in result.model.graph.node)
    held_out = _ids(4, 17, 2)
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4
    assert result.report["macs_ratio"] > 1.0  # the shortcuts' MACs, paid back only by slicing


@pytest.mark.parametrize("method,target", [("cob", 0.8), ("cob,snp", 0.6)])
def test_post_norm_budgets_count_the_shortcuts_they_add(method, target, tmp_path) -> None:
    # the target is a fraction of the given model's MACs, whose shortcuts were no MatMuls
    torch.manual_seed(0)
    model = _export(LayerNormModel(post=True).eval(), "legacy", tmp_path / "m.onnx")
    result = graphopt.optimize(model, method=method, calib=_ids(128, TOKENS, 1), target_macs=target, round_to=1)
    assert target - 0.02 <= result.report["macs_ratio"] <= target + 0.005
    estimate = result.report["passes"][-1]["stats"]["estimated_macs_ratio"]
    assert estimate == pytest.approx(result.report["macs_ratio"], abs=0.01)
    assert _table(result.model).shape[1] < DIM  # the first segment (the embeddings) was sliced


class UnwrittenSum(nn.Module):
    """Two post-norm blocks: the second residual sum adds a GELU's output, a writer no rotation passes, so its
    shortcut stays closed; the first shortcut opens (the embedding stream it reads is rotatable), and the first
    norm, centred, keeps its gain and shift (the closed sum reads its output)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.first, self.second = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.embed(ids) + self.first(self.embed(ids)))
        x = self.norm2(x + nn.functional.gelu(self.second(x)))
        return self.head(x)


def test_a_post_norm_sum_with_a_nonlinear_writer_keeps_its_shortcut(tmp_path) -> None:
    torch.manual_seed(0)
    model = _export(UnwrittenSum().eval(), "legacy", tmp_path / "m.onnx")
    result = graphopt.optimize(model, method="cob", calib=_ids(64, TOKENS, 1), keep_variance=1.0, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["post_norm_shortcuts"] == 1 and stats["layer_norms_centred"] == 1
    held_out = _ids(4, 17, 2)
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4


@pytest.mark.parametrize("method", ["snp", "cob", "cob,snp"])
def test_the_written_norms_run_as_onnxruntimes_fused_kernel(exporter, method, tmp_path) -> None:
    """Every RMS norm of the written model reaches onnxruntime as its one fused kernel, also over a sliced
    stream (graphopt.ops.lower)."""
    import onnxruntime as ort

    model = _export(_build(), exporter, tmp_path / "m.onnx")
    result = graphopt.optimize(model, method=method, calib=_ids(32, TOKENS, 1), target_macs=0.7, round_to=1)
    assert not any(n.domain == "graphopt" for n in result.model.graph.node) and not result.model.functions
    fused = []
    for index, written in enumerate((model, result.model)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimized{index}.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(written.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
        fused.append(ops.count("SimplifiedLayerNormalization"))
    # the dynamo export's own norms (a Cast around the squares) are not a pattern onnxruntime fuses
    assert fused == [2 * LAYERS + 1 if exporter == "legacy" else 0, 2 * LAYERS + 1]

"""Whole attention heads (graphopt/analysis/heads.py, graphopt/passes/heads/): found in exports of both torch
exporters, removed exactly where the removed heads contribute nothing (or are reconstructed exactly), and
pruned by SNP beside FFN channels under one MAC budget, the written model keeping dynamic batch and
sequence axes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.analysis.heads import find_head_blocks
from graphopt.api import optimize
from graphopt.calibration.session import make_session
from graphopt.calibration.shapes import batch1_shapes
from graphopt.ir import graph as ir
from graphopt.passes.heads.prune import cut_heads
from graphopt.passes.heads.select import usable_blocks
from graphopt.passes.base import PassResult
from tests.conftest import quantize_qdq

torch = pytest.importorskip("torch")
nn = torch.nn

VOCAB, DIM, HEADS, LAYERS, TOKENS = 40, 32, 4, 2, 10


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-second, first), dim=-1)


class Block(nn.Module):
    """Self-attention with HF's additive mask (optionally rotary q/k, optionally grouped-query: `kv_heads` key and
    value heads, each repeated for HEADS // kv_heads query heads; `packed`: one q/k/v projection chunked in three,
    or "sections": split at once into [3, heads, width] and indexed, as timm's attention does), post-LN, GELU FFN."""

    def __init__(self, rotary: bool, kv_heads: int = HEADS, packed: bool | str = False) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.q, self.o = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.k, self.v = (nn.Linear(DIM, kv_heads * DIM // HEADS) for _ in range(2))
        self.qkv = nn.Linear(DIM, 3 * DIM) if packed else None
        self.ffn = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.rotary, self.head_dim, self.sections = rotary, DIM // HEADS, packed == "sections"

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = x.shape
        group = HEADS // self.kv_heads
        return x[:, :, None].expand(batch, self.kv_heads, group, tokens, self.head_dim).reshape(
            batch, HEADS, tokens, self.head_dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.sections:
            qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            parts = self.qkv(x).chunk(3, dim=-1) if self.qkv is not None else (self.q(x), self.k(x), self.v(x))
            q, k, v = (self._split(part) for part in parts)
        if self.kv_heads != HEADS:
            k, v = self._repeat(k), self._repeat(v)
        if self.rotary:
            angle = torch.arange(x.shape[1], dtype=x.dtype)[:, None] / (10.0 ** (torch.arange(self.head_dim) / self.head_dim))
            cos, sin = angle.cos(), angle.sin()
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], DIM)
        x = self.norm1(x + self.o(context))
        return self.norm2(x + self.ffn(x))


class Encoder(nn.Module):
    def __init__(self, rotary: bool = False, kv_heads: int = HEADS, packed: bool | str = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(rotary, kv_heads, packed) for _ in range(LAYERS))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for block in self.blocks:
            x = block(x, bias)
        return x


def _export(module: nn.Module, exporter: str, path: Path) -> onnx.ModelProto:
    ids = torch.randint(1, VOCAB, (2, TOKENS))
    mask = torch.ones(2, TOKENS, dtype=torch.int64)
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["hidden"]}
    if exporter == "legacy":
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(module, (ids, mask), str(path), dynamo=False, opset_version=17, **names,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes})
    else:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
        program = torch.onnx.export(module, (ids, mask), dynamo=True, opset_version=18, verbose=False, **names,
                                    dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))
        program.save(str(path))
    return onnx.load(str(path))


def _data(count: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens // 2, tokens + 1, size=count)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": (rng.integers(1, VOCAB, size=(count, tokens)) * mask).astype(np.int64),
            "attention_mask": mask}


def _run(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(model).run(None, data)[0]


def _build(rotary: bool = False, edit=None, kv_heads: int = HEADS, packed: bool | str = False) -> nn.Module:
    torch.manual_seed(0)
    module = Encoder(rotary, kv_heads, packed).eval()
    if edit is not None:
        with torch.no_grad():
            edit(module)
    return module


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def exporter(request) -> str:
    return request.param


def _blocks(model: onnx.ModelProto):
    graph = ir.import_graph(model)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    return graph, shapes, find_head_blocks(graph, shapes)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_every_attention_layer_is_one_block_of_its_heads(exporter, rotary, tmp_path) -> None:
    model = _export(_build(rotary), exporter, tmp_path / "m.onnx")
    graph, shapes, blocks = _blocks(model)
    result = PassResult(modified=False)
    usable = usable_blocks(graph, shapes, result)
    assert len(usable) == LAYERS, result.skipped
    for block in usable:
        assert block.heads == HEADS
        projections = {s.node.name for s in block.slices if s.node.op in ("MatMul", "Gemm")}
        assert len(projections) == 3  # q, k, v
        assert len(block.consumers) == 1 and len(block.mixing) == 2  # q·kᵀ and p·v


def _zero_head_output(module: Encoder, layer: int, head: int) -> None:
    rows = slice(head * DIM // HEADS, (head + 1) * DIM // HEADS)
    module.blocks[layer].o.weight[:, rows] = 0.0


def test_removing_heads_the_output_projection_ignores_is_exact(exporter, tmp_path) -> None:
    def edit(module: Encoder) -> None:
        _zero_head_output(module, 0, 1)
        _zero_head_output(module, 1, 0)
        _zero_head_output(module, 1, 3)

    model = _export(_build(edit=edit), exporter, tmp_path / "m.onnx")
    graph, shapes, blocks = _blocks(model)
    for block, removed in zip(blocks, ([1], [0, 3])):
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), removed), {}, shapes, reconstruct=False)
    ir.cleanup(graph)
    pruned = ir.export_model(graph, model)
    data = _data(3, TOKENS + 4, seed=1)  # another batch and sequence length than the analysis used
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-4, atol=1e-4)
    weights = {t.name: t for t in pruned.graph.initializer}
    assert sum(np.prod(t.dims) for t in weights.values()) < sum(np.prod(t.dims) for t in model.graph.initializer)
    dims = [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), "batch and sequence stay dynamic"


def test_heads_leave_a_packed_projection_and_its_split_exactly(exporter, tmp_path) -> None:
    # one q/k/v projection chunked in three (Split from the dynamo exporter, Slice from the legacy one): removing
    # heads moves every cut of the packed output, and SNP's head pruning runs on it end to end
    def edit(module: Encoder) -> None:
        _zero_head_output(module, 0, 1)
        _zero_head_output(module, 1, 0)
        _zero_head_output(module, 1, 3)

    model = _export(_build(edit=edit, packed=True), exporter, tmp_path / "m.onnx")
    graph, shapes, blocks = _blocks(model)
    data = _data(3, TOKENS + 4, seed=1)
    if exporter == "legacy":  # torch's legacy chunk computes its slice positions from the run-time shape: the
        # raw graph is declined, the pre-passes of optimize fold the positions to constants
        assert all("computed at run time" in (block.declined or "") for block in blocks)
    else:
        assert len(blocks) == LAYERS and all(len(block.packed) == 3 and not block.declined for block in blocks)
        for block, removed in zip(blocks, ([1], [0, 3])):
            cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), removed), {}, shapes, reconstruct=False)
        ir.cleanup(graph)
        np.testing.assert_allclose(_run(ir.export_model(graph, model), data), _run(model, data), rtol=1e-4, atol=1e-4)
    result = optimize(model, method="snp", calib=_data(64, TOKENS, 0), target_macs=0.7, round_to=1)
    stats = next(p for p in result.report["passes"] if p["pass"] == "snp")["stats"]
    assert stats["heads_removed"] >= 3 and result.report["macs_ratio"] <= 0.71
    assert np.isfinite(_run(result.model, data)).all()


def test_heads_of_a_projection_split_into_sections_go_from_every_section_exactly(exporter, tmp_path) -> None:
    """timm's attention: one q/k/v projection reshaped to [batch, tokens, 3, heads, width], permuted and indexed
    (Gather): removing a head removes its columns from each of the three sections of the projection."""
    def edit(module: Encoder) -> None:
        _zero_head_output(module, 0, 2)
        _zero_head_output(module, 1, 0)

    model = _export(_build(edit=edit, packed="sections"), exporter, tmp_path / "m.onnx")
    data = _data(3, TOKENS + 4, seed=1)
    # the pre-passes fold the split's run-time target to a constant
    result = optimize(model, method="none", input_shapes={"sequence": TOKENS})
    graph = ir.import_graph(result.model)
    shapes = batch1_shapes(result.model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    blocks = usable_blocks(graph, shapes, PassResult(modified=False))
    assert [block.heads for block in blocks] == [HEADS] * LAYERS
    assert all(sum(s.node.op == "MatMul" for s in block.slices) == 3 for block in blocks)  # one per section
    for block, removed in zip(blocks, ([2], [0])):
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), removed), {}, shapes, reconstruct=False)
    ir.cleanup(graph)
    pruned = ir.export_model(graph, result.model)
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-4, atol=1e-4)
    qkv = [t for t in pruned.graph.initializer if len(t.dims) == 2 and t.dims[1] == 3 * (DIM - DIM // HEADS)]
    assert len(qkv) == LAYERS
    for qk_dims in (False, True):  # q/k dims decline here with the reason (a Gather before the scores); heads go
        snp = optimize(model, method="snp", calib=_data(64, TOKENS, 0), target_macs=0.7, round_to=1, qk_dims=qk_dims)
        stats = next(p for p in snp.report["passes"] if p["pass"] == "snp")["stats"]
        assert stats["heads_removed"] >= 2 and snp.report["macs_ratio"] <= 0.71
        assert _cosine(_run(snp.model, data), _run(model, data)) > 0.9


def test_grouped_query_heads_go_with_their_key_value_head(exporter, tmp_path) -> None:
    """Two key/value heads, each shared by two query heads: a unit is one key/value head and its query heads;
    removing a unit whose query heads the output projection ignores is exact."""
    def edit(module: Encoder) -> None:
        _zero_head_output(module, 0, 2)
        _zero_head_output(module, 0, 3)

    model = _export(_build(rotary=True, edit=edit, kv_heads=2), exporter, tmp_path / "m.onnx")
    graph, shapes, blocks = _blocks(model)
    usable = usable_blocks(graph, shapes, PassResult(modified=False))
    assert [b.heads for b in usable] == [2] * LAYERS
    width = DIM // HEADS
    assert sorted(s.width for s in usable[0].slices if s.node.op == "MatMul") == [width, width, 2 * width]
    cut_heads(graph, usable[0], np.array([0]), {}, shapes, reconstruct=False)
    ir.cleanup(graph)
    pruned = ir.export_model(graph, model)
    data = _data(3, TOKENS + 4, seed=7)
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("projection_bias", [True, False])
def test_a_duplicated_head_is_reconstructed_exactly_into_the_output_projection(exporter, projection_bias: bool,
                                                                               tmp_path) -> None:
    """Head 2 of layer 0 computes exactly what head 0 does: its context is head 0's, so removing it and
    folding the least-squares reconstruction into the output projection changes nothing. With a bias-free
    projection (Llama-style) the duplicate is linear in the kept heads, so the fit without a constant term is
    exact too, and the projection stays one MatMul (no Add joins the graph)."""
    width = DIM // HEADS

    def edit(module: Encoder) -> None:
        block = module.blocks[0]
        for proj in (block.q, block.k, block.v):
            proj.weight[2 * width:3 * width] = proj.weight[:width]
            proj.bias[2 * width:3 * width] = proj.bias[:width]
        if not projection_bias:
            projection = nn.Linear(DIM, DIM, bias=False)
            projection.weight.copy_(block.o.weight)
            block.o = projection

    model = _export(_build(edit=edit), exporter, tmp_path / "m.onnx")
    result = optimize(model, method="snp", calib=_data(64, TOKENS, seed=2), keep_variance=1.0, round_to=1)
    heads = [h for h in result.report["passes"][-1]["history"] if "heads" in h]
    assert [h["kept"] for h in heads] == [3] and heads[0]["removed"] in ([0], [2])  # either copy goes
    adds = [sum(n.op_type == "Add" for n in m.graph.node) for m in (model, result.model)]
    assert adds[1] <= adds[0], adds
    data = _data(4, TOKENS, seed=3)
    np.testing.assert_allclose(_run(result.model, data), _run(model, data), rtol=1e-3, atol=1e-3)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_snp_prunes_heads_and_channels_under_one_mac_target(exporter, tmp_path) -> None:
    model = _export(_build(), exporter, tmp_path / "m.onnx")
    calib = _data(128, TOKENS, seed=4)
    with_heads = optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1)
    channels_only = optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1, heads=False)
    stats = with_heads.report["passes"][-1]["stats"]
    assert stats["heads_removed"] >= 1 and stats["channels_removed"] >= 1
    assert "heads_removed" not in channels_only.report["passes"][-1]["stats"]
    for result in (with_heads, channels_only):
        assert result.report["macs_ratio"] <= 0.6 + 1e-9
    held_out = _data(16, TOKENS + 3, seed=5)
    reference = _run(model, held_out)
    assert _cosine(_run(with_heads.model, held_out), reference) > 0.9


def _fused(module: nn.Module, tmp_path: Path) -> onnx.ModelProto:
    """The legacy export run through onnxruntime's transformers optimizer: com.microsoft Attention with a packed
    QKV weight, SkipLayerNormalization and BiasGelu."""
    from onnxruntime.transformers.optimizer import optimize_model

    _export(module, "legacy", tmp_path / "plain.onnx")
    fused = optimize_model(str(tmp_path / "plain.onnx"), model_type="bert", num_heads=HEADS, hidden_size=DIM,
                           opt_level=0).model
    assert sum(node.op_type == "Attention" for node in fused.graph.node) == LAYERS
    return fused


def test_fused_attention_heads_are_removed_exactly(tmp_path) -> None:
    def edit(module: Encoder) -> None:
        _zero_head_output(module, 0, 2)
        _zero_head_output(module, 1, 1)

    model = _fused(_build(edit=edit), tmp_path)
    graph = ir.import_graph(model)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    blocks = usable_blocks(graph, shapes, PassResult(modified=False))
    assert [b.heads for b in blocks] == [HEADS] * LAYERS
    for block, removed in zip(blocks, (2, 1)):
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), [removed]), {}, shapes, reconstruct=False)
    pruned = ir.export_model(graph, model)
    assert [n.attribute[0].i for n in pruned.graph.node if n.op_type == "Attention"] == [HEADS - 1] * LAYERS
    data = _data(3, TOKENS + 2, seed=6)
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-4, atol=1e-4)


def test_snp_prunes_the_heads_and_ffn_of_a_fused_model(tmp_path) -> None:
    model = _fused(_build(), tmp_path)
    result = optimize(model, method="snp", calib=_data(128, TOKENS, seed=4), target_macs=0.5, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["heads_removed"] >= 1 and stats["channels_removed"] >= 1 and result.report["macs_ratio"] <= 0.5 + 1e-9
    assert result.report["mask_input"]["name"] == "attention_mask"  # the token counts the fused Attention reads
    held_out = _data(16, TOKENS + 3, seed=5)
    assert _cosine(_run(result.model, held_out), _run(model, held_out)) > 0.9


def test_fused_attention_counts_the_macs_of_the_ops_it_replaces(tmp_path) -> None:
    from graphopt.calibration.shapes import count_cost

    fused = _fused(_build(), tmp_path)
    plain = onnx.load(str(tmp_path / "plain.onnx"))
    shapes = {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)}
    counted = count_cost(fused, shapes)
    assert not counted.uncounted
    assert counted.macs == count_cost(plain, shapes).macs


def test_heads_of_torch_multihead_attention_folded_into_the_batch_go_exactly(exporter, tmp_path) -> None:
    """torch's nn.MultiheadAttention (in nn.TransformerEncoder): one packed q/k/v projection reshaped to [seq,
    batch, 3, E] and its sections gathered, each folded to [seq, batch x heads, width] (the batch times the heads
    computed at run time), scaled dot products, then [seq x batch, E] into the output projection: removing heads
    whose output projection columns are zero is exact at another batch size than the analysis used."""
    from graphopt.torch import export, zoo

    module, example = zoo.ZOO["torch_encoder"]()
    width = 32 // 4
    with torch.no_grad():
        for layer, heads in zip(module.encoder.layers, ([1], [0, 3])):
            for head in heads:
                layer.self_attn.out_proj.weight[:, head * width:(head + 1) * width] = 0.0
    model = onnx.load(str(export.export_onnx(module, example, tmp_path / "m.onnx", exporter=exporter, fold_bn=False)))
    normalised = optimize(model, method="none").model
    graph = ir.import_graph(normalised)
    shapes = batch1_shapes(normalised, {"input": (1, 8, 32)})
    result = PassResult(modified=False)
    blocks = usable_blocks(graph, shapes, result)
    assert [block.heads for block in blocks] == [4, 4], result.skipped
    assert not any("heads of" in reason for reason in result.skipped), result.skipped
    assert all(sum(s.node.op == "MatMul" for s in block.slices) == 3 for block in blocks)  # q, k and v sections
    for block, removed in zip(blocks, ([1], [0, 3])):
        cut_heads(graph, block, np.setdiff1d(np.arange(4), removed), {}, shapes, reconstruct=False)
    ir.cleanup(graph)
    pruned = ir.export_model(graph, normalised)
    data = {"input": np.random.default_rng(3).standard_normal((3, 8, 32)).astype(np.float32)}
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-4, atol=1e-4)
    packed = sorted(t.dims[1] for t in pruned.graph.initializer if len(t.dims) == 2 and t.dims[1] in (72, 48))
    assert packed == [48, 72]  # 3 x (4 - 2) x 8 and 3 x (4 - 1) x 8 columns of the two packed projections
    calib = {"input": np.random.default_rng(0).standard_normal((32, 8, 32)).astype(np.float32)}
    snp = optimize(model, method="snp", calib=calib, target_macs=0.6)
    stats = next(p for p in snp.report["passes"] if p["pass"] == "snp")["stats"]
    assert stats["heads_removed"] >= 3 and snp.report["macs_ratio"] <= 0.6 * 1.02
    assert np.isfinite(_run(snp.model, data)).all()


def _quantized(model: onnx.ModelProto, path: Path, feeds: list[dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """`model` statically quantized by onnxruntime in QDQ form (int8 weights per channel, uint8 activations),
    calibrated on `feeds` (default: four batches of token ids)."""
    pytest.importorskip("onnxruntime.quantization")
    source = path.with_name("float.onnx")
    onnx.save(model, str(source))
    batches = feeds if feeds is not None else [_data(4, TOKENS, seed) for seed in range(4)]
    return onnx.load(str(quantize_qdq(source, path, batches)))


def test_heads_of_a_qdq_model_go_through_its_quantize_pairs_exactly(exporter, tmp_path) -> None:
    """In a QDQ model (onnxruntime's static quantization) a QuantizeLinear/DequantizeLinear pair sits between
    every projection and its reshape: heads are found through them, and removing heads the output projection
    ignores leaves the quantized model computing what it did, its weights stored as integers again."""
    from graphopt.passes.quantize.through import requantize_weights, unquantize_weights

    def edit(module: Encoder) -> None:
        _zero_head_output(module, 0, 2)
        _zero_head_output(module, 1, 1)

    model = _quantized(_export(_build(edit=edit), exporter, tmp_path / "m.onnx"), tmp_path / "qdq.onnx")
    graph = ir.import_graph(model)
    records = unquantize_weights(graph)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    result = PassResult(modified=False)
    blocks = usable_blocks(graph, shapes, result)
    assert len(blocks) == LAYERS and all(block.heads == HEADS for block in blocks), result.skipped
    for block, removed in zip(blocks, ([2], [1])):
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), removed), {}, shapes, reconstruct=False)
    assert requantize_weights(graph, records)["quantized_channels_requantized"] == 0
    pruned = ir.export_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    data = _data(3, TOKENS + 4, seed=1)
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-5, atol=1e-5)
    stored = {t.name for t in pruned.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert len(stored) == len({t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8})


def test_snp_prunes_the_heads_of_a_qdq_model(tmp_path) -> None:
    model = _quantized(_export(_build(), "dynamo", tmp_path / "m.onnx"), tmp_path / "qdq.onnx")
    result = optimize(model, method="snp", calib=_data(64, TOKENS, seed=4), target_macs=0.6, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["head_blocks"] == LAYERS and stats["heads_removed"] >= 1 and result.report["macs_ratio"] <= 0.6
    onnx.checker.check_model(result.model, full_check=True)
    held_out = _data(16, TOKENS + 3, seed=5)
    assert _cosine(_run(result.model, held_out), _run(model, held_out)) > 0.9


def test_heads_of_a_quantized_torch_multihead_attention_go_through_its_quantize_pairs(exporter, tmp_path) -> None:
    """nn.MultiheadAttention quantized by onnxruntime: a quantize/dequantize pair stands between each step from
    the packed projection's [seq, batch, 3, E] reshape to the gathered sections (unsqueeze, transpose, squeeze);
    the sections are still found, heads the output projection ignores go exactly with every weight stored as
    integers again, and SNP reaches a target that needs heads."""
    from graphopt.passes.quantize.through import requantize_weights, unquantize_weights
    from graphopt.torch import export, zoo

    module, example = zoo.ZOO["torch_encoder"]()
    width = 32 // 4
    with torch.no_grad():
        for layer, heads in zip(module.encoder.layers, ([2], [1])):
            for head in heads:
                layer.self_attn.out_proj.weight[:, head * width:(head + 1) * width] = 0.0
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((4, 8, 32)).astype(np.float32)} for _ in range(4)]
    model = _quantized(onnx.load(str(export.export_onnx(module, example, tmp_path / "m.onnx", exporter=exporter,
                                                        fold_bn=False))), tmp_path / "qdq.onnx", feeds)
    normalised = optimize(model, method="none").model
    graph = ir.import_graph(normalised)
    records = unquantize_weights(graph)
    shapes = batch1_shapes(normalised, {"input": (1, 8, 32)})
    result = PassResult(modified=False)
    blocks = usable_blocks(graph, shapes, result)
    assert [block.heads for block in blocks] == [4, 4], result.skipped
    for block, removed in zip(blocks, ([2], [1])):
        cut_heads(graph, block, np.setdiff1d(np.arange(4), removed), {}, shapes, reconstruct=False)
    assert requantize_weights(graph, records)["quantized_channels_requantized"] == 0
    pruned = ir.export_model(graph, normalised)
    data = {"input": rng.standard_normal((3, 8, 32)).astype(np.float32)}
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-5, atol=1e-5)
    snp = optimize(model, method="snp", calib={"input": rng.standard_normal((32, 8, 32)).astype(np.float32)},
                   target_macs=0.5)
    stats = next(p for p in snp.report["passes"] if p["pass"] == "snp")["stats"]
    assert stats["heads_removed"] >= 2 and snp.report["macs_ratio"] <= 0.5 * 1.02

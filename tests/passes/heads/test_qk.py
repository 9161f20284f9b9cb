"""q/k dims inside attention heads (graphopt/analysis/heads/qk.py, graphopt/passes/heads/qk.py, qk_plan.py): the
bilinear maps folded into the q and k projections are exact without truncation and when keys lie in a
lower-rank subspace, beat the orthogonal (key PCA) alternative where queries and keys disagree, decline
rotary and fused attention with their reason, and compete in SNP's MAC budget; the written models keep
dynamic batch and sequence axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.analysis.heads.qk import ROTARY, QKBlock, find_qk
from graphopt.api import optimize
from graphopt.calibration.stats import StatRequest
from graphopt.ir import graph as ir
from graphopt.passes.base import PassContext, PassResult
from graphopt.passes.heads.qk import block_maps, fold_maps, unit_moments
from graphopt.passes.heads.select import usable_blocks

torch = pytest.importorskip("torch")

from tests.passes.heads.test_heads import (DIM, HEADS, LAYERS, TOKENS, Encoder, _blocks, _build, _cosine,  # noqa: E402
                                           _data, _export, _fused, _run, exporter)

WIDTH = DIM // HEADS  # `exporter` (legacy, dynamo) is test_heads.py's fixture


def _qk_blocks(model: onnx.ModelProto) -> tuple[object, dict, list[QKBlock | str]]:
    graph, shapes, _ = _blocks(model)
    usable = usable_blocks(graph, shapes, PassResult(modified=False))
    return graph, shapes, [find_qk(block, shapes) for block in usable]


def _stats(model: onnx.ModelProto, qks: list[QKBlock], calib: dict[str, np.ndarray]) -> dict:
    names = sorted({side.tensor for qk in qks for side in (qk.query, qk.key)})
    ctx = PassContext(template=model, data=calib, progress=False)
    return ctx.statistics([StatRequest(name, frozenset({"mean", "gram"}), 2) for name in names])


def _folded(model: onnx.ModelProto, rank: int, maps=None) -> onnx.ModelProto:
    """Every q/k block of `model` folded to `rank` dims per head (`maps(qk, stats, rank)`: bilinear by default)."""
    graph, shapes, qks = _qk_blocks(model)
    assert all(isinstance(qk, QKBlock) for qk in qks), qks
    stats = _stats(model, qks, _data(64, TOKENS, seed=2))
    for qk in qks:
        query_maps, key_maps = (maps or block_maps)(qk, stats, rank)[:2]
        fold_maps(graph, qk, query_maps, key_maps, shapes)
    ir.cleanup(graph)
    return ir.export_model(graph, model)


def _relative(result: onnx.ModelProto, model: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    expected = _run(model, data)
    return float(np.linalg.norm(_run(result, data) - expected) / np.linalg.norm(expected))


def _dynamic(model: onnx.ModelProto) -> bool:
    return all(d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim)


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_maps_without_truncation_are_exact(exporter, kv_heads, tmp_path) -> None:
    model = _export(_build(kv_heads=kv_heads), exporter, tmp_path / "m.onnx")
    folded = _folded(model, WIDTH)
    data = _data(3, TOKENS + 4, seed=1)  # another batch and sequence length than the analysis used
    np.testing.assert_allclose(_run(folded, data), _run(model, data), rtol=1e-4, atol=1e-5)
    assert _dynamic(folded)


def _plant_keys(rank: int):
    """Every key head of every layer lies in a `rank`-dimensional subspace of its d dims (weights and bias)."""
    def edit(module: Encoder) -> None:
        generator = torch.Generator().manual_seed(3)
        for block in module.blocks:
            for head in range(HEADS):
                rows = slice(head * WIDTH, (head + 1) * WIDTH)
                basis = torch.randn(WIDTH, rank, generator=generator)
                block.k.weight[rows] = basis @ torch.randn(rank, DIM, generator=generator) / DIM ** 0.5
                block.k.bias[rows] = basis @ torch.randn(rank, generator=generator)
    return edit


def test_keys_planted_in_a_subspace_truncate_exactly(exporter, tmp_path) -> None:
    rank = WIDTH // 2
    model = _export(_build(edit=_plant_keys(rank)), exporter, tmp_path / "m.onnx")
    folded = _folded(model, rank)
    data = _data(3, TOKENS + 4, seed=1)
    np.testing.assert_allclose(_run(folded, data), _run(model, data), rtol=1e-4, atol=1e-4)
    assert _dynamic(folded)
    weights = {t.name: t for t in folded.graph.initializer}
    assert sum(np.prod(t.dims) for t in weights.values()) < sum(np.prod(t.dims) for t in model.graph.initializer)
    assert _relative(_folded(model, rank - 1), model, data) > 1e-3  # one dim fewer than the keys span is not


def _orthogonal_maps(qk: QKBlock, stats: dict, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The simpler alternative: the same R on q and k, the leading principal directions of each unit's keys."""
    keys = unit_moments(qk.key, stats[qk.key.tensor], qk.units, qk.width)
    rotations = np.stack([np.linalg.eigh(moment)[1][:, ::-1][:, :rank] for moment in keys])
    return rotations, rotations


def _disagreeing(module: Encoder) -> None:
    """Keys strongest where queries are weakest: the first half of every head's dims."""
    for block in module.blocks:
        for head in range(HEADS):
            first = slice(head * WIDTH, head * WIDTH + WIDTH // 2)
            block.k.weight[first] *= 4.0
            block.k.bias[first] *= 4.0
            block.q.weight[first] *= 0.05
            block.q.bias[first] *= 0.05


def test_bilinear_maps_keep_their_error_bound_and_beat_the_key_pca(tmp_path) -> None:
    rank = WIDTH // 2
    model = _export(_build(edit=_disagreeing), "legacy", tmp_path / "m.onnx")
    _, _, qks = _qk_blocks(model)
    stats = _stats(model, qks, _data(64, TOKENS, seed=2))
    for qk in qks:  # the calibration error of the scores is exactly the discarded singular energy
        query, key = (unit_moments(side, stats[side.tensor], qk.units, qk.width) for side in (qk.query, qk.key))
        query_maps, key_maps, energy = block_maps(qk, stats, rank)
        rotations = _orthogonal_maps(qk, stats, rank)[0]
        for unit in range(qk.units):
            def error(approximation: np.ndarray) -> float:
                residual = np.eye(qk.width) - approximation
                return float(np.trace(residual.T @ query[unit] @ residual @ key[unit]))
            bilinear = error(query_maps[unit] @ key_maps[unit].T)
            np.testing.assert_allclose(bilinear, energy[unit, rank:].sum(), rtol=1e-6)
            assert bilinear < error(rotations[unit] @ rotations[unit].T)
    held_out = _data(16, TOKENS + 3, seed=5)
    bilinear_error = _relative(_folded(model, rank), model, held_out)
    orthogonal_error = _relative(_folded(model, rank, _orthogonal_maps), model, held_out)
    assert bilinear_error < 0.5 * orthogonal_error, (bilinear_error, orthogonal_error)


def test_rotary_and_fused_attention_decline_with_their_reason(tmp_path) -> None:
    _, _, rotary = _qk_blocks(_export(_build(rotary=True), "legacy", tmp_path / "r.onnx"))
    assert rotary == [ROTARY] * LAYERS
    _, _, fused = _qk_blocks(_fused(_build(), tmp_path))
    assert len(fused) == LAYERS and all("fused attention op" in reason for reason in fused)
    model = _export(_build(rotary=True), "legacy", tmp_path / "r.onnx")
    result = optimize(model, method="snp", calib=_data(64, TOKENS, seed=4), target_macs=0.7, round_to=1,
                      qk_dims=True)
    entry = result.report["passes"][-1]
    assert "qk_blocks" not in entry["stats"]
    assert sum(ROTARY in line for line in entry["skipped"]) == LAYERS


def test_snp_with_qk_dims_reaches_its_mac_target(exporter, tmp_path) -> None:
    model = _export(_build(edit=_plant_keys(WIDTH // 2)), exporter, tmp_path / "m.onnx")
    calib = _data(128, TOKENS, seed=4)
    result = optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1, qk_dims=True)
    without = optimize(model, method="snp", calib=calib, target_macs=0.6, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["qk_blocks"] == LAYERS and stats["qk_dims_removed"] >= LAYERS * WIDTH // 2  # the free dims go
    assert "qk_blocks" not in without.report["passes"][-1]["stats"]
    assert result.report["macs_ratio"] <= 0.6 + 1e-9
    assert stats["estimated_macs_ratio"] == pytest.approx(result.report["macs_ratio"], abs=1e-6)
    assert _dynamic(result.model)
    held_out = _data(16, TOKENS + 3, seed=5)
    reference = _run(model, held_out)
    assert _cosine(_run(result.model, held_out), reference) >= _cosine(_run(without.model, held_out), reference) - 1e-3


def test_torch_multihead_attention_declines_q_k_dims_with_its_own_reason(tmp_path) -> None:
    """torch's nn.MultiheadAttention: the legacy export scales q and k by a factor it computes from the per-head
    width at run time, the dynamo export folds the heads into the batch axis; either is named, not mistaken for
    rotary embeddings, and the heads still go."""
    from graphopt.torch import export, zoo

    module, example = zoo.ZOO["torch_encoder"]()
    calib = {"input": np.random.default_rng(0).standard_normal((32, 8, 32)).astype(np.float32)}
    expected = {"legacy": "a scale computed at run time", "dynamo": "folds the heads into the batch axis"}
    for exporter, reason in expected.items():
        path = export.export_onnx(module, example, tmp_path / f"{exporter}.onnx", exporter=exporter, fold_bn=False)
        result = optimize(onnx.load(str(path)), method="snp", calib=calib, target_macs=0.6, qk_dims=True)
        entry = result.report["passes"][-1]
        lines = [line for line in entry["skipped"] if line.startswith("q/k dims of")]
        assert len(lines) == 2 and all(reason in line and ROTARY not in line for line in lines), lines
        assert entry["stats"]["heads_removed"] >= 3

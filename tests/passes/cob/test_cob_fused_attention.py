"""A post-norm encoder run through onnxruntime's transformers optimizer (com.microsoft Attention with a packed
q/k/v weight, SkipLayerNormalization, BiasGelu): its residual stream is sliced like a torch export's. Checked
here: the Attention output's shape is inferred (the norms after it split back), the Attention is a linear reader
of the stream (rotation folded into its weight rows, the LayerNorm shift into its packed bias), rotation alone is
exact, and `cob,snp` meets MAC targets with the stream and the heads cut together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.calibration.shapes import batch1_shapes
from tests.passes.heads.test_heads import DIM, LAYERS, TOKENS, _build, _data, _fused, _run

pytest.importorskip("onnxruntime.transformers.optimizer")


def _attention(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "Attention" and node.domain == "com.microsoft"]


def _relative(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def test_the_output_of_a_fused_attention_has_an_inferred_shape(tmp_path: Path) -> None:
    model = _fused(_build(), tmp_path)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    assert all(shapes[node.output[0]] == (1, TOKENS, DIM) for node in _attention(model))


def test_rotating_the_stream_through_fused_attention_is_exact(tmp_path: Path) -> None:
    model = _fused(_build(), tmp_path)
    result = graphopt.optimize(model, method="cob", calib=_data(64, TOKENS, seed=2), keep_variance=1.0, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["fused_norms_split"] == 2 * LAYERS
    assert stats["post_norm_shortcuts"] == stats["layer_norms_centred"] == 2 * LAYERS
    assert stats["chains_rotated"] >= 2 * LAYERS  # every segment the Attention layers read among them
    held_out = _data(4, TOKENS + 3, seed=9)
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_cob_then_snp_cut_the_stream_and_the_heads_of_a_fused_model(target: float, tmp_path: Path) -> None:
    model = _fused(_build(), tmp_path)
    result = graphopt.optimize(model, method="cob,snp", calib=_data(128, TOKENS, seed=2), target_macs=target,
                               round_to=1)
    onnx.checker.check_model(result.model, full_check=True)
    assert target - 0.02 <= result.report["macs_ratio"] <= target + 0.005
    snp = next(p for p in result.report["passes"] if p["pass"] == "snp")["stats"]
    assert snp["estimated_macs_ratio"] == pytest.approx(result.report["macs_ratio"], abs=0.01)
    dims = {t.name: list(t.dims) for t in result.model.graph.initializer}
    for node in _attention(result.model):
        rows, columns = dims[node.input[1]]
        assert rows < DIM and dims[node.input[2]] == [columns]  # the stream narrowed; bias and weight agree
    got = _run(result.model, _data(3, TOKENS + 2, seed=5))
    assert got.shape[:2] == (3, TOKENS + 2) and np.isfinite(got).all()  # batch and sequence stay dynamic


def test_an_attention_without_bias_gets_one_and_keeps_its_mask(tmp_path: Path) -> None:
    """The LayerNorm shift folds into a new packed bias (input 2) written in place: the mask after it stays.
    (The first block reads the embedding sum, which has no norm: its Attention takes no shift.)"""
    model = _fused(_build(), tmp_path)
    for node in _attention(model):
        node.input[2] = ""  # no bias: the optional input left empty before the mask
    masks = [node.input[3] for node in _attention(model)]
    result = graphopt.optimize(model, method="cob", calib=_data(64, TOKENS, seed=2), keep_variance=1.0, round_to=1)
    written = _attention(result.model)
    assert [node.input[3] for node in written] == masks and [bool(node.input[2]) for node in written] == [False, True]
    held_out = _data(4, TOKENS + 3, seed=9)
    assert _relative(_run(model, held_out), _run(result.model, held_out)) < 1e-4
    pruned = graphopt.optimize(model, method="cob,snp", calib=_data(128, TOKENS, seed=2), target_macs=0.7,
                               round_to=1)
    onnx.checker.check_model(pruned.model, full_check=True)
    assert [node.input[3] for node in _attention(pruned.model)] == masks  # SNP's bias compensation keeps it too

"""Attention masks found automatically for calibration statistics (graphopt/calibration/collect.py
choose_mask, graphopt/analysis/mask.py), on a small BERT-like encoder exported by both torch exporters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.api import calibrate
from graphopt.calibration.capture import exposing_model
from graphopt.calibration.collect import context_calibrator
from graphopt.calibration.mask import choose_mask
from graphopt.calibration.data import load_data
from graphopt.calibration.session import make_session
from graphopt.errors import GraphoptError, OptionError

VOCAB, TOKENS, SAMPLES = 30, 8, 12
SAMPLES_DIR = Path(__file__).resolve().parents[2] / "samples"


def _encoder(style: str) -> object:
    """Embedding, one self-attention block and a ReLU FFN, per-token class scores. `hf`: the mask (1 =
    token) enters as HF's additive bias (1 − m) · −10000; `padding`: a boolean key-padding mask (True =
    padded) through nn.MultiheadAttention."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.heads, self.head_dim = nn.Embedding(VOCAB, 16), 2, 8
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
            self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ffn = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
            self.head = nn.Linear(16, 3)

        def _split(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            if style == "padding":
                mixed, _ = self.attention(x, x, x, key_padding_mask=mask, need_weights=False)
            else:
                q, k, v = (self._split(proj(x)) for proj in (self.q, self.k, self.v))
                bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
                scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
                mixed = self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))
            x = x + mixed
            return self.head(x + self.ffn(x))

    torch.manual_seed(0)
    return Encoder().eval()


def _export(style: str, exporter: str, path: Path) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    module = _encoder(style)
    ids = torch.randint(1, VOCAB, (2, TOKENS))
    mask = torch.zeros(2, TOKENS, dtype=torch.bool) if style == "padding" else torch.ones(2, TOKENS, dtype=torch.int64)
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
    if exporter == "legacy":
        axes = {"batch_size": 0, "sequence": 1}
        torch.onnx.export(module, (ids, mask), str(path), dynamo=False, opset_version=17, **names,
                          dynamic_axes={name: {v: k for k, v in axes.items()} for name in names["input_names"]})
    else:
        batch, sequence = torch.export.Dim("batch_size"), torch.export.Dim("sequence", max=64)
        program = torch.onnx.export(module, (ids, mask), dynamo=True, opset_version=18, verbose=False, **names,
                                    dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))
        program.save(str(path))
    return onnx.load(str(path))


def _data(style: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Token ids with right padding (id 0) and the mask in the model's convention; `kept` [N, T] marks tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, TOKENS + 1, size=SAMPLES)
    kept = np.arange(TOKENS)[None, :] < lengths[:, None]
    ids = np.where(kept, rng.integers(1, VOCAB, size=(SAMPLES, TOKENS)), 0).astype(np.int64)
    mask = ~kept if style == "padding" else kept.astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}, kept


@pytest.fixture(scope="module", params=[("hf", "legacy"), ("hf", "dynamo"), ("padding", "legacy")],
                ids=lambda p: "-".join(p))
def encoder(request, tmp_path_factory) -> tuple[str, onnx.ModelProto, Path]:
    style, exporter = request.param
    path = tmp_path_factory.mktemp("encoder") / f"{style}_{exporter}.onnx"
    return style, _export(style, exporter, path), path


def _token_rows(model: onnx.ModelProto, data: dict[str, np.ndarray], tensor: str) -> np.ndarray:
    session = make_session(exposing_model(model, [tensor], {tensor: onnx.TensorProto.FLOAT}))
    value = session.run([tensor], data)[0]
    return value.reshape(SAMPLES, TOKENS, -1)


def test_the_mask_is_found_and_only_real_tokens_enter_the_statistics(encoder) -> None:
    style, model, _ = encoder
    data, kept = _data(style)
    calibrator = context_calibrator(load_data(data, model), model, {}, progress=False)
    assert calibrator.mask.name == "attention_mask" and calibrator.mask.how == "found automatically"
    assert calibrator.mask.keeps == ("zero" if style == "padding" else "nonzero")
    masked = calibrate(model, data)
    full = calibrate(model, data, mask_input="none")
    assert masked.mask_input == "attention_mask" and full.mask_input is None
    assert len(masked.stats) >= 5  # q/k/v/out projections, the FFN's two layers, the head (per exporter)
    for name, stats in masked.stats.items():
        assert stats.masked and stats.count == kept.sum(), name
        assert full.stats[name].count == SAMPLES * TOKENS
    hidden = next(name for name in masked.stats if any(n.op_type == "Relu" and name in n.output
                                                       for n in model.graph.node))
    rows = _token_rows(model, data, hidden)
    np.testing.assert_allclose(masked.stats[hidden].mean, rows[kept].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(full.stats[hidden].mean, masked.stats[hidden].mean, rtol=1e-3)


def test_the_report_says_which_mask_was_taken_and_none_turns_it_off(encoder) -> None:
    style, model, _ = encoder
    data, _ = _data(style)
    found = graphopt.optimize(model, method="snp", target_macs=0.9, calib=data).report["mask_input"]
    assert found["name"] == "attention_mask" and found["found_automatically"] and found["how"] == "found automatically"
    assert "Softmax" in found["detail"]
    off = graphopt.optimize(model, method="snp", target_macs=0.9, calib=data, mask_input="none").report["mask_input"]
    assert off == {"name": None, "how": "disabled", "found_automatically": False, "keeps": None,
                   "detail": "--mask-input none"}
    forced = choose_mask(model, "attention_mask")
    assert (forced.name, forced.how, forced.keeps) == ("attention_mask", "given", found["keeps"])
    with pytest.raises(OptionError, match="mask input 'input_ids_typo' is not a model input"):
        choose_mask(model, "input_ids_typo")


def test_a_statistics_file_keeps_its_mask_and_a_different_choice_is_stale(tmp_path) -> None:
    path = tmp_path / "encoder.onnx"
    _export("hf", "legacy", path)
    data, _ = _data("hf")
    stats_path = tmp_path / "stats.npz"
    calibrate(path, data, output=stats_path)
    reused = graphopt.optimize(path, method="snp", target_macs=0.9, calib=data, stats=str(stats_path))
    assert reused.report["mask_input"]["name"] == "attention_mask"
    assert reused.report["mask_input"]["how"] == "statistics file"
    with pytest.raises(GraphoptError, match="computed with mask input 'attention_mask', this run uses no mask"):
        graphopt.optimize(path, method="snp", target_macs=0.9, calib=data, stats=str(stats_path), mask_input="none")
    unmasked = tmp_path / "unmasked.npz"
    calibrate(path, data, output=unmasked, mask_input="none")
    kept_off = graphopt.optimize(path, method="snp", target_macs=0.9, calib=data, stats=str(unmasked))
    assert kept_off.report["mask_input"]["name"] is None  # the file was computed without one: still none


def test_a_model_without_a_mask_finds_none_and_says_why() -> None:
    model = onnx.load(str(SAMPLES_DIR / "digits_cnn.onnx"))
    calib = dict(np.load(SAMPLES_DIR / "digits_calib.npz"))
    report = graphopt.optimize(model, method="snp", target_macs=0.8, calib=calib).report
    assert report["mask_input"] == {"name": None, "how": "not found", "found_automatically": False, "keeps": None,
                                    "detail": "no integer or boolean input"}


def test_the_command_line_says_which_mask_it_took(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from graphopt.cli import main

    model_path = tmp_path / "encoder.onnx"
    _export("hf", "legacy", model_path)
    data, _ = _data("hf")
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, **data)
    capsys.readouterr()
    assert main(["calibrate", str(model_path), "--data", str(data_path), "-o", str(tmp_path / "s.npz"), "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mask_input"] == "attention_mask" and report["mask_found_automatically"] is True
    assert main(["calibrate", str(model_path), "--data", str(data_path), "-o", str(tmp_path / "n.npz"), "--json",
                 "--quiet", "--mask-input", "none"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mask_input"] is None and report["mask_found_automatically"] is False
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--method", "snp", "--target-macs",
                 "0.9", "--calib", str(data_path), "--quiet"]) == 0
    assert "token statistics masked by input 'attention_mask' (found automatically)" in capsys.readouterr().out
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "out2.onnx"), "--method", "snp", "--target-macs",
                 "0.9", "--calib", str(data_path), "--quiet", "--mask-input", "input_ids"]) == 0
    assert "token statistics masked by input 'input_ids' (given)" in capsys.readouterr().out

"""Token batches cut after their last counted position: same statistics and models, fewer positions run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.api import calibrate
from graphopt import cli
from graphopt.calibration.data import load_data
from graphopt.calibration.mask import MaskChoice
from graphopt.calibration.trim import Trim, plan_trim, sequence_axes

VOCAB, TOKENS, SAMPLES = 40, 16, 40


def _pooled_encoder(pool: str, path: Path, exporter: str = "legacy") -> onnx.ModelProto:
    """Embedding plus a learned position, one attention block with HF's additive mask bias, a ReLU FFN and a
    mean over tokens: weighted by the mask (`masked`, as sentence encoders pool) or over every position
    (`every`, which padding changes)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.position = nn.Embedding(VOCAB, 16), nn.Parameter(torch.randn(TOKENS, 16) * 0.1)
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
            self.ffn = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16))

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids) + self.position[: ids.shape[1]]
            split = (lambda t: t.reshape(t.shape[0], t.shape[1], 2, 8).transpose(1, 2))
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
            scores = (q @ k.transpose(-1, -2) / math.sqrt(8) + bias).softmax(-1)
            x = x + self.o((scores @ v).transpose(1, 2).reshape(x.shape))
            x = x + self.ffn(x)
            if pool == "every":
                return x.mean(1)
            weights = mask[:, :, None].to(x.dtype)
            return (x * weights).sum(1) / weights.sum(1)

    torch.manual_seed(0)
    module = Encoder().eval()
    ids, mask = torch.randint(1, VOCAB, (2, TOKENS)), torch.ones(2, TOKENS, dtype=torch.int64)
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["pooled"]}
    if exporter == "legacy":
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(module, (ids, mask), str(path), dynamo=False, opset_version=17, **names,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "pooled": {0: "batch"}})
    else:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=TOKENS)
        program = torch.onnx.export(module, (ids, mask), dynamo=True, opset_version=18, verbose=False, **names,
                                    dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))
        program.save(str(path))
    return onnx.load(str(path))


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded token ids (1 to 11 tokens of 16) and their 0/1 mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=SAMPLES)
    kept = np.arange(TOKENS)[None, :] < lengths[:, None]
    ids = np.where(kept, rng.integers(1, VOCAB, size=(SAMPLES, TOKENS)), 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": kept.astype(np.int64)}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("trim")
    paths = {name: folder / f"{name}.onnx" for name in ("masked", "every", "masked_dynamo")}
    for name, path in paths.items():
        pool, _, exporter = name.partition("_")
        _pooled_encoder(pool, path, exporter or "legacy")
    return paths


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("exported", ["masked", "masked_dynamo"])
def test_batches_run_cut_and_the_pruned_model_is_the_same(encoders, exported: str) -> None:
    data = _data()
    options = {"method": "snp", "target_macs": 0.7, "calib": data, "batch_size": 16}
    cut = graphopt.optimize(encoders[exported], **options)
    whole = graphopt.optimize(encoders[exported], trim_padding=False, **options)
    lengths = data["attention_mask"].sum(axis=1)
    expected = sum(len(part) * part.max() for part in np.split(lengths, [16, 32])) / (SAMPLES * TOKENS)
    assert cut.report["padding"] == {"trimmed": True, "inputs": ["input_ids", "attention_mask"],
                                     "positions_run": round(expected, 4)}
    assert expected < 0.75
    assert whole.report["padding"] == {"trimmed": False, "reason": "--no-trim-padding"}
    cut_arrays, whole_arrays = _arrays(cut.model), _arrays(whole.model)
    assert cut_arrays.keys() == whole_arrays.keys()
    for name, value in whole_arrays.items():
        np.testing.assert_allclose(cut_arrays[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert cut.report["macs_after"] == whole.report["macs_after"]
    assert cut.report["fidelity"]["cosine"] == pytest.approx(whole.report["fidelity"]["cosine"], abs=1e-6)


def test_repair_trains_on_cut_batches(encoders) -> None:
    pytest.importorskip("torch")
    result = graphopt.optimize(encoders["masked"], method="snp", target_macs=0.6, calib=_data(), batch_size=8,
                               repair=4, repair_tensors="auto")
    assert result.report["padding"]["trimmed"]
    repaired = result.report["repair"]
    assert repaired["samples"] == {"train": 36, "held_out": 4} and repaired["masked_by"] == "attention_mask"
    assert repaired["loss_held_out_after"] <= repaired["loss_held_out_before"]


def test_a_model_that_pools_over_padding_keeps_its_batches_whole(encoders) -> None:
    result = graphopt.optimize(encoders["every"], method="snp", target_macs=0.7, calib=_data(), batch_size=16)
    padding = result.report["padding"]
    assert padding["trimmed"] is False
    assert padding["reason"].startswith("output 'pooled' changes by ")


def test_only_the_mask_symbol_axes_are_cut_after_the_last_counted_token() -> None:
    trim = Trim(MaskChoice("mask", "given"), (("ids", 1), ("mask", 1), ("states", 1), ("pairs", 1), ("pairs", 2)))
    mask = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    feed = {"ids": np.arange(10).reshape(2, 5), "mask": mask, "states": np.ones((2, 5, 3)),
            "other": np.ones((2, 5)), "pairs": np.ones((2, 5, 5))}
    cut = trim.apply(feed)
    assert cut["ids"].tolist() == [[0, 1], [5, 6]] and cut["mask"].shape == (2, 2) and cut["pairs"].shape == (2, 2, 2)
    assert cut["states"].shape == (2, 2, 3) and cut["other"].shape == (2, 5)
    left_padded = {**feed, "mask": mask[:, ::-1].copy()}
    assert all(trim.apply(left_padded)[name].shape == value.shape for name, value in left_padded.items())
    assert trim.apply({**feed, "mask": np.zeros_like(mask)})["ids"].shape == (2, 1)
    zero_marks_tokens = Trim(MaskChoice("mask", "given", keeps="zero"), (("mask", 1),))
    assert zero_marks_tokens.length({"mask": 1 - mask}) == 2


def test_a_fixed_sequence_axis_or_data_without_padding_is_not_cut(encoders) -> None:
    model = onnx.load(str(encoders["masked"]))
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input in fixed.graph.input:
        graph_input.type.tensor_type.shape.dim[1].dim_value = TOKENS
    assert sequence_axes(fixed, "attention_mask") == "the mask input's sequence axis is fixed"
    assert sequence_axes(model, "attention_mask") == (("input_ids", 1), ("attention_mask", 1))
    full = {"input_ids": np.ones((4, TOKENS), np.int64), "attention_mask": np.ones((4, TOKENS), np.int64)}
    plan = plan_trim(model, MaskChoice("attention_mask", "given"), load_data(full, model).batches(2))
    assert plan.trim is None and plan.reason == "no batch ends in padding"


def test_the_command_line_can_run_batches_whole(encoders, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tokens.npz"
    np.savez(data, **_data())
    out = tmp_path / "pruned.onnx"
    code = cli.main(["optimize", str(encoders["masked"]), "-o", str(out), "--method", "snp", "--target-macs", "0.7",
                     "--calib", str(data), "--no-trim-padding", "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["padding"] == {"trimmed": False, "reason": "--no-trim-padding"}
    assert report["options"]["trim_padding"] is False
    code = cli.main(["optimize", str(encoders["masked"]), "-o", str(tmp_path / "cut.onnx"), "--method", "snp",
                     "--target-macs", "0.7", "--calib", str(data), "--quiet"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "token statistics masked by input 'attention_mask' (found automatically); batches cut after their last " \
           "token (" in summary and "% of positions run)" in summary


def test_statistics_measured_cut_equal_those_measured_whole(encoders, tmp_path) -> None:
    data = _data(1)
    cut = calibrate(encoders["masked"], data, batch_size=8)
    whole = calibrate(encoders["masked"], data, batch_size=8, trim_padding=False)
    assert cut.mask_input == "attention_mask" and cut.data_fingerprint == whole.data_fingerprint
    assert cut.stats.keys() == whole.stats.keys() and len(cut.stats) == 4
    for name, stats in whole.stats.items():
        assert cut.stats[name].count == stats.count == data["attention_mask"].sum(), name
        np.testing.assert_allclose(cut.stats[name].mean, stats.mean, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(cut.stats[name].covariance(), stats.covariance(), rtol=1e-4, atol=1e-6, err_msg=name)
    # a statistics file keeps its own mask (it may have counted padded rows): batches then run whole
    path = tmp_path / "stats.npz"
    calibrate(encoders["masked"], data, output=path, mask_input="none")
    result = graphopt.optimize(encoders["masked"], method="snp", target_macs=0.7, calib=data, stats=path,
                               reconstruct_target="self")
    assert result.report["padding"] == {"trimmed": False,
                                        "reason": "--stats: its statistics keep the file's own mask"}

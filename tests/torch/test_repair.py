"""--repair (graphopt.torch.repair): distillation lowers the pruned model's output error on samples it did not
train on, never returns weights worse on its held-out slice than the starting ones, changes nothing but
weight values, and refuses clearly (an op it cannot train through, no data, no torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import parse, run_ort

torch = pytest.importorskip("torch")

from graphopt.api import optimize  # noqa: E402
from graphopt.calibration.data import load_data  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.errors import DataError, OptionError, UnsupportedOpError  # noqa: E402
from graphopt.passes.manager import PassManager  # noqa: E402
from graphopt.ir.weights import array_of  # noqa: E402
from graphopt.torch.repair import repair, write_back  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture(scope="module")
def digits() -> dict[str, object]:
    """The committed digits CNN, 200 calibration samples and 56 others it never trains on."""
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    images = np.load(SAMPLES / "digits_calib.npz")["input"]
    return {"model": model, "calib": {"input": images[:200]}, "test": {"input": images[200:]}}


@pytest.fixture(scope="module")
def pruned(digits) -> onnx.ModelProto:
    # one-shot SNP (self reconstruction, variance ordering) leaves an error for the repair to take away
    return optimize(digits["model"], method="snp", target_macs=0.3, calib=digits["calib"], criterion="variance",
                    reconstruct_target="self").model


def _error_on(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    want, got = run_ort(reference, feeds)["output"], run_ort(candidate, feeds)["output"]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))



def test_repair_lowers_the_output_error_on_samples_it_never_saw(digits, pruned) -> None:
    model = digits["model"]
    found = repair(model, pruned, load_data(digits["calib"], model), steps=150, lr=1e-3)
    repaired = write_back(pruned, found.arrays)
    before, after = _error_on(model, pruned, digits["test"]), _error_on(model, repaired, digits["test"])
    assert after < 0.6 * before, (before, after)
    report = found.report
    assert report["loss_held_out_after"] < 0.5 * report["loss_held_out_before"]
    assert report["loss_train_after"] < report["loss_train_before"]
    assert report["samples"] == {"train": 180, "held_out": 20} and report["tensors"] == ["output"]
    assert 0 < report["best_step"] <= 150 and report["parameters"] == 10
    assert report["lr_used"] == report["lr"] == 1e-3  # the first check improved: no restart


def test_a_cosine_schedule_decays_the_rate_to_zero_at_the_last_step(digits, pruned, monkeypatch) -> None:
    rates: list[float] = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    model = digits["model"]
    found = repair(model, pruned, load_data(digits["calib"], model), steps=100, lr=1e-3, schedule="cosine")
    assert len(rates) == 100 and rates[0] == pytest.approx(1e-3) and rates[50] == pytest.approx(5e-4)
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] < 1e-6
    assert found.report["schedule"] == "cosine" and found.report["lr_used"] == 1e-3
    assert found.report["loss_held_out_after"] < 0.6 * found.report["loss_held_out_before"]
    with pytest.raises(OptionError, match="--repair-schedule must be one of constant, cosine, got 'linear'"):
        repair(model, pruned, load_data(digits["calib"], model), steps=2, schedule="linear")


def test_weights_worse_on_the_held_out_slice_are_never_returned(digits, pruned) -> None:
    model = digits["model"]
    found = repair(model, pruned, load_data(digits["calib"], model), steps=10, lr=50.0)  # diverges at once
    # worse at the first check: restarted at 5, then at 0.5, which diverges too
    assert found.report["lr"] == 50.0 and found.report["lr_used"] == pytest.approx(0.5)
    assert found.report["best_step"] == 0 and found.arrays == {}
    assert found.report["loss_held_out_after"] == found.report["loss_held_out_before"]
    assert write_back(pruned, found.arrays) == pruned


def test_intermediate_tensors_are_matched_by_name_where_shapes_agree(digits, pruned) -> None:
    model = digits["model"]
    damaged = optimize(model, method="none").model  # pre-passed: BatchNorm folded, tensor names kept
    for tensor in damaged.graph.initializer:
        values = array_of(tensor)
        noise = np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values + 0.1 * np.std(values) * noise, tensor.name))
    hidden = "/9/Relu_output_0"
    found = repair(model, damaged, load_data(digits["calib"], model), steps=60, tensors=[hidden, "no_such"])
    assert found.report["tensors"] == ["output", hidden]
    assert found.report["skipped"] == ["tensor 'no_such': no node of the original produces it"]
    assert found.report["loss_held_out_after"] < found.report["loss_held_out_before"]
    narrowed = repair(model, pruned, load_data(digits["calib"], model), steps=2, tensors=[hidden])
    assert narrowed.report["tensors"] == ["output"]
    assert narrowed.report["skipped"] == [f"tensor '{hidden}': shaped differently in the pruned model"]


def test_the_api_changes_weight_values_only(digits, tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(digits["model"])
    onnx.helper.set_model_props(model, {"owner": "repair test", "dataset": "sklearn digits"})
    plain = optimize(model, method="snp", target_macs=0.3, calib=digits["calib"])
    result = optimize(model, method="snp", target_macs=0.3, calib=digits["calib"], repair=40, repair_lr=2e-3,
                      output=tmp_path / "repaired.onnx")
    repaired, reference = result.model, plain.model
    assert [(n.name, n.op_type, list(n.input), list(n.output), list(n.attribute)) for n in repaired.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output), list(n.attribute)) for n in reference.graph.node]
    assert repaired.metadata_props == reference.metadata_props and len(repaired.metadata_props) == 2
    assert repaired.graph.input == reference.graph.input and repaired.graph.output == reference.graph.output
    before = {t.name: array_of(t) for t in reference.graph.initializer}
    after = {t.name: array_of(t) for t in repaired.graph.initializer}
    assert list(after) == list(before)
    assert all(after[n].shape == before[n].shape and after[n].dtype == before[n].dtype for n in before)
    assert sum(not np.array_equal(after[n], before[n]) for n in before) >= 5
    entry = result.report["repair"]
    assert entry["steps"] == 40 and entry["lr"] == 2e-3 and entry["seconds"] > 0
    assert entry["loss_held_out_after"] < entry["loss_held_out_before"]
    assert result.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]
    assert onnx.load(str(tmp_path / "repaired.onnx")).metadata_props == repaired.metadata_props


def test_the_cli_takes_the_repair_flags_and_reports_them(tmp_path: Path, capfd) -> None:
    report = tmp_path / "report.json"
    code = main(["optimize", str(SAMPLES / "digits_cnn.onnx"), "-o", str(tmp_path / "out.onnx"), "--method", "snp",
                 "--target-macs", "0.5", "--calib", str(SAMPLES / "digits_calib.npz"), "--repair", "20",
                 "--repair-lr", "0.002", "--repair-tensors", "output", "--report", str(report)])
    out, _ = capfd.readouterr()
    assert code == 0
    assert "repair: 20 steps in" in out and "matched output" in out
    written = json.loads(report.read_text())
    assert written["options"]["repair"] == 20 and written["options"]["repair_tensors"] == "output"
    assert written["options"]["repair_schedule"] == "constant" and written["repair"]["schedule"] == "constant"
    assert written["repair"]["tensors"] == ["output"] and written["repair"]["steps"] == 20
    assert written["repair"]["lr_used"] <= 0.002 and written["repair"]["masked_by"] is None
    assert "padded tokens" not in out
    # a rate the first check rejects is lowered, and the output says so
    code = main(["optimize", str(SAMPLES / "digits_cnn.onnx"), "-o", str(tmp_path / "out2.onnx"), "--method", "snp",
                 "--target-macs", "0.5", "--calib", str(SAMPLES / "digits_calib.npz"), "--repair", "10",
                 "--repair-lr", "50", "--report", str(report)])
    out, _ = capfd.readouterr()
    assert code == 0 and "the held-out error rose at learning rate 50: trained at 0.5" in out


def test_an_op_it_cannot_train_through_is_refused_naming_it(digits) -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y)
            <float[4, 4] w = {1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0},
             int64 axis = {1}> {
            h = MatMul (x, w)
            y = CumSum (h, axis)
        }""")
    model.graph.node[1].name = "running_total"
    data = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    with pytest.raises(UnsupportedOpError, match="op CumSum of node 'running_total' has no rule"):
        optimize(model, method="none", calib=data, repair=5)


def test_the_refusal_comes_before_any_method_pass_runs(monkeypatch) -> None:
    """An op --repair cannot train through is found on the normalised graph, not after the method's work."""
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y)
            <float[8, 4] w1 = {1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0, 1.0,
                               1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 1.0},
             float[8, 4] w2 = {1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0,
                               1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0},
             int64 axis = {1}> {
            t = Transpose <perm = [1, 0]> (w1)
            h = MatMul (x, t)
            a = Relu (h)
            o = MatMul (a, w2)
            y = CumSum (o, axis)
        }""")
    ran = []
    run_one = PassManager._run_one
    monkeypatch.setattr(PassManager, "_run_one", staticmethod(
        lambda current, *args: ran.append(current.kind) or run_one(current, *args)))
    data = {"x": np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)}
    with pytest.raises(UnsupportedOpError, match="op CumSum"):
        optimize(model, method="snp", calib=data, target_macs=0.5, repair=5)
    assert ran and set(ran) == {"prepass"}


def test_a_repair_without_calibration_data_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--repair needs calibration data: give --calib"):
        optimize(tmp_path / "not_there.onnx", method="magnitude", target_macs=0.5, repair=10)
    with pytest.raises(OptionError, match="--repair-tensors needs --repair STEPS"):
        optimize(tmp_path / "not_there.onnx", method="none", repair_tensors="output")
    with pytest.raises(OptionError, match="--repair must be >= 0"):
        optimize(tmp_path / "not_there.onnx", method="none", repair=-1)


def test_a_repair_without_torch_names_the_extra(monkeypatch, tmp_path: Path, capfd) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(OptionError, match=r"pip install 'graphopt\[torch\]'"):
        optimize(tmp_path / "not_there.onnx", method="snp", calib=tmp_path / "data.npz", repair=10)
    code = main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--method", "snp",
                 "--calib", str(tmp_path / "data.npz"), "--repair", "10"])
    _, err = capfd.readouterr()
    assert code == 2 and err.strip().count("\n") == 0 and "pip install 'graphopt[torch]'" in err


def test_repair_trains_through_graphopts_own_norms_and_activations(tmp_path: Path) -> None:
    # change-of-basis pruning writes graphopt.RMSNorm and graphopt.TSRA nodes; repair trains through them
    from torch import nn

    from graphopt.torch.export import export_onnx
    from graphopt.torch.tsra import TSRA, RMSNorm

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 24), RMSNorm(), TSRA(12), nn.Linear(24, 24), RMSNorm(), TSRA(12),
                           nn.Linear(24, 6)).eval()
    x = np.random.default_rng(0).standard_normal((160, 16)).astype(np.float32)
    model = onnx.load(str(export_onnx(module, torch.from_numpy(x[:2]), tmp_path / "tsra.onnx")))
    plain = optimize(model, method="cob", target_macs=0.5, calib={"input": x}, round_to=1)
    result = optimize(model, method="cob", target_macs=0.5, calib={"input": x}, round_to=1, repair=60,
                      repair_lr=2e-3)
    # the repair trained the graph as cob left it; the written model then has its norms over the last axis
    # written out as onnxruntime fuses them (graphopt.ops.lower)
    ops = [n.op_type for n in result.model.graph.node]
    assert "TSRA" in ops and ops.count("ReduceMean") == 2 and "RMSNorm" not in ops
    entry = result.report["repair"]
    assert entry["loss_held_out_after"] < entry["loss_held_out_before"]
    assert result.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]


# ------------------------------------------------------------------------------ token models: masks, norms
@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def encoder(request, tmp_path_factory) -> dict[str, object]:
    """A two-block post-LN encoder with an attention mask (tests/passes/heads) from either torch exporter,
    padded data, and the model pruned by SNP to half its MACs."""
    from tests.passes.heads.test_heads import _build, _data, _export

    model = _export(_build(), request.param, tmp_path_factory.mktemp("encoder") / "m.onnx")
    calib = _data(96, 10, seed=0)
    pruned = optimize(model, method="snp", target_macs=0.5, calib=calib, criterion="variance",
                      reconstruct_target="self").model
    return {"model": model, "calib": calib, "pruned": pruned}


def test_padded_token_rows_count_nowhere_in_the_distillation(encoder) -> None:
    from graphopt.calibration.mask import MaskChoice
    from graphopt.torch.interpreter.module import GraphModule
    from graphopt.torch.repair import _Distiller, _Targets

    model, feed = encoder["model"], dict(encoder["calib"])
    own = run_ort(model, feed)["hidden"].astype(np.float64)
    kept = feed["attention_mask"] != 0
    assert 0 < kept.mean() < 1
    garbage = own.copy()
    garbage[~kept] = 1e3  # references that differ from the model on padded rows only
    targets = _Targets([feed], [{"hidden": garbage}])
    device = torch.device("cpu")
    masked = _Distiller(GraphModule(model), ["hidden"], targets, device, MaskChoice("attention_mask", "given"))
    unmasked = _Distiller(GraphModule(model), ["hidden"], targets, device)
    assert masked.error(targets) < 1e-10 and float(masked.batch_loss(0).detach()) < 1e-10
    assert unmasked.error(targets) > 0.5
    # a rank-2 tensor as long as the sequence may be pooled [batch, hidden]: it is not masked
    assert masked.kept_rows(feed, kept.shape) is None and masked.kept_rows(feed, (*kept.shape, 1)) is not None
    # the energy normalising the loss is the kept rows' too
    assert masked.energy["hidden"] == pytest.approx(float(np.mean(np.square(own[kept]))), rel=1e-12)


def test_auto_tensors_are_the_normalisation_outputs_and_the_mask_is_found(encoder) -> None:
    model, pruned = encoder["model"], encoder["pruned"]
    norms = [n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 4
    result = optimize(model, method="snp", target_macs=0.5, calib=encoder["calib"], criterion="variance",
                      reconstruct_target="self", repair=30, repair_lr=3e-3, repair_tensors="auto")
    report = result.report["repair"]
    # the last norm is the output itself ("hidden"): matched once, as an output
    assert report["tensors"] == ["hidden", *[n for n in norms if n != "hidden"]]
    assert report["masked_by"] == "attention_mask"
    assert report["loss_held_out_after"] < report["loss_held_out_before"]
    assert result.report["mask_input"]["name"] == "attention_mask"
    assert {i.name for i in result.model.graph.initializer} == {i.name for i in pruned.graph.initializer}


def test_references_kept_in_half_precision_move_each_error_by_at_most_its_rounding(encoder) -> None:
    from graphopt.calibration.mask import MaskChoice
    from graphopt.torch.interpreter.module import GraphModule
    from graphopt.torch.repair import _Distiller, _Targets, stored

    model, pruned, feed = encoder["model"], encoder["pruned"], dict(encoder["calib"])
    full = run_ort(model, feed)["hidden"]
    assert full.dtype == np.float32 and stored(full).dtype == np.float16
    # out of float16's range, too small a scale for its relative rounding, or not float32: kept as given
    assert stored(full * 1e5).dtype == np.float32 and stored(full * 1e-6).dtype == np.float32
    assert stored(full.astype(np.float64)).dtype == np.float64
    errors = []
    for reference in (full, stored(full)):
        targets = _Targets([feed], [{"hidden": reference}])
        distiller = _Distiller(GraphModule(pruned), ["hidden"], targets, torch.device("cpu"),
                               MaskChoice("attention_mask", "given"))
        errors.append(np.sqrt(distiller.error(targets)))
    assert 0.01 < errors[0] and errors[0] != errors[1]
    assert abs(errors[0] - errors[1]) <= 2.0**-11  # the triangle inequality's bound on the relative L2 error


def test_the_report_says_what_the_references_hold(digits, pruned) -> None:
    model = digits["model"]
    found = repair(model, pruned, load_data(digits["calib"], model), steps=2)
    # the digits logits: 200 samples x 10 classes in batches of 32, every batch in float16
    assert found.report["references"] == {"mb": round(200 * 10 * 2 / 1e6, 1), "dtypes": {"float16": 7}}

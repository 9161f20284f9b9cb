"""Graph outputs kept from calibration (graphopt.calibration.reference) and the fidelity check that reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.calibration.capture import cone_fingerprints, linear_inputs
from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import load_data
from graphopt.calibration.reference import output_cones
from graphopt.calibration.session import make_session
from graphopt.errors import DataError
from graphopt.evaluate import verify
from graphopt.passes.base import PassContext

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
MODEL, CALIB = SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_calib.npz"


def _calibrator(model: onnx.ModelProto, **options: object) -> Calibrator:
    calibrator = Calibrator(load_data(str(CALIB), model), batch_size=32, **options)
    calibrator.keep_outputs(output_cones(model, cone_fingerprints(model)))
    return calibrator


def test_kept_outputs_equal_a_run_of_the_model_on_the_same_batches() -> None:
    model = onnx.load(MODEL)
    calibrator = _calibrator(model)
    calibrator.statistics(model, linear_inputs(model))
    kept = calibrator.kept_outputs.batches_for([o.name for o in model.graph.output], 32)
    session = make_session(model)
    batches = list(load_data(str(CALIB), model).batches(32))
    assert len(kept) == len(batches) == 8
    for feed, outputs in zip(batches, kept):
        expected = session.run(None, feed)[0]
        np.testing.assert_allclose(outputs[model.graph.output[0].name], expected, rtol=1e-4, atol=1e-5)
    assert calibrator.kept_outputs.batches_for([o.name for o in model.graph.output], 16) is None  # other batches
    assert calibrator.kept_outputs.batches_for(["not_an_output"], 32) is None


def test_nothing_is_kept_for_another_model_or_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load(MODEL)
    calibrator = Calibrator(load_data(str(CALIB), model), batch_size=32)
    calibrator.keep_outputs({model.graph.output[0].name: "another cone"})
    calibrator.statistics(model, linear_inputs(model))
    assert calibrator.kept_outputs is None
    small = _calibrator(model, memory_limit=64 * 4 * 1280)  # keeps 4 batches' 1280 bytes of outputs of 8
    small.statistics(model, linear_inputs(model)[:1])
    assert small.kept_outputs is not None and small.kept_outputs.dropped
    assert small.kept_outputs.batches_for([model.graph.output[0].name], 32) is None


def _fidelity(monkeypatch: pytest.MonkeyPatch, kept: bool, method: str, **options: object) -> dict:
    """The report's fidelity, with the outputs calibration kept, or (`kept` False) rerunning the original."""
    if not kept:
        monkeypatch.setattr(PassContext, "reference_outputs", lambda self, model, batch_size: None)
    report = graphopt.optimize(str(MODEL), method=method, calib=str(CALIB), **options).report
    monkeypatch.undo()
    return {"kept": report["fidelity"]["reference_outputs"] == "calibration", **report["fidelity"]}


@pytest.mark.parametrize("options", [{"target_macs": 0.5}, {"target_macs": 0.3, "sequential": True}])
def test_the_report_fidelity_from_kept_outputs_equals_a_rerun_of_the_original(
        monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    with_kept = _fidelity(monkeypatch, True, "snp", **options)
    rerun = _fidelity(monkeypatch, False, "snp", **options)
    assert with_kept["kept"] and not rerun["kept"] and with_kept["samples"] == rerun["samples"] == 256
    assert with_kept["top1_agreement"] == rerun["top1_agreement"]
    for key in ("max_abs", "rel_l2", "cosine"):  # the original as given vs as normalised: float rounding apart
        assert with_kept[key] == pytest.approx(rerun[key], rel=1e-5)


def test_no_outputs_are_kept_when_a_method_changed_the_graph_before_calibration(
        monkeypatch: pytest.MonkeyPatch) -> None:
    found = _fidelity(monkeypatch, True, "magnitude,snp", target_macs=0.5)
    assert not found["kept"] and found["samples"] == 256  # the check ran the original itself


def test_verify_refuses_kept_outputs_that_do_not_cover_the_data() -> None:
    model = onnx.load(MODEL)
    session = make_session(model)
    batches = list(load_data(str(CALIB), model).batches(32))
    kept = [dict(zip([o.name for o in model.graph.output], session.run(None, feed))) for feed in batches]
    report = verify(model, model, str(CALIB), batch_size=32, reference_outputs=kept)
    assert report.samples == 256 and report.first["max_abs"] < 1e-5
    with pytest.raises(DataError, match="cover 7 batches"):
        verify(model, model, str(CALIB), batch_size=32, reference_outputs=kept[:7])
    with pytest.raises(DataError, match="cover 9 batches"):
        verify(model, model, str(CALIB), batch_size=32, reference_outputs=[*kept, kept[0]])

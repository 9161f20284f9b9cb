"""A user's metric through the CLI: `--metric module:function` imported from the current directory, its
values in verify's, optimize's and sweep's JSON, `--tolerance KEY=V` driving ExPrune's search, and bad
specs or a failing metric refused in one line with exit code 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest

from graphopt.calibration.data import load_data
from graphopt.cli import main
from tests.conftest import run_ort
from tests.passes.exprune.test_exprune import _data, _gemm_relu

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

METRIC = '''
import numpy as np


def score(reference, candidate, inputs):
    """1 - the mean relative error per sample of the first output, and the worst one."""
    name = next(iter(reference))
    a, b = reference[name].astype(np.float64), candidate[name].astype(np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    error = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    return {"score": 1.0 - float(error.mean()), "worst": float(error.max())}


def broken(reference, candidate, inputs):
    raise KeyError("boxes")
'''


def _score(reference: np.ndarray, candidate: np.ndarray) -> float:
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    return 1.0 - float(np.mean(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)))


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory holding mymetric.py, the ExPrune test model and its calibration data."""
    (tmp_path / "mymetric.py").write_text(METRIC)
    model = _gemm_relu(d=48, n=40)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", **_data(model, rows=800, d=48))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymetric", raising=False)
    yield tmp_path
    sys.modules.pop("mymetric", None)


def _call(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's usage errors exit from inside main
        code = int(exit_.code or 0)
    out, err = capfd.readouterr()
    return code, out, err


def test_verify_reports_the_metric(folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = onnx.load(str(folder / "model.onnx"))
    other = onnx.load(str(folder / "model.onnx"))
    weight = onnx.numpy_helper.to_array(other.graph.initializer[0])
    other.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weight * 1.05, other.graph.initializer[0].name))
    onnx.save_model(other, str(folder / "other.onnx"))
    code, out, err = _call(capfd, "verify", "model.onnx", "other.onnx", "--data", "calib.npz", "--json",
                           "--batch-size", "96", "--metric", "mymetric:score")
    assert code == 0, err
    report = json.loads(out)
    data = dict(np.load(folder / "calib.npz"))
    want = _score(run_ort(model, data)["y"], run_ort(other, data)["y"])
    assert report["metric_name"] == "mymetric:score" and report["metric"]["score"] == pytest.approx(want, rel=1e-6)
    assert 0.9 < want < 1.0 and report["top1_agreement"] is not None  # [N, 40] scores: top-1 applies


def test_the_metric_drives_exprune_tolerance(folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = _call(capfd, "optimize", "model.onnx", "-o", "out.onnx", "--method", "exprune", "--calib",
                           "calib.npz", "--metric", "mymetric:score", "--tolerance", "score=0.97",
                           "--exprune-layers", "all", "--json", "--quiet")
    assert code == 0, err
    report = json.loads(out)
    stats = next(p for p in report["passes"] if p["pass"] == "exprune")["stats"]
    assert stats["tolerance"] == "score=0.97" and stats["held_out_metric_score"] >= 0.97
    assert stats["fnr_level"] > 0 and stats["rejected_metric_score"] < 0.97  # the search stopped on the metric
    assert report["options"]["metric"] == "mymetric:score" and report["fidelity"]["metric_name"] == "mymetric:score"
    assert report["fidelity"]["metric"]["score"] >= 0.9
    # the held-out number is the metric on the held-out samples, measured independently, one sample per call as
    # the op runs (from 2 rows on the written layers run dense: graphopt.passes.exprune.dispatch)
    model = onnx.load(str(folder / "model.onnx"))
    _, held = load_data(str(folder / "calib.npz"), model).split(0.25, seed=0)
    written = onnx.load(str(folder / "out.onnx"))
    one_by_one = np.concatenate([run_ort(written, {k: v[i:i + 1] for k, v in held.arrays.items()})["y"]
                                 for i in range(len(held.arrays["x"]))])
    got = _score(run_ort(model, held.arrays)["y"], one_by_one)
    assert stats["held_out_metric_score"] == pytest.approx(got, rel=1e-6)
    # the other direction: the worst sample's error may not grow past zero, which no replacement keeps
    code, out, err = _call(capfd, "optimize", "model.onnx", "-o", "strict.onnx", "--method", "exprune", "--calib",
                           "calib.npz", "--metric", "mymetric:score", "--tolerance", "worst<=0", "--json", "--quiet")
    strict = next(p for p in json.loads(out)["passes"] if p["pass"] == "exprune")
    assert code == 0 and not strict["modified"] and "misses worst<=0" in strict["skipped"][0]


def test_sweep_rows_carry_the_metric(folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    for name in ("digits_cnn.onnx", "digits_calib.npz"):
        shutil.copy(SAMPLES / name, folder / name)
    code, out, err = _call(capfd, "sweep", "digits_cnn.onnx", "--calib", "digits_calib.npz", "--method", "magnitude",
                           "--targets", "0.7", "--no-bench", "--round-to", "1", "-o", "sweep", "--quiet",
                           "--metric", "mymetric:score", "--json")
    assert code == 0, err
    fidelity = json.loads(out)["rows"][0]["fidelity"]
    assert fidelity["metric_name"] == "mymetric:score" and set(fidelity["metric"]) == {"score", "worst"}
    assert fidelity["metric"]["score"] < 1 and fidelity["metric"]["worst"] > 0


@pytest.mark.parametrize("spec,fragment", [
    ("score", "--metric expects MODULE:FUNCTION"),
    ("no_such_module_here:score", "cannot import module 'no_such_module_here'"),
    ("mymetric:missing", "module 'mymetric' has no function 'missing'"),
])
@pytest.mark.parametrize("command", ["verify", "optimize", "sweep"])
def test_bad_metric_specs_exit_2_in_one_line(folder: Path, capfd: pytest.CaptureFixture[str], spec: str,
                                             fragment: str, command: str) -> None:
    argv = {"verify": ["verify", "model.onnx", "model.onnx", "--data", "calib.npz"],
            "optimize": ["optimize", "model.onnx", "-o", "out.onnx", "--method", "none"],
            "sweep": ["sweep", "model.onnx", "--calib", "calib.npz", "--method", "none", "--targets", "1",
                      "-o", "sweep"]}[command]
    code, out, err = _call(capfd, *argv, "--metric", spec)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (folder / "out.onnx").exists() and not (folder / "sweep").exists()


def test_a_metric_that_raises_is_named(folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = _call(capfd, "verify", "model.onnx", "model.onnx", "--data", "calib.npz",
                           "--metric", "mymetric:broken", "--quiet")
    assert code == 2 and err.strip() == "graphopt: error: metric mymetric:broken raised KeyError: 'boxes'"


def test_a_tolerance_on_a_key_without_a_metric_is_refused(folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = _call(capfd, "optimize", "model.onnx", "-o", "out.onnx", "--method", "exprune", "--calib",
                         "calib.npz", "--tolerance", "score=0.9")
    assert code == 2 and "--tolerance score=0.9 names no built-in measure" in err and "no --metric" in err
    code, _, err = _call(capfd, "optimize", "model.onnx", "-o", "out.onnx", "--method", "exprune", "--calib",
                         "calib.npz", "--metric", "mymetric:score", "--tolerance", "f1=0.9")
    assert code == 2 and "no key metric mymetric:score returns (score, worst)" in err


def test_the_api_takes_a_callable(folder: Path) -> None:
    import graphopt
    from graphopt import api
    from graphopt.errors import OptionError

    def agree(reference, candidate, inputs):
        return {"agree": float(np.mean(reference["y"].argmax(-1) == candidate["y"].argmax(-1)))}

    data = dict(np.load(folder / "calib.npz"))
    report = graphopt.optimize(str(folder / "model.onnx"), method="none", calib=data, metric=agree).report
    assert report["fidelity"]["metric"] == {"agree": 1.0} and report["options"]["metric"].endswith("agree")
    json.dumps(report, default=str)  # the report stays JSON
    checked = api.verify(str(folder / "model.onnx"), str(folder / "model.onnx"), data, metric=agree)
    assert checked.metric == {"agree": 1.0} and checked.first["kind"] == "classes"
    with pytest.raises(OptionError, match="--ctc-blank must be >= 0"):
        api.verify(str(folder / "model.onnx"), str(folder / "model.onnx"), data, ctc_blank=-1)

"""`graphopt sweep` on the committed digits sample: the rows, their MAC ratios and held-out fidelity, refused
and missed targets with their reasons, the timing columns, the plot, and outputs that never replace inputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from graphopt import api
from graphopt.cli import main
from graphopt.errors import OptionError, PassFailedError, PassInputError
from graphopt.sweep import parse_alternatives, sweep

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
TARGETS = [0.9, 0.8, 0.7, 0.6, 0.5]
ROW_KEYS = {"method", "target", "target_kind", "refused", "failed", "target_reached", "reason", "macs_ratio",
            "params_ratio", "bytes", "bytes_ratio", "latency", "fidelity"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sweep_inputs")
    for name in ("digits_cnn.onnx", "digits_calib.npz"):
        shutil.copy(SAMPLES / name, folder / name)
    return {"model": folder / "digits_cnn.onnx", "calib": folder / "digits_calib.npz", "dir": folder}


def _cli(inputs: dict[str, Path], outdir: Path, *extra: str) -> int:
    """The exit code of `graphopt sweep` (argparse's usage errors exit from inside main)."""
    try:
        return main(["sweep", str(inputs["model"]), "--calib", str(inputs["calib"]), "-o", str(outdir), "--quiet",
                     *extra])
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def quick(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """snp and magnitude at five MAC targets, exact channel counts, no timings."""
    outdir = tmp_path_factory.mktemp("sweep_quick") / "out"
    code = _cli(inputs, outdir, "--method", "snp,magnitude", "--targets", ",".join(map(str, TARGETS)),
                "--no-bench", "--round-to", "1")
    assert code == 0
    return json.loads((outdir / "sweep.json").read_text())


def _rows(report: dict[str, Any], method: str) -> list[dict[str, Any]]:
    return [row for row in report["rows"] if row["method"] == method]


def test_rows_have_the_keys(quick: dict[str, Any]) -> None:
    assert quick["methods"] == ["snp", "magnitude"] and quick["targets"] == TARGETS
    assert [(row["method"], row["target"]) for row in quick["rows"]] == \
        [(method, target) for method in ("snp", "magnitude") for target in TARGETS]
    assert quick["held_out"]["samples"] == 64 and quick["held_out"]["fit_samples"] == 192
    assert quick["bench"] is None
    for row in quick["rows"]:
        assert ROW_KEYS <= set(row)
        assert set(row["fidelity"]) >= {"cosine", "rel_l2", "top1_agreement"}
        assert row["fidelity"]["samples"] == 64  # the held-out part only
        assert row["latency"] is None and not row["refused"] and row["reason"] is None
        assert 0 < row["bytes_ratio"] < 1 and 0 < row["params_ratio"] < 1


def test_macs_ratios_are_monotone_and_near_the_target(quick: dict[str, Any]) -> None:
    for method in ("snp", "magnitude"):
        ratios = [row["macs_ratio"] for row in _rows(quick, method)]
        assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)
        for row in _rows(quick, method):
            assert row["target_reached"] is True and row["macs_ratio"] <= row["target"] * 1.02
    for row in _rows(quick, "snp"):  # SNP's budget lands within 2% either side at exact channel counts
        assert abs(row["macs_ratio"] - row["target"]) <= 0.02 * row["target"]


def test_fidelity_is_worse_at_deeper_cuts(quick: dict[str, Any]) -> None:
    snp = _rows(quick, "snp")
    cosines = [row["fidelity"]["cosine"] for row in snp]
    errors = [row["fidelity"]["rel_l2"] for row in snp]
    assert cosines == sorted(cosines, reverse=True) and errors == sorted(errors)
    magnitude = _rows(quick, "magnitude")
    assert magnitude[-1]["fidelity"]["cosine"] < magnitude[0]["fidelity"]["cosine"]
    for with_reconstruction, without in zip(snp, magnitude):  # SNP's least squares beats norms at every target
        assert with_reconstruction["fidelity"]["rel_l2"] < without["fidelity"]["rel_l2"]


def test_statistics_are_measured_once(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    calibrate = api.calibrate

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(api, "calibrate", counted)
    report = sweep(inputs["model"], inputs["calib"], methods=parse_alternatives("snp,snp+exprune,magnitude"),
                   targets=[0.8, 0.6], bench=False)
    assert len(calls) == 1 and len(report["rows"]) == 6
    assert report["methods"] == ["snp", "snp,exprune", "magnitude"]


def test_missed_and_refused_targets_carry_a_reason(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    report = sweep(inputs["model"], inputs["calib"], methods=["snp", "cob"], targets=[0.7, 0.001], bench=False)
    floor = next(row for row in report["rows"] if row["method"] == "snp" and row["target"] == 0.001)
    assert floor["target_reached"] is False and not floor["refused"]
    assert floor["macs_ratio"] > 0.001 * 1.02 and "of the MACs" in floor["reason"]
    cob = _rows(report, "cob")  # rotations cannot pass the ReLUs of a CNN: nothing to remove
    assert all(row["target_reached"] is False and "not equivariant" in row["reason"] for row in cob)

    optimize = api.optimize

    def refusing(model: Any, *, method: str, **options: Any) -> Any:
        if options.get("target_macs") == 0.5:
            raise PassInputError("snp: this model cannot be pruned that far")
        if method == "magnitude":
            raise PassFailedError("pass 'magnitude' failed: a bug")
        return optimize(model, method=method, **options)

    monkeypatch.setattr(api, "optimize", refusing)
    report = sweep(inputs["model"], inputs["calib"], methods=["snp", "magnitude"], targets=[0.7, 0.5], bench=False)
    refused = report["rows"][1]
    assert refused["refused"] and not refused["failed"] and refused["macs_ratio"] is None
    assert refused["reason"] == "snp: this model cannot be pruned that far"
    assert report["rows"][0]["target_reached"] is True
    assert report["rows"][2]["failed"] and "a bug" in report["rows"][2]["reason"]


def test_a_failed_run_exits_1_after_writing(inputs: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def failing(model: Any, *, method: str, **options: Any) -> Any:
        raise PassFailedError("pass 'magnitude' failed: a bug")

    monkeypatch.setattr(api, "optimize", failing)
    assert _cli(inputs, tmp_path / "out", "--method", "magnitude", "--targets", "0.7", "--no-bench") == 1
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"][0]["failed"]
    assert "magnitude at 0.7 failed" in capsys.readouterr().err


def test_timed_sweep_reports_speedups(inputs: dict[str, Path], tmp_path: Path) -> None:
    assert _cli(inputs, tmp_path / "out", "--method", "snp", "--targets", "0.5", "--repeat", "2",
                "--bench-batch", "4", "--threads", "1") == 0
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert report["bench"] == {"bench_batch": 4, "threads": 1, "rounds": 2}
    latency = report["rows"][0]["latency"]
    for batch in (1, 4):
        timing = latency[f"batch_{batch}"]
        assert timing["batch"] == batch and timing["rounds"] == 2 and timing["threads"] == 1
        assert 0 < timing["speedup_p10"] <= timing["speedup_p90"] and timing["speedup"] > 0
        assert timing["reference_ms"] > 0 and timing["candidate_ms"] > 0


def test_plot_or_the_reason_it_was_skipped(inputs: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert _cli(inputs, tmp_path / "a", "--method", "magnitude", "--targets", "0.7", "--no-bench") == 0
    assert not (tmp_path / "a" / "sweep.png").exists()
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert _cli(inputs, tmp_path / "b", "--method", "snp,magnitude", "--targets", "0.8,0.6", "--no-bench") == 0
    assert (tmp_path / "b" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "b" / "sweep.json").read_text())["plot"] == str(tmp_path / "b" / "sweep.png")


@pytest.mark.parametrize("which", ["model", "calib"])
def test_output_folder_equal_to_an_input_is_refused(inputs: dict[str, Path], which: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    before = inputs[which].read_bytes()
    assert _cli(inputs, inputs[which], "--method", "snp", "--targets", "0.7", "--no-bench") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input" in err
    assert inputs[which].read_bytes() == before


def test_an_output_that_would_replace_an_input_is_refused(inputs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    calib = tmp_path / "sweep.json"  # the calibration file sits where the sweep would write its JSON
    shutil.copy(inputs["calib"], calib)
    code = main(["sweep", str(inputs["model"]), "--calib", str(calib), "-o", str(tmp_path), "--method", "snp",
                 "--targets", "0.7", "--no-bench", "--quiet"])
    assert code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert calib.read_bytes() == inputs["calib"].read_bytes()


@pytest.mark.parametrize("extra", [["--method", "snp", "--targets", "0.9,1.5"],
                                   ["--method", "snp,bogus", "--targets", "0.9"],
                                   ["--method", "snp,", "--targets", "0.9"],
                                   ["--method", "snp", "--targets", "0.9", "--held-out", "1"],
                                   ["--method", "snp", "--targets", "0.9", "--repeat", "1"],
                                   ["--method", "snp", "--targets", "0.9", "--round-to", "-3"],
                                   ["--method", "snp"]])
def test_bad_input_is_one_line_and_exit_2(inputs: dict[str, Path], tmp_path: Path, extra: list[str],
                                          capsys: pytest.CaptureFixture) -> None:
    assert _cli(inputs, tmp_path / "out", *extra) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_pipelines_are_written_with_plus() -> None:
    assert parse_alternatives("snp, magnitude ,snp+exprune") == ["snp", "magnitude", "snp,exprune"]
    with pytest.raises(OptionError):
        parse_alternatives("snp+nothing")


def test_latency_targets(inputs: dict[str, Path], tmp_path: Path) -> None:
    assert _cli(inputs, tmp_path / "out", "--method", "snp", "--latency-targets", "0.8", "--no-bench") == 0
    row = json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"][0]
    assert row["target_kind"] == "latency"
    assert row["latency_target"]["target"] == 0.8 and row["latency_target"]["measured"] > 0
    assert row["target_reached"] == (row["latency_target"]["measured"] <= 0.8 * 1.1)
    assert row["macs_ratio"] < 1.0


def test_an_interrupted_sweep_keeps_its_finished_runs_and_resumes(
        inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    optimize, calls = api.optimize, []

    def interrupted(model: Any, *, method: str, **options: Any) -> Any:
        calls.append((method, options["target_macs"]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the sweep during its third run
        return optimize(model, method=method, **options)

    monkeypatch.setattr(api, "optimize", interrupted)
    settings = ["--method", "magnitude,snp", "--targets", "0.8,0.6", "--no-bench"]
    assert _cli(inputs, tmp_path / "out", *settings) == 130
    assert "the same command with --resume runs the rest" in capsys.readouterr().err
    partial = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert partial["complete"] is False and partial["runs"] == 4
    assert [(row["method"], row["target"]) for row in partial["rows"]] == [("magnitude", 0.8), ("magnitude", 0.6)]

    calls.clear()
    monkeypatch.setattr(api, "optimize", lambda model, **options: calls.append(options["method"]) or
                        optimize(model, **options))
    assert _cli(inputs, tmp_path / "out", *settings, "--resume") == 0
    assert calls == ["snp", "snp"]  # only the runs the file lacked
    final = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert final["complete"] is True and final["resumed"] == 2
    assert final["rows"][:2] == partial["rows"]
    assert [(row["method"], row["target"]) for row in final["rows"]][2:] == [("snp", 0.8), ("snp", 0.6)]
    assert all(row["target_reached"] for row in final["rows"])
    assert "resumed: 2 of 4 runs" in capsys.readouterr().out

    calls.clear()  # everything is there: nothing runs, nothing is calibrated
    monkeypatch.setattr(api, "calibrate", lambda *args, **kwargs: calls.append("calibrate"))
    assert _cli(inputs, tmp_path / "out", *settings, "--resume") == 0
    assert calls == [] and json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"] == final["rows"]


def test_resume_runs_a_failed_run_again(inputs: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    optimize = api.optimize

    def failing(model: Any, *, method: str, **options: Any) -> Any:
        if options["target_macs"] == 0.6:
            raise PassFailedError("pass 'magnitude' failed: a bug")
        return optimize(model, method=method, **options)

    monkeypatch.setattr(api, "optimize", failing)
    settings = ["--method", "magnitude", "--targets", "0.8,0.6", "--no-bench"]
    assert _cli(inputs, tmp_path, *settings) == 1
    assert [row["failed"] for row in json.loads((tmp_path / "sweep.json").read_text())["rows"]] == [False, True]
    monkeypatch.setattr(api, "optimize", optimize)
    assert _cli(inputs, tmp_path, *settings, "--resume") == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["resumed"] == 1 and [row["target_reached"] for row in report["rows"]] == [True, True]


@pytest.mark.parametrize("change", [["--targets", "0.8,0.5"], ["--held-out", "0.5"], ["--round-to", "1"],
                                    ["--method", "magnitude,random"]])
def test_resume_refuses_a_sweep_written_with_other_settings(inputs: dict[str, Path], tmp_path: Path,
                                                            change: list[str], capsys: pytest.CaptureFixture) -> None:
    settings = {"--method": "magnitude", "--targets": "0.8,0.6", "--held-out": "0.25"}
    same = [part for item in settings.items() for part in item]
    assert _cli(inputs, tmp_path, *same, "--no-bench") == 0
    before = (tmp_path / "sweep.json").read_bytes()
    capsys.readouterr()
    settings.update(dict(zip(change[::2], change[1::2])))
    extra = [part for item in settings.items() for part in item]
    assert _cli(inputs, tmp_path, *extra, "--no-bench", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "other settings" in err
    assert (tmp_path / "sweep.json").read_bytes() == before
    earlier = json.loads(before)
    (tmp_path / "sweep.json").write_text(json.dumps({**earlier, "graphopt": "0.0.1"}))  # another version's rows
    assert _cli(inputs, tmp_path, *same, "--no-bench", "--resume") == 2
    assert "other settings (graphopt)" in capsys.readouterr().err
    (tmp_path / "sweep.json").write_text('{"rows": 3}')
    assert _cli(inputs, tmp_path, *extra, "--no-bench", "--resume") == 2
    assert "not a sweep's report" in capsys.readouterr().err


def test_resume_without_an_earlier_sweep_runs_everything(inputs: dict[str, Path], tmp_path: Path) -> None:
    assert _cli(inputs, tmp_path / "new", "--method", "magnitude", "--targets", "0.7", "--no-bench", "--resume") == 0
    report = json.loads((tmp_path / "new" / "sweep.json").read_text())
    assert report["resumed"] == 0 and report["complete"] is True and len(report["rows"]) == 1


def test_a_result_slower_than_its_original_is_marked_and_warned(inputs: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    def timed(speedup: float, batch: int) -> dict[str, Any]:
        return {"batch": batch, "speedup": speedup, "speedup_p10": speedup - 0.1, "speedup_p90": speedup + 0.1,
                "reference_ms": 1.0, "candidate_ms": 1.0 / speedup, "rounds": 2, "threads": 1}

    calls: list[int] = []

    def latency(original: Any, optimized: Any, shapes: Any, timing: dict[str, Any], rounds: int) -> dict[str, Any]:
        calls.append(1)
        slow = len(calls) == 1  # the first run (0.9) came out slower at batch 1
        measured = {"batch_1": timed(0.8 if slow else 1.3, 1), "batch_4": timed(1.2, 4)}
        return {**measured, "slower": [1] if slow else []}

    monkeypatch.setattr(api, "measure_latency", latency)
    assert _cli(inputs, tmp_path / "out", "--method", "magnitude", "--targets", "0.9,0.4", "--repeat", "2",
                "--bench-batch", "4") == 0
    captured = capsys.readouterr()
    assert captured.out.count("slower than the original") == 1
    assert "magnitude at 0.9: slower than the original at batch 1 (0.80x (0.70-0.90))" in captured.out
    assert captured.err.count("\n") == 1 and "warning: magnitude at 0.9 is slower than the original at batch 1" \
        in captured.err

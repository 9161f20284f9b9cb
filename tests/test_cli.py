"""The CLI contract: JSON keys, exit codes, one clear stderr line for bad input, nothing written, --quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import __version__
from graphopt.cli import main
from graphopt.ir.io import load_model
from tests.conftest import assert_equivalent, bn_inputs, bn_params, init, random_inputs, tiny, weights

BN = bn_inputs("bn")


def _model() -> onnx.ModelProto:
    return tiny(f"""c = Conv <pads = [1, 1, 1, 1]> (x, w)
                    b = BatchNormalization (c, {BN})
                    r = Relu (b)
                    p = GlobalAveragePool (r)
                    f = Flatten (p)
                    y = Gemm <transB = 1> (f, fc)""", inputs="float[N, 3, 8, 8] x", outputs="float[N, 5] y",
                inits=", ".join([init("w", weights(4, 3, 3, 3)), bn_params("bn", 4), init("fc", weights(5, 4))]))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model.onnx"
    onnx.save_model(_model(), str(model))
    data = tmp_path / "data.npz"
    np.savez(data, x=weights(12, 3, 8, 8, seed=3))
    return {"model": model, "data": data, "dir": tmp_path}


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def _call(capfd, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def _assert_one_error_line(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def test_version_by_module_and_entry_point():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"graphopt {__version__}"
    entry = Path(sys.executable).with_name("graphopt")
    if entry.exists():
        assert subprocess.run([str(entry), "--version"], capture_output=True, text=True).stdout.strip() == \
            f"graphopt {__version__}"


def test_inspect_json(files, capfd):
    code, out, _ = _call(capfd, "inspect", files["model"], "--json")
    info = json.loads(out)
    assert code == 0
    assert info["macs"] == 4 * 64 * 27 + 20 and info["params"] == 108 + 16 + 20
    assert info["op_histogram"]["BatchNormalization"] == 1
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 5]}]


def test_verify_json(files, capfd, tmp_path):
    other = _model()
    other.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(weights(5, 4) * 1.1, "fc"))
    onnx.save_model(other, str(tmp_path / "other.onnx"))
    code, out, _ = _call(capfd, "verify", files["model"], tmp_path / "other.onnx", "--data", files["data"], "--json",
                         "--batch-size", "5")
    report = json.loads(out)
    assert code == 0 and report["samples"] == 12
    assert report["rel_l2"] == pytest.approx(0.1, rel=1e-4) and report["cosine"] == pytest.approx(1.0)
    assert report["max_abs"] > 0 and report["top1_agreement"] == 1.0


def test_bench_json(files, capfd):
    code, out, _ = _call(capfd, "bench", files["model"], "--json", "--repeat", "5", "--batch", "2", "--quiet")
    result = json.loads(out)
    assert code == 0 and result["median_ms"] > 0 and result["batch"] == 2 and result["repeat"] == 5


def test_optimize_report_and_output(files, capfd):
    out_path, report_path = files["dir"] / "out.onnx", files["dir"] / "report.json"
    code, out, err = _call(capfd, "optimize", files["model"], "-o", out_path, "--method", "none",
                           "--calib", files["data"], "--report", report_path, "--quiet")
    assert code == 0 and err == ""
    report = json.loads(report_path.read_text())
    assert report["macs_before"] == report["macs_after"] == 4 * 64 * 27 + 20
    assert report["params_before"] - report["params_after"] == 12  # BN's 16 parameters became a 4-wide bias
    assert [p["pass"] for p in report["passes"]][0] == "normalize_constants"
    assert all({"pass", "modified", "stats", "skipped"} <= set(p) for p in report["passes"])
    assert f"wrote {out_path}" in out and "MACs" in out
    optimized = load_model(out_path)
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert_equivalent(_model(), optimized, random_inputs(optimized))


def test_optimize_json_on_stdout(files, capfd):
    code, out, _ = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "o.onnx", "--method", "none",
                         "--json", "--quiet")
    keys = {"macs_before", "macs_after", "params_before", "params_after", "passes"}
    assert code == 0 and keys <= set(json.loads(out))


def test_quiet_hides_progress_bars(files):
    args = ["optimize", str(files["model"]), "-o", str(files["dir"] / "o.onnx"), "--method", "none",
            "--calib", str(files["data"]), "--batch-size", "2"]
    loud, quiet = _run(*args), _run(*args, "--quiet")
    assert loud.returncode == quiet.returncode == 0
    assert "passes" in loud.stderr or "verify" in loud.stderr  # a bar was drawn
    assert quiet.stderr == ""


def _external_escape(folder: Path) -> Path:
    (folder / "model").mkdir()
    (folder / "secret.bin").write_bytes(weights(4, 3, 3, 3).tobytes())
    model = _model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    path = folder / "model" / "m.onnx"
    onnx.save_model(model, str(path))
    return path


def _bad_npz(folder: Path, name: str, **arrays: np.ndarray) -> Path:
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


BAD_INPUTS = [  # (id, argv builder, stderr fragment)
    ("missing_model", lambda f: ["inspect", f["dir"] / "nope.onnx"], "model file not found"),
    ("truncated_model", lambda f: ["inspect", _truncated(f)], "not a valid ONNX model"),
    ("escaping_external_data", lambda f: ["inspect", _external_escape(f["dir"])], "escapes the model's directory"),
    ("wrong_npz_keys", lambda f: ["verify", f["model"], f["model"], "--data",
                                  _bad_npz(f["dir"], "k", a=weights(2, 3, 8, 8), b=weights(2, 3, 8, 8))], "unknown"),
    ("wrong_npz_shape", lambda f: ["verify", f["model"], f["model"], "--data",
                                   _bad_npz(f["dir"], "s", x=weights(2, 3, 8, 9))], "axis 3 must be 8"),
    ("wrong_npz_dtype", lambda f: ["optimize", f["model"], "-o", f["dir"] / "o.onnx", "--method", "none", "--calib",
                                   _bad_npz(f["dir"], "d", x=weights(2, 3, 8, 8).astype(np.float64))],
     "expects float32"),
    ("missing_npz", lambda f: ["verify", f["model"], f["model"], "--data", f["dir"] / "none.npz"], "not found"),
    ("bad_input_shape", lambda f: ["inspect", f["model"], "--input-shape", "x=1x3xbad"], "--input-shape expects"),
    ("unknown_input_shape_name", lambda f: ["inspect", f["model"], "--input-shape", "z=1x3"], "not a model input"),
    ("output_is_input", lambda f: ["optimize", f["model"], "-o", f["model"], "--method", "none"],
     "refusing to overwrite the input model"),
    ("output_is_input_respelled", lambda f: ["optimize", f["model"], "-o", f["dir"] / "sub" / ".." / "model.onnx",
                                             "--method", "none"], "refusing to overwrite the input model"),
    ("report_is_input", lambda f: ["optimize", f["model"], "-o", f["dir"] / "o.onnx", "--method", "none", "--report",
                                   f["model"]], "refusing to overwrite the input model"),
    ("report_is_calib", lambda f: ["optimize", f["model"], "-o", f["dir"] / "o.onnx", "--method", "none", "--calib",
                                   f["data"], "--report", f["data"]], "refusing to overwrite the input model"),
    ("report_is_hard_link_to_calib", lambda f: ["optimize", f["model"], "-o", f["dir"] / "o.onnx", "--method", "none",
                                                "--calib", f["data"], "--report", _hard_link(f["data"])],
     "the same file as"),
    ("model_is_a_fifo", lambda f: ["optimize", _fifo(f["dir"]), "-o", f["dir"] / "o.onnx", "--method", "none"],
     "is a FIFO, not a regular file"),
    ("model_is_a_device", lambda f: ["optimize", "/dev/zero", "-o", f["dir"] / "o.onnx", "--method", "none"],
     "is a device, not a regular file"),
    ("model_is_a_folder", lambda f: ["inspect", f["dir"]], "is a folder, not a regular file"),
    ("calib_is_a_fifo", lambda f: ["optimize", f["model"], "-o", f["dir"] / "o.onnx", "--method", "none", "--calib",
                                   _fifo(f["dir"])], "is a FIFO, not a regular file"),
    ("bad_target_macs", lambda f: ["optimize", f["model"], "-o", f["dir"] / "o.onnx", "--method", "none",
                                   "--target-macs", "0"], "--target-macs must be in"),
]


def _fifo(folder: Path) -> Path:
    path = folder / "pipe.onnx"
    os.mkfifo(path)
    return path


def _hard_link(path: Path) -> Path:
    link = path.parent / "report_link.json"
    os.link(path, link)
    return link


def _truncated(files: dict[str, Path]) -> Path:
    path = files["dir"] / "truncated.onnx"
    data = files["model"].read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, capfd, argv, fragment):
    args = argv(files)
    before = {p: p.read_bytes() for p in files["dir"].rglob("*") if p.is_file()}
    code, out, err = _call(capfd, *args)
    assert code == 2
    _assert_one_error_line(err, fragment)
    assert out == ""
    assert {p: p.read_bytes() for p in files["dir"].rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case", ["missing_model", "output_is_input", "bad_input_shape"])
def test_bad_input_in_a_real_process(files, case):
    argv = dict((c[0], c[1]) for c in BAD_INPUTS)[case](files)
    before = files["model"].read_bytes()
    result = _run(*(str(a) for a in argv))
    assert result.returncode == 2 and result.stdout == ""
    fragment = dict((c[0], c[2]) for c in BAD_INPUTS)[case]
    _assert_one_error_line(result.stderr, fragment)
    assert files["model"].read_bytes() == before
    assert sorted(p.name for p in files["dir"].iterdir()) == ["data.npz", "model.onnx"]


def test_usage_errors_exit_2_with_one_line(files, capfd):
    for argv in (["optimize", str(files["model"]), "-o", "x.onnx", "--method", "bogus"],
                 ["optimize", str(files["model"]), "-o", "x.onnx", "--method", "snp,,exprune"],
                 ["optimize", str(files["model"]), "-o", "x.onnx", "--method", "none,snp"],
                 ["optimize", str(files["model"]), "-o", "x.onnx", "--method", "exprune", "--tolerance", "top1=2"],
                 ["inspect"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        _, err = capfd.readouterr()
        assert len(err.strip().splitlines()) == 1 and "error:" in err


def test_internal_error_exits_1_with_one_line(files, capfd, monkeypatch):
    import graphopt.inspect

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(graphopt.inspect, "inspect_model", broken)
    code, _, err = _call(capfd, "inspect", files["model"])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error: ZeroDivisionError: boom" in lines[0] and "--debug" in lines[0]
    code, _, err = _call(capfd, "inspect", files["model"], "--debug")
    assert code == 1 and "Traceback" in err


def test_inspect_resolves_dynamic_axes_from_input_shape(tmp_path, capfd):
    model = tiny("y = Conv <pads = [1, 1, 1, 1]> (x, w)", inputs="float[N, 3, H, W] x", outputs="float[N, 4, H, W] y",
                 inits=init("w", weights(4, 3, 3, 3)))
    path = tmp_path / "dynamic.onnx"
    onnx.save_model(model, str(path))
    code, _, err = _call(capfd, "inspect", path, "--json")
    assert code == 2
    _assert_one_error_line(err, "dynamic axis 2 ('H')")
    code, out, _ = _call(capfd, "inspect", path, "--json", "--input-shape", "x=1x3x16x12")
    assert code == 0 and json.loads(out)["macs"] == 4 * 16 * 12 * 27


def test_bench_on_data(files, capfd):
    code, out, _ = _call(capfd, "bench", files["model"], "--data", files["data"], "--batch", "4", "--repeat", "3",
                         "--json", "--quiet")
    assert code == 0 and json.loads(out)["batch"] == 4
    code, _, err = _call(capfd, "bench", files["model"], "--data", files["data"], "--batch", "64", "--repeat", "3")
    assert code == 2
    _assert_one_error_line(err, "fewer than --batch 64 samples")


def test_a_method_that_changes_nothing_says_why(files, capfd):
    code, out, _ = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "out.onnx", "--method", "cob",
                         "--calib", files["data"], "--quiet")
    assert code == 0
    assert "cob changed nothing: " in out and "(Relu)" in out


def test_pipeline_names_each_method_that_changed_nothing(files, capfd):
    code, out, _ = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "out.onnx", "--method", "cob,exprune",
                         "--calib", files["data"], "--quiet", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["method"] == "cob,exprune" and [p["pass"] for p in report["passes"]][-3:] == \
        ["cob", "shape_inference", "exprune"]
    code, out, _ = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "out2.onnx", "--method", "cob,exprune",
                         "--calib", files["data"], "--quiet")
    assert "cob changed nothing: " in out

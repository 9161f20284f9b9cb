"""The CLI contract: JSON keys, exit codes, one clear stderr line for bad input, nothing written, --quiet."""

from __future__ import annotations

import importlib.metadata
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
    (declared,) = importlib.metadata.entry_points(group="console_scripts", name="graphopt")
    assert declared.value == "graphopt.cli:main"
    entry = Path(sys.executable).with_name("graphopt")
    assert entry.exists(), f"no graphopt console script next to {sys.executable}: run pip install -e ."
    completed = subprocess.run([str(entry), "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == f"graphopt {__version__}", completed.stderr
    package = subprocess.run([sys.executable, "-m", "graphopt", "inspect", "missing.onnx"], capture_output=True,
                             text=True)  # `python -m graphopt`, exit codes included
    assert package.returncode == 2 and package.stderr.strip() == "graphopt: error: model file not found: missing.onnx"


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
                                   _bad_npz(f["dir"], "d", x=np.ones((2, 3, 8, 8), np.int64))],
     "expects float32, data has int64"),
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
    code, out, _ = _call(capfd, "inspect", path, "--json")  # what needs no shapes, and which shapes to give
    info = json.loads(out)
    assert code == 0 and info["macs"] is None and info["params"] == 4 * 3 * 3 * 3
    assert info["op_histogram"] == {"Conv": 1} and info["inputs"][0]["shape"] == ["N", 3, "H", "W"]
    assert info["macs_unknown"] == "input 'x' has dynamic axis 2 ('H'): give --input-shape H=N or --input-shape x=..."
    code, out, _ = _call(capfd, "inspect", path)
    assert code == 0 and "MACs/sample unknown (input 'x' has dynamic axis 2 ('H')" in out
    code, _, err = _call(capfd, "inspect", path, "--groups")  # channel groups need the shapes
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


def test_a_missed_target_warns_and_strict_exits_3_with_the_output_written(files, capfd):
    out, report_path = files["dir"] / "out.onnx", files["dir"] / "report.json"
    # one Conv of 4 channels feeding the graph output's Gemm: keeping 1 channel is the smallest model (1/4)
    code, stdout, err = _call(capfd, "optimize", files["model"], "-o", out, "--method", "magnitude", "--target-macs",
                              "0.1", "--report", report_path, "--quiet")
    assert code == 0 and "wrote" in stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: warning: --target-macs 0.1 not reached: the model "
                                                   "keeps 25% of its MACs, more than 2% above the 10% asked; "
                                                   "the smallest reachable is 25%; magnitude: group")
    assert "graph output 'y'" in lines[0] and lines[0].endswith("(--strict makes this exit code 3)")
    report = json.loads(report_path.read_text())
    assert report["target_reached"] is False and report["macs_ratio"] == (64 * 27 + 5) / (4 * 64 * 27 + 20) == 0.25
    out.unlink()
    code, stdout, err = _call(capfd, "optimize", files["model"], "-o", out, "--method", "magnitude", "--target-macs",
                              "0.1", "--strict", "--json", "--quiet")
    assert code == 3 and json.loads(stdout)["target_reached"] is False
    assert err.startswith("graphopt: error: --target-macs 0.1 not reached") and err.count("\n") == 1
    assert err.strip().endswith(f"the output was still written to {out}")
    assert_equivalent(load_model(out), load_model(out), random_inputs(load_model(out)))  # a valid model


@pytest.mark.parametrize("method,target,reached", [("magnitude", "0.5", True), ("magnitude", "0.25", True),
                                                   ("magnitude", "0.245", False), ("none", "0.9", False),
                                                   ("none", None, None)])
def test_target_reached_in_the_report(files, capfd, method, target, reached):
    # the smallest model keeps 1 of 4 channels: 25% of the MACs, within 2% of 0.25 (relative) but not of 0.245
    extra = ["--target-macs", target] if target is not None else []
    code, stdout, err = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "o.onnx", "--method", method,
                              *extra, "--strict", "--json", "--quiet")
    assert json.loads(stdout)["target_reached"] is reached
    assert (code, err == "") == ((3, False) if reached is False else (0, True))


@pytest.mark.parametrize("target,noted", [("0.9", True), ("0.75", False), ("0.5", False)])
def test_a_model_well_below_its_target_says_why(files, capfd, target, noted):
    # each of the Conv's 4 channels carries 25% of the MACs: 0.9 can only land at 0.75
    code, stdout, _ = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "o.onnx", "--method", "magnitude",
                            "--target-macs", target, "--round-to", "1", "--report", files["dir"] / "r.json")
    report = json.loads((files["dir"] / "r.json").read_text())
    stats = next(p["stats"] for p in report["passes"] if p["pass"] == "magnitude")
    assert code == 0 and report["target_reached"] is True
    assert stats["cheapest_restore"] == pytest.approx(0.25)
    note = ("note: the model keeps 75% of its MACs for the 90% asked: keeping one more unit of any group it cut "
            "would exceed the target (the cheapest adds 25%)")
    assert (note in stdout) is noted and ("the ratio nearest to it" in stdout) is noted


def _exploding_inner_frame() -> None:
    raise ValueError("inner failure")


def test_debug_shows_the_frames_inside_a_failing_pass(files, capfd, monkeypatch):
    from graphopt.passes.base import REGISTRY

    def run(self, graph, ctx):
        _exploding_inner_frame()

    monkeypatch.setattr(REGISTRY["magnitude"], "run", run)
    argv = ["optimize", files["model"], "-o", files["dir"] / "o.onnx", "--method", "magnitude", "--target-macs", "0.5",
            "--quiet"]
    code, _, err = _call(capfd, *argv)
    assert code == 1 and err.count("\n") == 1 and "_exploding_inner_frame" not in err
    assert "internal error: PassFailedError: pass 'magnitude' failed" in err and "ValueError: inner failure" in err
    code, _, err = _call(capfd, *argv, "--debug")
    assert code == 1
    inner = err.index('in _exploding_inner_frame\n    raise ValueError("inner failure")')
    assert inner < err.index("The above exception was the direct cause of the following exception")
    assert err.strip().splitlines()[-1].startswith("graphopt: internal error: PassFailedError")
    assert not (files["dir"] / "o.onnx").exists()


def test_debug_on_bad_input_adds_the_traceback_above_the_error_line(files, capfd):
    code, _, err = _call(capfd, "inspect", files["dir"] / "nope.onnx", "--debug")
    assert code == 2 and "Traceback" in err and "ModelLoadError" in err
    assert err.strip().splitlines()[-1] == f"graphopt: error: model file not found: {files['dir'] / 'nope.onnx'}"


def _bert_like() -> onnx.ModelProto:
    """Token embeddings, a masked two-layer MLP; three inputs sharing `batch` and `sequence`."""
    return tiny("""e = Gather (emb, input_ids)
                   t = Gather (types, token_type_ids)
                   m = Cast <to = 1> (attention_mask)
                   mu = Unsqueeze (m, last)
                   s = Add (e, t)
                   h = Mul (s, mu)
                   a = MatMul (h, w1)
                   r = Relu (a)
                   y = MatMul (r, w2)""",
                inputs="int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask, "
                       "int64[batch, sequence] token_type_ids", outputs="float[batch, sequence, 16] y",
                inits=", ".join([init("emb", weights(30, 16)), init("types", weights(2, 16, seed=1)),
                                 init("last", np.array([-1]), dtype="int64"), init("w1", weights(16, 32, seed=2)),
                                 init("w2", weights(32, 16, seed=3))]))


def test_input_shape_binds_a_dimension_symbol_across_inputs(tmp_path, capfd):
    path = tmp_path / "bert.onnx"
    onnx.save_model(_bert_like(), str(path))
    code, out, _ = _call(capfd, "inspect", path)  # no MACs without the sequence length, and how to give it
    assert code == 0
    assert "unknown (input 'input_ids' has dynamic axis 1 ('sequence'): give --input-shape sequence=N or" in out
    code, out, _ = _call(capfd, "inspect", path, "--json", "--input-shape", "sequence=128")
    info = json.loads(out)
    assert code == 0 and info["macs"] == 128 * 2 * 16 * 32
    assert info["input_shapes"] == {name: [1, 128] for name in ("input_ids", "attention_mask", "token_type_ids")}
    code, out, _ = _call(capfd, "inspect", path, "--json", "--input-shape", "input_ids=1x64", "--input-shape",
                         "batch=1")
    assert code == 0 and json.loads(out)["input_shapes"]["token_type_ids"] == [1, 64]
    code, _, err = _call(capfd, "inspect", path, "--input-shape", "seq=128")
    assert code == 2
    _assert_one_error_line(err, "symbols: ['batch', 'sequence']")
    report = tmp_path / "report.json"
    code, _, _ = _call(capfd, "optimize", path, "-o", tmp_path / "out.onnx", "--method", "magnitude",
                       "--target-macs", "0.5", "--input-shape", "sequence=16", "--report", report, "--quiet")
    written = json.loads(report.read_text())
    assert code == 0 and written["macs_before"] == 16 * 2 * 16 * 32 and written["macs_ratio"] <= 0.51
    assert written["input_shapes"]["attention_mask"] == [1, 16] and written["interface_changes"] == []
    output = load_model(tmp_path / "out.onnx").graph.output[0]
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", "sequence", 16]


def _check_timing(timing: dict, batch: int, rounds: int) -> None:
    assert timing["batch"] == batch and timing["rounds"] == rounds
    assert timing["reference_ms"] > 0 and timing["candidate_ms"] > 0
    assert 0 < timing["speedup_p10"] <= timing["speedup"] <= timing["speedup_p90"]


def test_bench_two_models_reports_the_speedup_of_the_second_from_interleaved_rounds(capfd, files) -> None:
    pruned = files["dir"] / "pruned.onnx"
    assert _call(capfd, "optimize", files["model"], "-o", pruned, "--method", "magnitude", "--target-macs", "0.5",
                 "--quiet")[0] == 0
    code, out, err = _call(capfd, "bench", files["model"], pruned, "--batch", "4", "--repeat", "6", "--json",
                           "--quiet")
    assert code == 0, err
    result = json.loads(out)
    _check_timing(result, batch=4, rounds=6)
    assert result["reference"] == str(files["model"]) and result["candidate"] == str(pruned)
    code, out, _ = _call(capfd, "bench", files["model"], pruned, "--repeat", "4", "--quiet")
    assert code == 0 and ("x faster (p10" in out or "x SLOWER (p10" in out)
    assert "4 interleaved rounds" in out
    code, _, err = _call(capfd, "bench", files["model"], files["dir"] / "missing.onnx", "--quiet")
    assert code == 2 and "missing.onnx" in err


def test_optimize_bench_times_original_and_result_at_batch_one_and_the_bench_batch(capfd, files) -> None:
    report = files["dir"] / "report.json"
    code, out, err = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "out.onnx", "--method", "magnitude",
                           "--target-macs", "0.5", "--bench", "--bench-batch", "3", "--report", report, "--quiet")
    assert code == 0, err
    latency = json.loads(report.read_text())["latency"]
    assert set(latency) == {"batch_1", "batch_3", "slower"}
    _check_timing(latency["batch_1"], batch=1, rounds=30)
    _check_timing(latency["batch_3"], batch=3, rounds=30)
    assert latency["slower"] == [t["batch"] for t in (latency["batch_1"], latency["batch_3"]) if t["speedup"] < 1]
    assert "latency: " in out and "at batch 3" in out
    # a slower result is said on stderr, once per batch where it is slower
    assert err.count("slower than the original") == len(latency["slower"])
    code, _, err = _call(capfd, "optimize", files["model"], "-o", files["dir"] / "out2.onnx", "--method", "none",
                         "--bench-batch", "0", "--quiet")
    assert code == 2 and "--bench-batch" in err


@pytest.mark.parametrize("built", [True, False])
def test_optimize_notes_convolution_ops_written_untimed(capfd, tmp_path: Path, monkeypatch, built: bool) -> None:
    """`--exprune-layers all` writes the digits sample's Conv+ReLU layers as ops without timing them: optimize
    says they can run slower, and why (the native kernels not built, or the layers not timed)."""
    from graphopt.ops import native

    monkeypatch.setattr(native, "has_kernel", lambda counter: built)
    samples = Path(__file__).resolve().parents[1] / "samples"
    code, out, _ = _call(capfd, "optimize", samples / "digits_cnn.onnx", "-o", tmp_path / "e.onnx", "--method",
                         "exprune", "--calib", samples / "digits_calib.npz", "--exprune-fnr", "0.05",
                         "--exprune-layers", "all", "--quiet")
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("note: 2 Conv+ReLU layer(s)")]
    assert len(notes) == 1
    assert ("native kernels are not built" in notes[0]) != built and ("without being timed" in notes[0]) == built
    assert notes[0].startswith("note: 2 Conv+ReLU layer(s) and 1 linear layer(s) became") == built  # both kinds


def test_bench_resolves_dynamic_dims_the_error_names(capfd, tmp_path) -> None:
    """A model with a dynamic sequence axis: bench asks for --input-shape and takes it, by symbol or by input,
    alone and with a second model."""
    model = tiny("y = Relu(x)", inputs="float[N, sequence, 4] x", outputs="float[N, sequence, 4] y")
    path = tmp_path / "seq.onnx"
    onnx.save_model(model, str(path))
    code, _, err = _call(capfd, "bench", path, "--repeat", "3", "--quiet")
    _assert_one_error_line(err, "give --input-shape sequence=N")
    assert code == 2
    for shape in ("sequence=16", "x=1x16x4"):
        code, out, err = _call(capfd, "bench", path, "--repeat", "3", "--quiet", "--json", "--input-shape", shape)
        assert code == 0, err
        assert json.loads(out)["batch"] == 1
    code, out, err = _call(capfd, "bench", path, path, "--repeat", "3", "--batch", "2", "--quiet", "--json",
                           "--input-shape", "sequence=16")
    assert code == 0 and json.loads(out)["batch"] == 2, err


def test_optimize_names_layers_it_could_not_count(tmp_path, capfd) -> None:
    """A model whose If branch cannot run one sample (Silero VAD's switch, tests/test_api.py): the summary says
    how many layers its MACs leave out, the report names them, the warning names the If's layers as unpruned."""
    from tests.test_api import _switch_model

    model = tmp_path / "switch.onnx"
    onnx.save(_switch_model(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=weights(8, 16, seed=4), sr=np.array(16000, dtype=np.int64))
    code, out, err = _call(capfd, "optimize", model, "-o", tmp_path / "out.onnx", "--method", "snp", "--target-macs",
                           "0.7", "--calib", calib, "--report", tmp_path / "report.json", "--quiet")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and report["macs_before"] == 16 * 16 + 16 * 16 + 16 * 4
    assert f"{len(report['macs_uncounted'])} layers not counted" in out and len(report["macs_uncounted"]) == 2
    assert "If_3 (If): 4 layers inside its bodies are not pruned" in err

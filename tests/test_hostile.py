"""Hostile inputs on every command: each is refused with exit code 2 and one useful line on stderr, and
leaves every file as it was (byte-identical, nothing created, nothing removed).

The committed sample model and calibration data are copied into the test's folder and then damaged,
redirected or aliased: external data that escapes the model's folder or lies beyond its file, models and
data files that are truncated, empty, folders, FIFOs or devices, data that is not finite, pickled, of the
wrong rank or missing an input, and outputs that name an input (by path, symlink or hard link), another
output, a folder, a FIFO or a missing folder. Cases that could block on a FIFO run in a subprocess with a
timeout; the others call `graphopt.cli.main` in-process. A second part kills `optimize` and `calibrate`
in the middle of writing over an earlier output and checks that the earlier output survives intact and
that nothing else is left (where the filesystem has no O_TMPFILE, the documented hidden temporary file may).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from graphopt.cli import main
from tests.ir.test_io import without_documented_temporaries

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"

Files = dict[str, Path]


@pytest.fixture
def sample(tmp_path: Path) -> Files:
    shutil.copy(SAMPLES / "digits_cnn.onnx", tmp_path / "model.onnx")
    shutil.copy(SAMPLES / "digits_calib.npz", tmp_path / "calib.npz")
    return {"dir": tmp_path, "model": tmp_path / "model.onnx", "calib": tmp_path / "calib.npz",
            "out": tmp_path / "out.onnx", "report": tmp_path / "report.json", "stats": tmp_path / "stats.npz"}


def _images(count: int = 8) -> np.ndarray:
    return np.load(SAMPLES / "digits_calib.npz")["input"][:count]


# --- building hostile files -----------------------------------------------------------------------------


def _external(f: Files, location: str = "weights.bin", offset: int = 0, length: int | None = None,
              file_name: str = "weights.bin") -> Path:
    """The sample model in f/ext/ with its largest weight moved to `file_name`, referenced as `location`
    at `offset`/`length`; a readable copy of those bytes also lies just outside the folder (secret.bin)."""
    folder = f["dir"] / "ext"
    folder.mkdir(exist_ok=True)
    model = onnx.load(str(f["model"]))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    payload = tensor.raw_data
    (folder / file_name).write_bytes(payload)
    (f["dir"] / "secret.bin").write_bytes(payload)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": offset, "length": len(payload) if length is None else length}
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=str(value))
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _linked_out(f: Files, name: str) -> Path:
    path = _external(f, location=name)
    os.symlink(f["dir"] / "secret.bin", path.parent / name)
    return path


def _linked_folder(f: Files) -> Path:
    (f["dir"] / "ext").mkdir()
    os.symlink(f["dir"], f["dir"] / "ext" / "up")
    return _external(f, location="up/secret.bin")


def _fifo(f: Files, name: str = "pipe") -> Path:
    path = f["dir"] / name
    os.mkfifo(path)
    return path


def _fifo_external(f: Files) -> Path:
    path = _external(f, location="pipe.bin")
    os.mkfifo(path.parent / "pipe.bin")
    return path


def _bytes(f: Files, name: str, data: bytes) -> Path:
    (f["dir"] / name).write_bytes(data)
    return f["dir"] / name


def _truncated(f: Files) -> Path:
    data = f["model"].read_bytes()
    return _bytes(f, "truncated.onnx", data[: len(data) // 2])


def _npz(f: Files, name: str, **arrays: np.ndarray) -> Path:
    np.savez(f["dir"] / name, **arrays)
    return f["dir"] / name


def _not_finite(f: Files, value: float) -> Path:
    images = _images()
    images[3, 0, 4, 4] = value
    return _npz(f, "not_finite.npz", input=images)


class _CreatesAFileWhenUnpickled:
    """Unpickling calls open(sentinel, "w"): if the sentinel exists afterwards, the data was unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return open, (str(self.sentinel), "w")


def _pickled(f: Files) -> Path:
    objects = np.empty(2, dtype=object)
    objects[:] = [_CreatesAFileWhenUnpickled(f["dir"] / "unpickled"), 1]
    path = f["dir"] / "pickled.npz"
    np.savez(path, input=objects)
    assert pickle.dumps(objects)  # a real pickle payload is inside
    return path


def _hard_link(source: Path, name: str) -> Path:
    link = source.parent / name
    os.link(source, link)
    return link


def _symlink(source: Path, name: str) -> Path:
    link = source.parent / name
    os.symlink(source, link)
    return link


def _stats_file(f: Files) -> Path:
    f["stats"].write_bytes(b"statistics that must survive")
    return f["stats"]


# --- the cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Files], list[object]]
    fragment: str
    subprocess: bool = False  # could block on a FIFO if graphopt regressed: run it where a timeout can kill it


def _optimize(f: Files, model: Path | None = None, *extra: object, method: str = "none") -> list[object]:
    return ["optimize", model or f["model"], "-o", f["out"], "--method", method, *extra]


CASES = [
    # models: external data, damaged files, special files
    Case("external_traversal", lambda f: ["inspect", _external(f, location="../secret.bin")],
         "escapes the model's directory"),
    Case("external_absolute", lambda f: _optimize(f, _external(f, location=str(f["dir"] / "secret.bin"))),
         "must be a relative path inside the model's directory"),
    Case("external_symlink_out", lambda f: ["verify", f["model"], _linked_out(f, "link.bin"), "--data", f["calib"]],
         "resolves outside the model's directory"),
    Case("external_symlinked_folder", lambda f: ["bench", _linked_folder(f), "--repeat", "1"],
         "resolves outside the model's directory"),
    Case("external_offset_beyond_file", lambda f: _optimize(f, _external(f, offset=36864, length=4)),
         "offset 36864 + length 4 exceeds the file's 36864 bytes"),
    Case("external_length_beyond_file", lambda f: ["calibrate", _external(f, length=36865), "--data", f["calib"],
                                                   "-o", f["stats"]], "exceeds the file's 36864 bytes"),
    Case("external_shorter_than_the_tensor", lambda f: ["inspect", _external(f, length=4)],
         "raw_data size (4 bytes) is too small for the declared shape and type (36864 bytes required)"),
    Case("external_missing", lambda f: ["inspect", _external(f, location="gone.bin")], "gone.bin': file not found"),
    Case("external_fifo", lambda f: _optimize(f, _fifo_external(f)), "pipe.bin is a FIFO, not a regular file",
         subprocess=True),
    Case("truncated_model", lambda f: _optimize(f, _truncated(f)), "is not a valid ONNX model (truncated or corrupt)"),
    Case("zero_byte_model", lambda f: ["inspect", _bytes(f, "empty.onnx", b"")], "not a valid ONNX model (no graph"),
    Case("garbage_model", lambda f: ["bench", _bytes(f, "junk.onnx", b"\xff" * 64)], "is not a valid ONNX model"),
    Case("folder_as_model", lambda f: _optimize(f, f["dir"]), "is a folder, not a regular file"),
    Case("fifo_as_model", lambda f: _optimize(f, _fifo(f, "pipe.onnx")), "pipe.onnx is a FIFO, not a regular file",
         subprocess=True),
    Case("fifo_as_inspected_model", lambda f: ["inspect", _fifo(f, "pipe.onnx")], "is a FIFO", subprocess=True),
    Case("dev_zero_as_model", lambda f: ["calibrate", "/dev/zero", "--data", f["calib"], "-o", f["stats"]],
         "/dev/zero is a device, not a regular file"),
    Case("dev_null_as_model", lambda f: ["verify", "/dev/null", f["model"], "--data", f["calib"]],
         "/dev/null is a device, not a regular file"),
    # data
    Case("fifo_as_calib", lambda f: _optimize(f, None, "--calib", _fifo(f)), "pipe is a FIFO, not a regular file",
         subprocess=True),
    Case("fifo_as_calibrate_data", lambda f: ["calibrate", f["model"], "--data", _fifo(f), "-o", f["stats"]],
         "is a FIFO", subprocess=True),
    Case("fifo_as_stats", lambda f: _optimize(f, None, "--stats", _fifo(f), "--target-macs", "0.5", method="snp"),
         "is a FIFO, not a regular file", subprocess=True),
    Case("dev_zero_as_calib", lambda f: _optimize(f, None, "--calib", "/dev/zero"), "/dev/zero is a device"),
    Case("dev_null_as_data", lambda f: ["bench", f["model"], "--data", "/dev/null", "--repeat", "1"],
         "/dev/null is a device"),
    Case("nan_calibration", lambda f: _optimize(f, None, "--calib", _not_finite(f, np.nan)),
         "input 'input' contains NaN or Inf"),
    Case("inf_calibration", lambda f: ["calibrate", f["model"], "--data", _not_finite(f, np.inf), "-o", f["stats"]],
         "contains NaN or Inf"),
    Case("pickled_object_array", lambda f: ["verify", f["model"], f["model"], "--data", _pickled(f)],
         "is not a readable .npz of numeric arrays"),
    Case("missing_input", lambda f: _optimize(f, None, "--calib", _npz(f, "keys.npz", image=_images(),
                                                                        mask=_images())), "missing: ['input']"),
    Case("wrong_rank", lambda f: ["verify", f["model"], f["model"], "--data", _npz(f, "rank.npz", input=_images()[:, 0])],
         "expects rank 4"),
    Case("npy_not_npz", lambda f: _optimize(f, None, "--calib", _bytes(f, "calib.npy", b"\x93NUMPY" + b"\0" * 64)),
         "is not an .npz archive"),
    # outputs that name an input or another output, or cannot be written
    Case("output_is_model", lambda f: _optimize(f) + ["-o", f["model"]], "is the same file as input"),
    Case("output_symlink_to_model", lambda f: _optimize(f) + ["-o", _symlink(f["model"], "alias.onnx")],
         "alias.onnx is the same file as input"),
    Case("output_hard_link_to_model", lambda f: _optimize(f) + ["-o", _hard_link(f["model"], "hard.onnx")],
         "hard.onnx is the same file as input"),
    Case("output_is_external_data", lambda f: ["optimize", _external(f), "-o", f["dir"] / "ext" / "weights.bin",
                                               "--method", "none"], "weights.bin is the same file as input"),
    Case("output_data_file_is_external_data",
         lambda f: ["optimize", _external(f, location="out.onnx.data", file_name="out.onnx.data"), "-o",
                    f["dir"] / "ext" / "out.onnx", "--method", "none"], "out.onnx.data is the same file as input"),
    Case("output_is_calib", lambda f: _optimize(f, None, "--calib", f["calib"]) + ["-o", f["calib"]],
         "is the same file as input"),
    Case("report_is_model", lambda f: _optimize(f, None, "--report", f["model"]), "is the same file as input"),
    Case("report_hard_link_to_calib", lambda f: _optimize(f, None, "--calib", f["calib"], "--report",
                                                          _hard_link(f["calib"], "report.json")),
         "report.json is the same file as input"),
    Case("report_symlink_to_stats", lambda f: _optimize(f, None, "--stats", _stats_file(f), "--report",
                                                        _symlink(f["stats"], "report.json"), method="snp"),
         "report.json is the same file as input"),
    Case("report_is_output", lambda f: _optimize(f, None, "--report", f["out"]), "two outputs to one file"),
    Case("report_is_output_data_file", lambda f: _optimize(f, None, "--report", f["dir"] / "out.onnx.data"),
         "two outputs to one file"),
    Case("calibrate_output_is_model", lambda f: ["calibrate", f["model"], "--data", f["calib"], "-o", f["model"]],
         "is the same file as input"),
    Case("calibrate_output_symlink_to_data",
         lambda f: ["calibrate", f["model"], "--data", f["calib"], "-o", _symlink(f["calib"], "stats.npz")],
         "stats.npz is the same file as input"),
    Case("calibrate_output_hard_link_to_model",
         lambda f: ["calibrate", f["model"], "--data", f["calib"], "-o", _hard_link(f["model"], "stats.npz")],
         "stats.npz is the same file as input"),
    Case("output_in_missing_folder", lambda f: _optimize(f) + ["-o", f["dir"] / "nowhere" / "out.onnx"],
         "output directory does not exist"),
    Case("report_in_missing_folder", lambda f: _optimize(f, None, "--report", f["dir"] / "nowhere" / "r.json"),
         "output directory does not exist"),
    Case("calibrate_output_in_missing_folder",
         lambda f: ["calibrate", f["model"], "--data", f["calib"], "-o", f["dir"] / "nowhere" / "s.npz"],
         "output directory does not exist"),
    Case("output_is_a_folder", lambda f: _optimize(f) + ["-o", f["dir"]], "output path is a directory"),
    Case("output_is_a_fifo", lambda f: _optimize(f) + ["-o", _fifo(f, "pipe.onnx")],
         "refusing to replace", subprocess=True),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (not following symlinks): a regular file by its SHA-256, others by kind."""
    found = {}
    for parent, folders, names in os.walk(folder):
        for name in folders + names:
            path = Path(parent) / name
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(folder))
            if stat.S_ISREG(mode):
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = os.readlink(path) if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else "special"
    return found


def _run(argv: list[str], timeout: float = 120) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", *argv], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input_is_refused_and_nothing_changes(sample: Files, capfd: pytest.CaptureFixture[str],
                                                      case: Case) -> None:
    argv = [str(arg) for arg in case.argv(sample)] + ["--quiet"]
    before = _snapshot(sample["dir"])
    if case.subprocess:
        code, out, err = _run(argv)
    else:
        code = main(argv)
        out, err = capfd.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ") and case.fragment in lines[0], err
    assert out == ""
    assert _snapshot(sample["dir"]) == before  # inputs byte-identical, no output (or temporary file) created
    assert Path("/dev/null").is_char_device() and Path("/dev/zero").is_char_device()


def test_the_sample_itself_is_accepted(sample: Files, capfd: pytest.CaptureFixture[str]) -> None:
    """The hostile cases fail for the reason they state: the untouched copies run through every command."""
    assert main(["optimize", str(sample["model"]), "-o", str(sample["out"]), "--method", "magnitude", "--target-macs",
                 "0.5", "--calib", str(sample["calib"]), "--report", str(sample["report"]), "--quiet"]) == 0
    assert main(["calibrate", str(sample["model"]), "--data", str(sample["calib"]), "-o", str(sample["stats"]),
                 "--quiet"]) == 0
    assert main(["verify", str(sample["model"]), str(sample["out"]), "--data", str(sample["calib"]), "--quiet"]) == 0
    external = _external(sample)
    assert main(["inspect", str(external)]) == 0
    assert main(["bench", str(external), "--repeat", "1", "--quiet"]) == 0
    assert "macs" in capfd.readouterr().out.lower()
    assert sorted(p.name for p in sample["dir"].iterdir()) == ["calib.npz", "ext", "model.onnx", "out.onnx",
                                                              "report.json", "secret.bin", "stats.npz"]


# --- killed in the middle of a write ----------------------------------------------------------------------

_STALLED = """
import os, sys
from graphopt.cli import main

def stall(handle):  # the new contents are written but not yet renamed into place: wait until killed
    print("stalled", flush=True)
    sys.stdin.read()

os.fsync = stall
main(sys.argv[1:])
"""


def _argv_for_kill(f: Files, command: str) -> list[str]:
    if command == "optimize":
        return ["optimize", str(f["model"]), "-o", str(f["out"]), "--method", "magnitude", "--target-macs", "0.5",
                "--report", str(f["report"]), "--quiet"]
    return ["calibrate", str(f["model"]), "--data", str(f["calib"]), "-o", str(f["stats"]), "--quiet"]


@pytest.mark.parametrize("command", ["optimize", "calibrate"])
def test_killed_mid_write_the_earlier_output_survives(sample: Files, command: str) -> None:
    for name in ("out", "report", "stats"):
        sample[name].write_bytes(f"an earlier {name} the user keeps".encode())
    before = _snapshot(sample["dir"])
    child = subprocess.Popen([sys.executable, "-c", _STALLED, *_argv_for_kill(sample, command)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "stalled\n", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    after = _snapshot(sample["dir"])
    assert {name: after[name] for name in without_documented_temporaries(list(after), sample["dir"])} == before

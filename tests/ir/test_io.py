"""Loading and saving: external data (trusted only inside the model's directory), atomic writes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.errors import ModelLoadError, OptionError, OutputPathError, UnsafeExternalDataError
from graphopt.ir import files, io
from tests.conftest import assert_equivalent, init, random_inputs, tiny, weights, with_raw_data


def _model(raw: bool = True) -> onnx.ModelProto:
    """MatMul + Add with 8.3 kB of weights, stored as raw_data (as exporters do) or as float_data."""
    model = tiny("""c = MatMul (x, w)
                    y = Add (c, b)""", inputs="float[N, 64] x", outputs="float[N, 32] y",
                 inits=", ".join([init("w", weights(64, 32)), init("b", weights(32, seed=1))]))
    return with_raw_data(model) if raw else model


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx turns the model it saves into external references
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("location", ["weights.bin", "sub/dir/weights.bin"])
def test_load_external_data(tmp_path, location):
    model = _model()
    (tmp_path / location).parent.mkdir(parents=True, exist_ok=True)
    path = _save_external(model, tmp_path / "m.onnx", location)
    assert (tmp_path / location).stat().st_size == (64 * 32 + 32) * 4
    loaded = io.load_model(path)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in io.model_tensors(loaded))
    np.testing.assert_array_equal(_initializers(loaded)["w"], weights(64, 32))
    assert_equivalent(model, loaded, random_inputs(model))
    assert io.input_files(path) == {path.resolve(), (tmp_path / location).resolve()}


def _external_reference(model: onnx.ModelProto, location: str, offset: int | str = 0,
                        length: int | str | None = None, tensor_name: str = "w") -> onnx.ModelProto:
    """Point initializer `tensor_name` at `location` without writing any data."""
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return model


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if any external data is read (by graphopt's reader or onnx's)."""
    def refuse(*args, **kwargs):
        raise AssertionError("external data was read before validation")

    monkeypatch.setattr(io, "_load_external", refuse)
    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", refuse)


def _write_model_with_reference(tmp_path: Path, **reference: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(weights(64, 32).tobytes())
    (tmp_path / "secret.bin").write_bytes(weights(64, 32).tobytes())  # readable, just outside
    path = folder / "m.onnx"
    onnx.save_model(_external_reference(_model(), **reference), str(path))  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("reference,message", [
    ({"location": "ABSOLUTE"}, "must be a relative path"),
    ({"location": "../secret.bin"}, "escapes the model's directory"),
    ({"location": "sub/../../secret.bin"}, "escapes the model's directory"),
    ({"location": "missing.bin"}, "file not found"),
    ({"location": "weights.bin", "offset": 4, "length": 64 * 32 * 4}, "exceeds the file's 8192 bytes"),
    ({"location": "weights.bin", "offset": 9000}, "exceeds the file's 8192 bytes"),
    ({"location": "weights.bin", "offset": "x"}, "not integers"),
    ({"location": "weights.bin", "length": -1}, "exceeds"),
], ids=["absolute", "dotdot", "nested_dotdot", "missing", "length_past_end", "offset_past_end", "non_integer",
        "negative_length"])
def test_unsafe_external_data_is_refused_before_reading(tmp_path, no_reading, reference, message):
    if reference["location"] == "ABSOLUTE":
        reference = {**reference, "location": str((tmp_path / "secret.bin").resolve())}
    path = _write_model_with_reference(tmp_path, **reference)
    with pytest.raises(UnsafeExternalDataError, match=message) as info:
        io.load_model(path)
    assert "'w'" in str(info.value) and "\n" not in str(info.value)


def test_symlink_escaping_the_directory_is_refused(tmp_path, no_reading):
    path = _write_model_with_reference(tmp_path, location="link.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    with pytest.raises(UnsafeExternalDataError, match="resolves outside the model's directory"):
        io.load_model(path)


def test_symlinked_directory_escaping_is_refused(tmp_path, no_reading):
    path = _write_model_with_reference(tmp_path, location="linked/secret.bin")
    os.symlink(tmp_path, path.parent / "linked")
    with pytest.raises(UnsafeExternalDataError, match="resolves outside"):
        io.load_model(path)


def test_symlink_inside_the_directory_is_followed(tmp_path):
    # the link resolves inside the model's directory, so it is as safe as naming the file itself
    path = _write_model_with_reference(tmp_path, location="alias.bin", length=64 * 32 * 4)
    os.symlink(path.parent / "weights.bin", path.parent / "alias.bin")
    loaded = io.load_model(path)
    np.testing.assert_array_equal(_initializers(loaded)["w"], weights(64, 32))
    assert io.input_files(path) == {path.resolve(), (path.parent / "weights.bin").resolve()}


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_external_data_that_is_not_a_regular_file_is_refused(tmp_path, no_reading, kind):
    path = _write_model_with_reference(tmp_path, location="special", length=16)
    os.mkfifo(path.parent / "special") if kind == "fifo" else (path.parent / "special").mkdir()
    with pytest.raises(UnsafeExternalDataError, match=f"is a {kind.replace('fifo', 'FIFO')}, not a regular file"):
        io.load_model(path)


def test_external_data_that_shrank_after_the_check_is_refused(tmp_path, monkeypatch):
    path = _write_model_with_reference(tmp_path, location="weights.bin", length=64 * 32 * 4)
    checked = io._external_extents

    def shrink_after_checking(model, base_dir):
        extents = checked(model, base_dir)
        (path.parent / "weights.bin").write_bytes(b"\0" * 100)
        return extents

    monkeypatch.setattr(io, "_external_extents", shrink_after_checking)
    with pytest.raises(UnsafeExternalDataError, match="is now 100 bytes, shorter than offset 0 \\+ length 8192"):
        io.load_model(path)


def test_unsafe_reference_in_a_constant_attribute_is_refused(tmp_path, no_reading):
    model = tiny("k = Constant <value = float[2] {1.0, 2.0}> ()\n y = Add (x, k)", inputs="float[N, 2] x",
                 outputs="float[N, 2] y")
    tensor = model.graph.node[0].attribute[0].t
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 8)
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "m.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(UnsafeExternalDataError, match="escapes"):
        io.load_model(path)


def test_missing_truncated_and_garbage_files_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        io.load_model(tmp_path / "nope.onnx")
    data = _model().SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        io.load_model(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model at all\xff" * 10)
    with pytest.raises(ModelLoadError):
        io.load_model(garbage)
    with pytest.raises(ModelLoadError, match="is a folder, not a regular file"):
        io.load_model(tmp_path)


def test_invalid_graph_fails_the_checker_with_one_line(tmp_path):
    model = _model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelLoadError, match="fails the ONNX checker") as info:
        io.load_model(path)
    assert "\n" not in str(info.value)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model = _model()
    out = io.save_model(model, tmp_path / "out.onnx")
    assert _listing(tmp_path) == ["out.onnx"]
    assert_equivalent(model, io.load_model(out), random_inputs(model))
    changed = _model()
    changed.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(32, np.float32), "b"))
    io.save_model(changed, out)  # overwriting an earlier output is fine
    assert _listing(tmp_path) == ["out.onnx"]
    assert not _initializers(io.load_model(out))["b"].any()


def test_failed_save_leaves_the_previous_file_and_no_debris(tmp_path, monkeypatch):
    out = io.save_model(_model(), tmp_path / "out.onnx")
    before = out.read_bytes()

    def disk_full(handle):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new bytes are written but never made durable
    with pytest.raises(OutputPathError, match="cannot write .*out.onnx: No space left on device"):
        io.save_model(_model(), out)
    assert out.read_bytes() == before
    assert _listing(tmp_path) == ["out.onnx"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "float_data"])
def test_large_models_are_saved_with_external_data(tmp_path, raw):
    model = _model(raw)
    out = io.save_model(model, tmp_path / "big.onnx", external_threshold=1000)
    assert _listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 1000 < (tmp_path / "big.onnx.data").stat().st_size
    header = onnx.load(str(out), load_external_data=False)
    assert {e.key: e.value for e in header.graph.initializer[0].external_data}["location"] == "big.onnx.data"
    loaded = io.load_model(out)
    np.testing.assert_array_equal(_initializers(loaded)["w"], weights(64, 32))
    assert_equivalent(model, loaded, random_inputs(model))
    assert model == _model(raw)  # the caller's model was not turned into external references


def test_small_models_are_saved_in_one_file(tmp_path):
    io.save_model(_model(), tmp_path / "small.onnx")
    assert _listing(tmp_path) == ["small.onnx"]


def test_refuses_to_overwrite_the_input_model_or_its_data(tmp_path):
    source = _save_external(_model(), tmp_path / "in.onnx", location="out.onnx.data")
    protected = io.input_files(source)
    snapshot = {p: p.read_bytes() for p in protected}
    with pytest.raises(OutputPathError, match="refusing to overwrite the input model"):
        io.save_model(_model(), source, protected=protected)
    with pytest.raises(OutputPathError, match="refusing"):  # out.onnx would write out.onnx.data
        io.save_model(_model(), tmp_path / "out.onnx", protected=protected)
    with pytest.raises(OutputPathError, match="refusing"):  # the same file by another spelling
        io.save_model(_model(), tmp_path / "." / "sub" / ".." / "in.onnx", protected=protected)
    assert {p: p.read_bytes() for p in protected} == snapshot
    assert _listing(tmp_path) == ["in.onnx", "out.onnx.data"]


def test_bad_output_locations(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        io.save_model(_model(), tmp_path / "missing" / "out.onnx")
    with pytest.raises(OutputPathError, match="is a directory"):
        io.save_model(_model(), tmp_path)


def test_zero_byte_model_is_refused(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model \\(no graph or opset\\)"):
        io.load_model(tmp_path / "empty.onnx")


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.onnx")  # nobody writes: a blocking open or read would never return
    monkeypatch.setattr(files, "not_regular", lambda path: None)  # as if it was a regular file when checked
    with pytest.raises(ModelLoadError, match="pipe.onnx is a FIFO, not a regular file"):
        io.load_model(tmp_path / "pipe.onnx")


def test_reads_stop_at_the_size_on_disk(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path))
    assert files.read_regular(path) == path.read_bytes() == _model().SerializeToString()
    with pytest.raises(ModelLoadError, match="is a device, not a regular file"):
        files.read_regular("/dev/zero")


def _clash_cases(folder: Path) -> dict[str, tuple[list[Path], str]]:
    source = folder / "in.onnx"
    source.write_bytes(b"model")
    os.link(source, folder / "hard.onnx")
    os.symlink(source, folder / "soft.onnx")
    (folder / "sub").mkdir()
    return {
        "same_path": ([source], "output .*in.onnx is the same file as input .*in.onnx"),
        "respelled": ([folder / "sub" / ".." / "in.onnx"], "is the same file as input"),
        "hard_link": ([folder / "hard.onnx"], "output .*hard.onnx is the same file as input .*in.onnx"),
        "symlink": ([folder / "soft.onnx"], "output .*soft.onnx is the same file as input"),
        "two_outputs": ([folder / "a.json", folder / "sub" / ".." / "a.json"], "two outputs to one file"),
        "folder": ([folder / "sub"], "output path is a directory"),
        "device": ([Path("/dev/null")], "refusing to replace /dev/null: it is a device, not a regular file"),
        "missing_folder": ([folder / "nowhere" / "o.onnx"], "output directory does not exist"),
    }


@pytest.mark.parametrize("case", ["same_path", "respelled", "hard_link", "symlink", "two_outputs", "folder", "device",
                                  "missing_folder"])
def test_check_outputs_refuses(tmp_path, case):
    outputs, message = _clash_cases(tmp_path)[case]
    with pytest.raises(OutputPathError, match=message):
        io.check_outputs(outputs, [tmp_path / "in.onnx"])


def test_check_outputs_accepts_new_and_earlier_outputs(tmp_path):
    (tmp_path / "old.onnx").write_bytes(b"an earlier output")
    io.check_outputs([tmp_path / "old.onnx", tmp_path / "new.json"], [])
    with pytest.raises(OptionError, match="refusing to overwrite"):  # the caller picks the error type of a clash
        io.check_outputs([tmp_path / "old.onnx"], [tmp_path / "old.onnx"], clash=OptionError)


def test_atomic_write_follows_a_symlinked_destination_and_keeps_permissions(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "report.json"
    target.write_bytes(b"old")
    target.chmod(0o640)
    os.symlink(target, tmp_path / "link.json")
    io.write_atomic(tmp_path / "link.json", lambda stream: stream.write(b"new"))
    assert (tmp_path / "link.json").is_symlink() and target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert _listing(tmp_path) == ["link.json", "real", "real/report.json"]
    umask = os.umask(0o027)
    try:
        io.write_atomic(tmp_path / "fresh.json", lambda stream: stream.write(b"{}"))
    finally:
        os.umask(umask)
    assert (tmp_path / "fresh.json").stat().st_mode & 0o777 == 0o640


def without_documented_temporaries(listing: list[str], folder: Path) -> list[str]:
    """`listing` of `folder` less the hidden `.NAME.XXXXXXXX.tmp` files a killed write may leave where the
    filesystem has no anonymous files (O_TMPFILE); where it has them, nothing may be left."""
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
        return listing
    except (AttributeError, OSError):
        return [name for name in listing if not re.fullmatch(r"\..+\.\w{8,}\.tmp", Path(name).name)]


_STALLED_WRITER = """
import os, sys
import onnx
from graphopt.ir import io
destination, source, how = sys.argv[1:]

def stall(*args):  # the new bytes are (partly) written: wait here until killed
    print("stalled", flush=True)
    sys.stdin.read()

if how == "write_atomic":
    def write(stream):
        stream.write(b"new" * 500_000)
        stall()
    io.write_atomic(destination, write)
else:
    os.fsync = stall
    io.save_model(onnx.load(source), destination, external_threshold=1000 if how == "external" else 2**40)
"""


@pytest.mark.parametrize("how", ["write_atomic", "save_model", "external"])
def test_a_write_killed_midway_leaves_the_previous_file_and_nothing_else(tmp_path, how):
    (tmp_path / "out").mkdir()
    destination = io.save_model(_model(), tmp_path / "out" / "model.onnx")
    before = destination.read_bytes()
    changed = _model()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights(64, 32, seed=7), "w"))
    onnx.save_model(changed, str(tmp_path / "new.onnx"))
    child = subprocess.Popen([sys.executable, "-c", _STALLED_WRITER, str(destination), str(tmp_path / "new.onnx"),
                              how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout.readline() == "stalled\n", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert destination.read_bytes() == before
    assert without_documented_temporaries(_listing(tmp_path / "out"), tmp_path / "out") == ["model.onnx"]

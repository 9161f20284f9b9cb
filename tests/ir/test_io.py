"""Loading and saving: external data (trusted only inside the model's directory), atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.errors import ModelLoadError, OutputPathError, UnsafeExternalDataError
from graphopt.ir import io
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
    """Fail the test if onnx is asked to read any external data."""
    def refuse(*args, **kwargs):
        raise AssertionError("external data was read before validation")

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


def test_symlink_inside_the_directory_is_a_load_error(tmp_path):
    # our check lets it through; onnx itself refuses symlinked data files: still one clear error
    path = _write_model_with_reference(tmp_path, location="alias.bin", length=64 * 32 * 4)
    os.symlink(path.parent / "weights.bin", path.parent / "alias.bin")
    with pytest.raises(ModelLoadError, match="cannot load its external data") as info:
        io.load_model(path)
    assert "\n" not in str(info.value)


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

    def half_write(model, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", half_write)
    with pytest.raises(OutputPathError, match="disk full"):
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

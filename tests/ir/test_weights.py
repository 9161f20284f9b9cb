"""Weights held by reference (graphopt/ir/weights.py): models over 2 GB load, run, prune and save without
copying their weights into protobuf messages. The tests lower the size threshold so that small models take
the same path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calibration.capture import cone_fingerprints
from graphopt.calibration.session import make_session
from graphopt.errors import UnsafeExternalDataError
from graphopt.ir import graph as ir
from graphopt.ir import weights
from graphopt.ir.io import load_model

WIDTH, HIDDEN = 32, 96


@pytest.fixture
def by_reference(monkeypatch):
    monkeypatch.setattr(weights, "BY_REFERENCE_BYTES", 0)
    monkeypatch.setattr(weights, "REFERENCE_MIN_BYTES", 1024)


def mlp(folder: Path, pad: int = 0, seed: int = 0) -> Path:
    """x [N, WIDTH] -> MatMul up -> Relu -> MatMul down -> + x, both weights in one external data file
    (`pad` bytes before each, to test unaligned offsets)."""
    rng = np.random.default_rng(seed)
    arrays = {"up": rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32) / 4,
              "down": rng.standard_normal((HIDDEN, WIDTH)).astype(np.float32) / 8}
    initializers, offset = [], 0
    with open(folder / "mlp.data", "wb") as stream:
        for name, values in arrays.items():
            stream.write(b"\0" * pad)
            offset += pad
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=values.shape,
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "mlp.data"), ("offset", str(offset)), ("length", str(values.nbytes))):
                tensor.external_data.add(key=key, value=value)
            stream.write(values.tobytes())
            offset += values.nbytes
            initializers.append(tensor)
    initializers.append(numpy_helper.from_array(np.full(HIDDEN, 0.1, np.float32), "bias"))
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"]), helper.make_node("Add", ["h", "bias"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["a"]), helper.make_node("MatMul", ["a", "down"], ["f"]),
             helper.make_node("Add", ["x", "f"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="vocab", value="a b c")
    path = folder / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def inputs(count: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((6, WIDTH)).astype(np.float32)
    return {"x": rng.standard_normal((count, 6)).astype(np.float32) @ basis
            + 0.05 * rng.standard_normal((count, WIDTH)).astype(np.float32)}


def file_outputs(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(str(path)).run(None, feed)[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("pad", [0, 1])
def test_load_maps_external_weights_read_only(tmp_path, by_reference, pad):
    path = mlp(tmp_path, pad=pad)
    model = load_model(path)
    held = {t.name: weights.array_of(t) for t in weights.referenced(model.graph)}
    assert set(held) == {"up", "down"}  # the small inline bias stays inline
    expected = onnx.load(str(path))
    for tensor in expected.graph.initializer:
        if tensor.name in held:
            np.testing.assert_array_equal(held[tensor.name], numpy_helper.to_array(tensor))
    if pad == 0:
        assert isinstance(held["up"], np.memmap) and not held["up"].flags.writeable
        with pytest.raises(ValueError):
            held["up"][0, 0] = 1.0  # a pass can never edit the user's file through its mapping
    assert model.ByteSize() < 2000  # the proto holds no weight


def test_sessions_share_the_arrays_and_compute_what_the_file_does(tmp_path, by_reference):
    path = mlp(tmp_path)
    model = load_model(path)
    feed = inputs(16)
    session = make_session(model)
    np.testing.assert_allclose(session.run(None, feed)[0], file_outputs(path, feed), rtol=1e-6, atol=1e-6)
    by_name = {t.name: weights.array_of(t) for t in weights.referenced(model.graph)}
    shared = [array for array, _ in session._graphopt_shared_weights]
    assert all(any(np.shares_memory(array, held) for held in by_name.values()) for array in shared)


def test_export_names_the_same_arrays_with_the_same_keys(tmp_path, by_reference):
    graph = ir.import_graph(load_model(mlp(tmp_path)))
    first, second = ir.export_model(graph, load_model(tmp_path / "mlp.onnx")), None
    second = ir.export_model(graph, first)
    assert cone_fingerprints(first) == cone_fingerprints(second)
    assert sum(1 for _ in weights.referenced(first.graph)) == 2


def test_optimize_by_reference_matches_inline_and_leaves_the_input_alone(tmp_path, monkeypatch):
    path = mlp(tmp_path)
    np.savez(tmp_path / "calib.npz", **inputs(64))
    before = digest(tmp_path / "mlp.data")
    inline = graphopt.optimize(str(path), method="snp", calib=str(tmp_path / "calib.npz"), target_macs=0.7,
                               output=str(tmp_path / "inline.onnx"))
    monkeypatch.setattr(weights, "BY_REFERENCE_BYTES", 0)
    monkeypatch.setattr(weights, "REFERENCE_MIN_BYTES", 1024)
    held = graphopt.optimize(str(path), method="snp", calib=str(tmp_path / "calib.npz"), target_macs=0.7,
                             output=str(tmp_path / "held.onnx"))
    assert digest(tmp_path / "mlp.data") == before
    assert held.report["macs_ratio"] == inline.report["macs_ratio"] <= 0.7 * 1.02
    assert held.report["fidelity"]["rel_l2"] == pytest.approx(inline.report["fidelity"]["rel_l2"], rel=1e-4, abs=1e-7)
    assert held.report["steps"][0]["bytes"] == pytest.approx(inline.report["steps"][0]["bytes"], rel=0.02)
    assert (tmp_path / "held.onnx.data").is_file()  # a model held by reference is always saved with external data
    written = onnx.load(str(tmp_path / "held.onnx"))
    onnx.checker.check_model(str(tmp_path / "held.onnx"))
    assert {p.key: p.value for p in written.metadata_props} == {"vocab": "a b c"}
    monkeypatch.setattr(weights, "BY_REFERENCE_BYTES", 1 << 40)
    feed = inputs(8, seed=9)
    np.testing.assert_allclose(file_outputs(tmp_path / "held.onnx", feed), file_outputs(tmp_path / "inline.onnx", feed),
                               rtol=1e-5, atol=1e-5)


def test_external_length_that_contradicts_dims_is_refused(tmp_path, by_reference):
    path = mlp(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(int(entry.value) - 4)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UnsafeExternalDataError, match="does not match its dims"):
        load_model(path)


def test_materialized_inlines_every_reference(tmp_path, by_reference):
    model = load_model(mlp(tmp_path))
    inline = weights.materialized(model)
    assert not any(True for _ in weights.referenced(inline.graph))
    onnx.checker.check_model(inline)
    assert weights.model_bytes(model) == pytest.approx(inline.ByteSize(), rel=0.05)


def test_a_graph_held_by_reference_stays_held_when_it_shrinks(tmp_path, monkeypatch):
    """Loaded by reference, pruned below the threshold: still exported by reference (no copy of the weights);
    a graph built from an ordinary model below the threshold exports ordinary inline tensors."""
    monkeypatch.setattr(weights, "REFERENCE_MIN_BYTES", 1024)
    monkeypatch.setattr(weights, "BY_REFERENCE_BYTES", 0)
    model = load_model(mlp(tmp_path))
    graph = ir.import_graph(model)
    monkeypatch.setattr(weights, "BY_REFERENCE_BYTES", 1 << 40)
    node = next(n for n in graph.nodes if n.op == "MatMul")
    ir.set_input_array(graph, node, 1, np.asarray(node.inputs[1].values)[:, :48])  # a pass's new, smaller array
    exported = ir.export_model(graph, model)
    assert {t.name for t in weights.referenced(exported.graph)} == {"up", "down"}
    inline = ir.export_model(ir.import_graph(weights.materialized(exported)), model)
    onnx.checker.check_model(inline)
    assert all(t.data_location == TensorProto.DEFAULT for t in inline.graph.initializer)


def test_released_weights_read_back_unchanged(tmp_path, by_reference):
    """A replaced file-mapped weight gives its pages back; its values (and any other view of them) stay intact,
    and release leaves arrays that are not file mappings alone."""
    model = load_model(mlp(tmp_path))
    tensor = next(t for t in model.graph.initializer if t.name == "up")
    view, again = weights.array_of(tensor), weights.array_of(tensor)
    expected = np.array(view)
    weights.release(view)
    np.testing.assert_array_equal(view, expected)
    np.testing.assert_array_equal(again, expected)
    plain = np.ones(4096, np.float32)
    weights.release(plain)
    assert plain.sum() == 4096


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[-1] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="resident pages are read from /proc/self/smaps")
def test_release_mappings_drops_every_resident_page_of_the_weight_files(tmp_path, by_reference):
    """After a session read every weight, releasing the mappings leaves none of the file resident, and the
    weights read back unchanged (from the page cache) and compute the same outputs."""
    path = mlp(tmp_path)
    model = load_model(path)
    arrays = [np.array(a) for a in weights.arrays_of(model)]
    session = make_session(model)
    expected = session.run(None, inputs(8))[0]
    data = (tmp_path / "mlp.data").resolve()
    assert _mapped_kib(data) > 0
    weights.release_mappings()
    assert _mapped_kib(data) == 0
    for array, kept in zip(weights.arrays_of(model), arrays):
        np.testing.assert_array_equal(array, kept)
    np.testing.assert_array_equal(session.run(None, inputs(8))[0], expected)


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: BatchNorm folding
    makes new arrays (held by reference in these tests), and onnxruntime's optimisers would fuse the convolutions."""
    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.standard_normal((32, 3, 3, 3)) / 4, "g": 1 + 0.1 * rng.standard_normal(32),
              "b": 0.1 * rng.standard_normal(32), "m": 0.1 * rng.standard_normal(32), "v": 1 + rng.random(32),
              "w2": rng.standard_normal((32, 32, 3, 3)) / 16, "w3": rng.standard_normal((10, 32)) / 4}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("options", [{}, {"reconstruct_target": "original"}, {"sequential": True}])
def test_snp_on_a_cnn_held_by_reference_matches_inline(monkeypatch, options):
    """Convolutions held by reference calibrate as they do inline (their sessions skip onnxruntime's optimisers,
    which would read the placeholders), and a snapshot of the graph (the error-correcting fit's reference)
    stays valid after the graph has moved on."""
    model = conv_net()
    calib = {"x": np.random.default_rng(3).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    inline = graphopt.optimize(model, method="snp", calib=calib, target_macs=0.5, round_to=1, **options)
    monkeypatch.setattr(weights, "BY_REFERENCE_BYTES", 0)
    monkeypatch.setattr(weights, "REFERENCE_MIN_BYTES", 1024)
    held = graphopt.optimize(model, method="snp", calib=calib, target_macs=0.5, round_to=1, **options)
    assert any(True for _ in weights.referenced(held.model.graph))
    assert held.report["macs_ratio"] == inline.report["macs_ratio"]
    assert held.report["fidelity"]["rel_l2"] == pytest.approx(inline.report["fidelity"]["rel_l2"], rel=1e-3, abs=1e-6)
    feed = {"x": calib["x"][:8]}
    np.testing.assert_allclose(make_session(held.model).run(None, feed)[0],
                               make_session(inline.model).run(None, feed)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="resident pages are read from /proc/self/smaps")
def test_a_finished_session_gives_back_the_weight_pages_it_read(tmp_path, by_reference):
    path = mlp(tmp_path)
    model = load_model(path)
    views = weights.arrays_of(model)  # the mapping stays while the graph's arrays do
    session = make_session(model)
    session.run(None, inputs(8))
    data = (tmp_path / "mlp.data").resolve()
    assert _mapped_kib(data) > 0
    del session
    assert _mapped_kib(data) == 0 and float(views[0].sum()) != 0.0

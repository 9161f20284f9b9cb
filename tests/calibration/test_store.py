"""Statistics files (graphopt/calibration/store.py), `graphopt calibrate` and `optimize --stats`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from graphopt.api import calibrate
from graphopt.calibration.capture import linear_inputs
from graphopt.calibration.data import load_data
from graphopt.calibration.stats import StatRequest
from graphopt.calibration.store import StaleStatsError, StatsFile, load_stats, save_stats
from graphopt.cli import main
from graphopt.errors import DataError, OutputPathError
from graphopt.ir import graph as ir
from graphopt.passes import PassContext, PassManager, normalising_passes
from tests.calibration.helpers import collect


def bn_model(second_weight_scale: float = 1.0) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (BN gets folded)."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((6, 3, 3, 3)), "scale": rng.uniform(0.5, 2, 6), "shift": rng.standard_normal(6),
        "mean": rng.standard_normal(6), "var": rng.uniform(0.5, 2, 6),
        "w2": rng.standard_normal((4, 6, 1, 1)) * second_weight_scale, "g": rng.standard_normal((4, 3)),
    }
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 3, 8, 8] x) => (float[N, 3] y) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
            b1 = BatchNormalization(c1, scale, shift, mean, var)
            r1 = Relu(b1)
            c2 = Conv(r1, w2)
            r2 = Relu(c2)
            p = GlobalAveragePool(r2)
            f = Flatten(p)
            y = Gemm(f, g)
        }""")
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    onnx.checker.check_model(model)
    return model


def bn_data(seed: int = 1, count: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)}


def prepassed(model: onnx.ModelProto, ctx: PassContext) -> object:
    graph = ir.import_graph(model)
    PassManager(normalising_passes()).run(graph, ctx)
    return graph


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"model": tmp_path / "model.onnx", "data": tmp_path / "calib.npz", "stats": tmp_path / "stats.npz"}
    onnx.save_model(bn_model(), paths["model"])
    np.savez(paths["data"], **bn_data())
    return paths


def test_round_trip_keeps_every_array(tmp_path: Path) -> None:
    model, data = bn_model(), load_data(bn_data(), bn_model())
    stats = collect(model, data, [StatRequest("r1"), StatRequest("f", frozenset({"mean", "neg_frac"}))])
    original = StatsFile.build(model, stats, data)
    save_stats(original, tmp_path / "s.npz")
    with zipfile.ZipFile(tmp_path / "s.npz") as archive:  # plain arrays only: no pickled objects inside
        assert all(name.endswith(".npy") for name in archive.namelist())
    loaded = load_stats(tmp_path / "s.npz", model, data)
    assert loaded.model_fingerprint == original.model_fingerprint and loaded.cones == original.cones
    for name in stats:
        assert loaded.stats[name].meta() == stats[name].meta()
        for key, value in stats[name].to_arrays().items():
            np.testing.assert_array_equal(loaded.stats[name].to_arrays()[key], value)


def test_stale_statistics_are_refused(tmp_path: Path) -> None:
    model, data = bn_model(), load_data(bn_data(), bn_model())
    save_stats(StatsFile.build(model, collect(model, data, [StatRequest("r1")]), data), tmp_path / "s.npz")
    downstream_changed = bn_model(second_weight_scale=2.0)  # r1 is upstream of w2: still valid
    load_stats(tmp_path / "s.npz", downstream_changed)
    upstream_changed = bn_model()
    next(t for t in upstream_changed.graph.initializer if t.name == "w1").raw_data = \
        (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")) * 2).tobytes()
    with pytest.raises(StaleStatsError, match="stale for this model: tensor 'r1'"):
        load_stats(tmp_path / "s.npz", upstream_changed)
    with pytest.raises(StaleStatsError, match="other calibration data"):
        load_stats(tmp_path / "s.npz", model, load_data(bn_data(seed=2), model))


def test_unreadable_files_and_unsafe_outputs_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", x=np.ones(3))
    with pytest.raises(DataError, match="not a graphopt statistics file"):
        load_stats(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable statistics file"):
        load_stats(tmp_path / "broken.npz")
    with pytest.raises(DataError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    empty = StatsFile({}, {}, "m", "d")
    with pytest.raises(OutputPathError, match="refusing to overwrite"):
        save_stats(empty, tmp_path / "other.npz", protected=[tmp_path / "other.npz"])
    with pytest.raises(OutputPathError, match="does not exist"):
        save_stats(empty, tmp_path / "no" / "s.npz")
    save_stats(empty, tmp_path / "plain")  # written exactly where asked: no suffix appended
    assert (tmp_path / "plain").is_file() and load_stats(tmp_path / "plain").stats == {}


def test_calibrate_statistics_serve_a_pass_after_the_prepasses_without_data(files: dict[str, Path]) -> None:
    stats_file = calibrate(files["model"], files["data"], output=files["stats"], batch_size=4)
    model = bn_model()
    ctx = PassContext(template=model, progress=False, options={"stats": files["stats"]})
    graph = prepassed(model, ctx)
    requests = linear_inputs(ir.export_model(graph, model))
    assert {r.tensor for r in requests} == set(stats_file.stats)
    served = ctx.statistics(requests, graph)
    assert ctx._calibrator.computed == 0  # everything came from the file
    fresh = collect(ir.export_model(graph, model), bn_data(), requests, batch_size=4)
    for name in served:
        np.testing.assert_array_equal(served[name].gram(), fresh[name].gram())

    changed = bn_model(second_weight_scale=3.0)  # w2 feeds f (the Gemm input) but not x or r1
    stale_ctx = PassContext(template=changed, progress=False, options={"stats": files["stats"]})
    stale_graph = prepassed(changed, stale_ctx)
    with pytest.raises(StaleStatsError, match="are stale .* give --calib"):
        stale_ctx.statistics(linear_inputs(ir.export_model(stale_graph, changed)), stale_graph)
    with_data = PassContext(template=changed, data=load_data(bn_data(), changed), progress=False,
                            options={"stats": files["stats"]})
    with_data.statistics(linear_inputs(ir.export_model(stale_graph, changed)), stale_graph)
    assert with_data._calibrator.computed == 1  # only f (below w2) is measured again; x and r1 are reused


def test_cli_calibrate_then_optimize_with_stats(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(files["model"]), "--data", str(files["data"]), "-o", str(files["stats"]),
                 "--quiet", "--calib-memory", "64MB", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert set(load_stats(files["stats"], data=load_data(bn_data(), bn_model())).stats) == {"x", "r1", "f"}
    assert main(["calibrate", str(files["model"]), "--data", str(files["data"]), "-o", str(files["stats"]),
                 "--tensors", "r1", "--quiet"]) == 0
    assert set(load_stats(files["stats"]).stats) == {"r1"}
    out = files["model"].parent / "out.onnx"
    assert main(["optimize", str(files["model"]), "-o", str(out), "--method", "none", "--stats", str(files["stats"]),
                 "--calib-memory", "1GB", "--device", "cpu", "--threads", "1", "--quiet"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("extra, message", [
    (["-o", "{model}"], "refusing to overwrite"),
    (["-o", "{data}"], "refusing to overwrite"),
    (["-o", "{stats}", "--calib-memory", "lots"], "--calib-memory expects a size"),
    (["-o", "{stats}", "--tensors", "nowhere"], "no tensor named 'nowhere'"),
    (["-o", "{stats}", "--mask-input", "nowhere"], "mask input 'nowhere' is not a model input"),
])
def test_cli_calibrate_bad_input_exits_2_with_one_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                       extra: list[str], message: str) -> None:
    before = files["model"].read_bytes(), files["data"].read_bytes()
    argv = ["calibrate", str(files["model"]), "--data", str(files["data"]), "--quiet",
            *(arg.format(**{k: str(v) for k, v in files.items()}) for arg in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert (files["model"].read_bytes(), files["data"].read_bytes()) == before
    assert not files["stats"].exists()

"""The exprune pass: replacement of linear+ReLU chains, the calibrated false-negative rate, torch exports,
the negative case, idempotence and preserved metadata.

These tests read the op's decisions over whole batches, so they write it with `exprune_dense_rows` 0 (the op
at every batch); the default, dense layers from 2 rows on, is tested in test_dispatch.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calibration.data import load_data
from graphopt.ir import graph as ir
from graphopt.passes import PassContext, get_pass
from tests.conftest import op_types, run_ort, run_pass

OP = {"exprune_dense_rows": 0, "exprune_layers": "all"}  # the op at every batch size, untimed


def _gemm_relu(d: int = 32, n: int = 40, relu: bool = True, trans_b: int = 1, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n, d) if trans_b else (d, n)) / np.sqrt(d)).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h" if relu else "y"], name="fc", transB=trans_b)]
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = "exprune-test"
    model.metadata_props.add(key="origin", value="tests")
    return model


def _data(model: onnx.ModelProto, rows: int = 600, d: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # correlated, non-centred inputs: a few dims carry most of the energy, as in trained networks
    mix = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 6.0)[:, None]
    return {"x": (rng.standard_normal((rows, d)) @ mix + 0.3).astype(np.float32)}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("fnr", [0.0, 0.01, 0.05])
def test_false_negative_rate_on_calibration_data_is_respected(trans_b: int, fnr: float) -> None:
    model = _gemm_relu(trans_b=trans_b)
    data = _data(model)
    rewritten, result = run_pass(model, "exprune", data=load_data(data, model),
                                 options={"exprune_fnr": fnr, "exprune_probe": 0.25, **OP})
    assert op_types(rewritten) == ["ExPruneLinearRelu"]
    want, got = run_ort(model, data)["y"], run_ort(rewritten, data)["y"]
    positive = want > 0
    missed = (want > 1e-6) & (got == 0)  # float64 calibration vs float32 runtime may disagree on tinier values
    assert missed.sum() <= fnr * positive.sum(axis=0).sum() + 1e-9  # per neuron ≤ fnr, so in total too
    assert np.all(missed.sum(axis=0) <= np.floor(fnr * positive.sum(axis=0)))
    kept = ~missed
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-5, atol=1e-5)  # every other output is exact
    assert result.stats["fc.fnr"] <= fnr
    assert result.stats["fc.skip_rate"] > 0.05
    assert result.stats["fc.m"] == 8
    assert 0 < result.stats["macs_skipped_fraction"] < 0.75


def test_gemm_without_relu_is_left_alone_with_the_reason() -> None:
    model = _gemm_relu(relu=False)
    rewritten, result = run_pass(model, "exprune", data=load_data(_data(model), model))
    assert not result.modified
    assert op_types(rewritten) == ["Gemm"]
    assert result.skipped == ["fc: output is not read by a Relu alone"]


def test_second_run_finds_nothing_and_metadata_survives() -> None:
    model = _gemm_relu()
    data = load_data(_data(model), model)
    once, first = run_pass(model, "exprune", data=data, options={"exprune_fnr": 0.01, "exprune_layers": "all"})
    twice, second = run_pass(once, "exprune", data=data, options={"exprune_fnr": 0.01, "exprune_layers": "all"})
    assert first.modified and not second.modified
    assert op_types(twice) == op_types(once)
    for name in ("fc_tau", "fc_perm"):
        got = next(t for t in twice.graph.initializer if t.name == name)
        want = next(t for t in once.graph.initializer if t.name == name)
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))
    assert twice.producer_name == "exprune-test"
    assert [(p.key, p.value) for p in twice.metadata_props] == [("origin", "tests")]
    assert [(f.domain, f.name) for f in twice.functions] == [("graphopt", "ExPruneLinearRelu")]


def test_needs_calibration_data() -> None:
    model = _gemm_relu()
    graph = ir.import_graph(model)
    with pytest.raises(graphopt.errors.DataError, match="--calib"):
        get_pass("exprune").run(graph, PassContext(template=model, progress=False))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_mlp_within_the_calibrated_error(tmp_path, exporter: str) -> None:
    torch = pytest.importorskip("torch")
    export = pytest.importorskip("graphopt.torch.export")
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10)).eval()
    digits = (load_digits().data[:400] / 16.0).astype(np.float32)
    path = tmp_path / f"mlp_{exporter}.onnx"
    export.export_onnx(mlp, torch.from_numpy(digits[:2]), path, exporter=exporter, opset=17)
    model = onnx.load(str(path))
    feeds = {model.graph.input[0].name: digits}
    exact = graphopt.optimize(model, method="exprune", calib=feeds, exprune_fnr=0.0, **OP)
    loose = graphopt.optimize(model, method="exprune", calib=feeds, exprune_fnr=0.01, **OP)
    assert op_types(exact.model).count("ExPruneLinearRelu") == 2, op_types(exact.model)
    stats = [result.report["passes"][-1]["stats"] for result in (exact, loose)]
    assert [s["layers"] for s in stats] == [2, 2]
    assert 0.05 < stats[0]["macs_skipped_fraction"] < stats[1]["macs_skipped_fraction"]
    assert all(s[key] <= fnr for s, fnr in zip(stats, (0.0, 0.01)) for key in s if key.endswith(".fnr"))
    # no positive activation skipped on the calibration data: the outputs there are unchanged
    assert exact.report["fidelity"]["max_abs"] < 1e-5
    # each layer drops at most 1% of each neuron's positive activations: the argmax rarely moves
    assert loose.report["fidelity"]["top1_agreement"] >= 0.97
    assert loose.report["fidelity"]["rel_l2"] < 0.1


def test_matmul_add_relu_on_token_rows() -> None:
    rng = np.random.default_rng(3)
    d, n = 32, 24
    weight = (rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32)  # MatMul weight is [d, n]
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["b", "h"], ["z"], name="add"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, n])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {"x": _data(model, rows=400, d=d)["x"].reshape(80, 5, d)}
    rewritten, result = run_pass(model, "exprune", data=load_data(data, model), options={"exprune_fnr": 0.0, **OP})
    assert op_types(rewritten) == ["ExPruneLinearRelu"] and result.stats["mm.skip_rate"] > 0.05
    np.testing.assert_allclose(run_ort(rewritten, data)["y"], run_ort(model, data)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("probe", [0.125, 0.25])
def test_sequential_rule_respects_the_rate_and_skips_more_than_one_test(probe: float) -> None:
    model = _gemm_relu(d=64, n=48)
    data = _data(model, rows=800, d=64)
    stats = {}
    for rule in ("threshold", "sequential"):
        rewritten, result = run_pass(model, "exprune", data=load_data(data, model),
                                     options={"exprune_fnr": 0.05, "exprune_probe": probe, "exprune_rule": rule,
                                              **OP})
        want, got = run_ort(model, data)["y"], run_ort(rewritten, data)["y"]
        missed = (want > 1e-6) & (got == 0)
        assert np.all(missed.sum(axis=0) <= np.floor(0.05 * (want > 0).sum(axis=0)))  # per neuron
        np.testing.assert_allclose(got[~missed], want[~missed], rtol=1e-5, atol=1e-5)
        node = next(n for n in rewritten.graph.node if n.op_type == "ExPruneLinearRelu")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["rule"].decode() == rule and attrs["checkpoints"][0] == attrs["m"]
        stats[rule] = result.stats
    assert stats["sequential"]["fc.checkpoints"] > 1 == stats["threshold"]["fc.checkpoints"]
    assert stats["sequential"]["fc.macs_skipped"] > stats["threshold"]["fc.macs_skipped"] + 0.01


def _digits_mlp(tmp_path, exporter: str = "legacy", samples: int = 800) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    torch = pytest.importorskip("torch")
    export = pytest.importorskip("graphopt.torch.export")
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(60):  # a short full-batch fit: the layers' sign patterns are those of a trained model
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(mlp(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    path = tmp_path / f"mlp_{exporter}.onnx"
    export.export_onnx(mlp.eval(), torch.from_numpy(x[:2]), path, exporter=exporter, opset=17)
    model = onnx.load(str(path))
    return model, {model.graph.input[0].name: x[:samples]}


def test_tolerance_search_keeps_top1_on_the_held_out_samples_with_a_margin(tmp_path) -> None:
    model, feeds = _digits_mlp(tmp_path, samples=1600)
    result = graphopt.optimize(model, method="exprune", calib=feeds, exprune_layers="all")
    stats = result.report["passes"][-1]["stats"]
    assert stats["tolerance"] == "top1=0.99" and stats["held_out_samples"] == 400 and stats["confidence"] == 0.95
    # 400 rows: one disagreement already puts the 95% Clopper-Pearson bound below 0.99 (1 - 0.0118)
    assert stats["held_out_disagreements_allowed"] == 0
    assert stats["fnr_level"] > 0 and stats["held_out_top1_lower_bound"] >= 0.99
    assert stats["held_out_top1_lower_bound"] == pytest.approx(0.05 ** (1 / 400), rel=1e-9)  # no disagreement
    # the scan stopped at the next grid rate, whose bound fell below the tolerance
    assert stats["fnr_rejected"] > stats["fnr_level"] and stats["rejected_top1_lower_bound"] < 0.99
    assert stats["held_out_macs_skipped_fraction"] > 0.1
    # the same held-out split, measured independently: the search's number is the real one
    _, held = load_data(feeds, model).split(0.25, seed=0)
    name = model.graph.output[0].name
    want, got = run_ort(model, held.arrays)[name], run_ort(result.model, held.arrays)[name]
    agreement = float(np.mean(np.argmax(want, -1) == np.argmax(got, -1)))
    assert agreement == stats["held_out_top1"] == 1.0
    assert result.report["exprune_macs_skipped"]["data"] == "held-out"
    assert 0 < result.report["exprune_macs_skipped"]["fraction_of_model"] < stats["held_out_macs_skipped_fraction"]
    # without the margin the point estimate alone decides: a rate at least as high, with some disagreements
    loose = graphopt.optimize(model, method="exprune", calib=feeds, exprune_confidence=0.0,
                              exprune_layers="all")
    loose_stats = loose.report["passes"][-1]["stats"]
    assert loose_stats["held_out_disagreements_allowed"] == 4
    assert loose_stats["fnr_level"] >= stats["fnr_level"] and loose_stats["held_out_top1"] >= 0.99
    assert loose_stats["held_out_top1_lower_bound"] == loose_stats["held_out_top1"]


def test_too_few_held_out_rows_to_certify_the_tolerance_replace_nothing_and_say_so(tmp_path) -> None:
    model, feeds = _digits_mlp(tmp_path, samples=800)
    result = graphopt.optimize(model, method="exprune", calib=feeds, exprune_layers="all")
    record = result.report["passes"][-1]
    assert not record["modified"] and record["stats"]["held_out_rows_needed"] == 299  # 0.99^299 <= 0.05
    assert "held_out_disagreements_allowed" not in record["stats"]
    assert "200 held-out predictions are too few to certify it (at least 299)" in record["skipped"][0]  # first
    assert op_types(result.model).count("ExPruneLinearRelu") == 0
    # a larger held-out share of the same data reaches the 299 rows (400 here)
    wider = graphopt.optimize(model, method="exprune", calib=feeds, exprune_held_out=0.5,
                               exprune_layers="all")
    assert wider.report["passes"][-1]["modified"] and wider.report["passes"][-1]["stats"]["held_out_samples"] == 400


def test_relative_error_tolerance_and_one_that_cannot_be_met() -> None:
    model = _gemm_relu(d=48, n=40)
    data = load_data(_data(model, rows=800, d=48), model)
    loose, found = run_pass(model, "exprune", data=data, options={"tolerance": "rel_l2=0.05", **OP})
    assert found.modified and found.stats["tolerance"] == "rel_l2=0.05"
    assert 0 < found.stats["held_out_rel_l2"] <= 0.05 and found.stats["fnr_level"] > 0
    _, held = data.split(0.25, seed=0)
    want, got = run_ort(model, held.arrays)["y"], run_ort(loose, held.arrays)["y"]
    rel = np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
    assert rel <= 0.05 and rel == pytest.approx(found.stats["held_out_rel_l2"], rel=1e-3)
    # nothing but bit-exact outputs: the re-ordered dot products already round differently, so no rate passes
    untouched, strict = run_pass(model, "exprune", data=data, options={"tolerance": "rel_l2=0"})
    assert not strict.modified and op_types(untouched) == ["Gemm", "Relu"]
    assert any("misses rel_l2=0" in reason for reason in strict.skipped)


@pytest.mark.parametrize("text", ["top1=1.5", "rel_l2=-1", "accuracy=0.9", "top1", "rel_l2=x"])
def test_bad_tolerance_is_refused(text: str) -> None:
    model = _gemm_relu()
    with pytest.raises(graphopt.errors.GraphoptError, match="--tolerance"):
        run_pass(model, "exprune", data=load_data(_data(model), model), options={"tolerance": text})


def test_pipeline_snp_then_exprune(tmp_path) -> None:
    model, feeds = _digits_mlp(tmp_path)
    result = graphopt.optimize(model, method="snp,exprune", calib=feeds, target_macs=0.6, exprune_fnr=0.02,
                               **OP)
    assert result.report["method"] == "snp,exprune"
    ran = [p["pass"] for p in result.report["passes"]]
    assert ran.index("snp") < ran.index("exprune") and all(p["modified"] for p in result.report["passes"]
                                                             if p["pass"] in ("snp", "exprune"))
    assert result.report["macs_ratio"] == pytest.approx(0.6, abs=0.03)
    assert op_types(result.model).count("ExPruneLinearRelu") == 2
    widths = sorted(numpy_helper.to_array(t).shape[0] for t in result.model.graph.initializer if t.name.endswith("_w"))
    assert widths[-1] < 128  # the ExPrune ops read the SNP-shrunk weights
    assert result.report["fidelity"]["top1_agreement"] >= 0.95


def test_convolutions_and_linear_layers_of_a_cnn_in_one_search() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "samples"
    model = onnx.load(str(root / "digits_cnn.onnx"))
    calib = dict(np.load(root / "digits_calib.npz"))
    # 64 held-out images cannot certify top1=0.99 with a margin: the held-out value itself decides here
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_rule="sequential", exprune_confidence=0,
                               exprune_layers="all", exprune_dense_rows=0)
    stats = result.report["passes"][-1]["stats"]
    assert sorted(op_types(result.model)).count("ExPruneConvRelu") == 2  # the 1-channel first conv is declined
    assert op_types(result.model).count("ExPruneLinearRelu") == 1
    assert any("one input channel" in reason for reason in result.report["passes"][-1]["skipped"])
    assert result.report["macs_after"] == result.report["macs_before"]  # counted at their dense cost
    convs = [key for key in stats if key.endswith("Conv.held_out_macs_skipped")]
    assert len(convs) == 2 and all(stats[key] > 0.05 for key in convs)
    _, held = load_data(calib, model).split(0.25, seed=0)
    name = model.graph.output[0].name
    want, got = run_ort(model, held.arrays)[name], run_ort(result.model, held.arrays)[name]
    assert np.mean(np.argmax(want, -1) == np.argmax(got, -1)) >= 0.99
    skipped = result.report["exprune_macs_skipped"]["fraction_of_model"]
    assert 0.05 < skipped == pytest.approx(stats["held_out_macs_skipped_per_sample"] / result.report["macs_after"])


def _digits() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "samples"
    return onnx.load(str(root / "digits_cnn.onnx")), dict(np.load(root / "digits_calib.npz"))


def test_without_the_native_kernels_convolutions_stay_dense_and_the_report_says_why(monkeypatch) -> None:
    from graphopt.ops import native

    _scripted_timings(monkeypatch, in_model=[1.1])  # the linear layer wins alone and in the model
    monkeypatch.setattr(native, "has_kernel", lambda counter: False)
    model, calib = _digits()
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.05, exprune_dense_rows=0)
    ops = op_types(result.model)
    assert "ExPruneConvRelu" not in ops and ops.count("Conv") == 3 and ops.count("ExPruneLinearRelu") == 1
    skipped = result.report["passes"][-1]["skipped"]
    dense = [reason for reason in skipped if "native kernels are not built" in reason]
    assert len(dense) == 2 and all("--exprune-layers all" in reason for reason in dense)  # not the 1-channel one
    assert result.report["passes"][-1]["stats"].get("conv_layers", 0) == 0


def _scripted_timings(monkeypatch, in_model: list[float], linear: float = 1.3) -> list[tuple[int, int]]:
    """Scripted timings: alone, the 16->32 convolution's op loses (0.8), the 32->32 one's wins (1.5) and the
    linear layer's gets `linear`; the whole models timed get the ratios `in_model` in turn. Returns, per whole
    model timed, the number of convolution and of linear ops it has more than its reference."""
    from graphopt.ops import native
    from graphopt.passes.exprune import timing

    seen: list[tuple[int, int]] = []

    def scripted(reference: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict[str, np.ndarray],
                 threads: int) -> dict[str, float]:
        if "x" in feed:  # one layer alone
            ratio = {2: linear, 4: 1.5 if feed["x"].shape[1] == 32 else 0.8}[feed["x"].ndim]
        else:
            seen.append(tuple(op_types(candidate).count(op) - op_types(reference).count(op)
                              for op in ("ExPruneConvRelu", "ExPruneLinearRelu")))
            ratio = in_model[len(seen) - 1]
        return {"reference_ms": ratio, "candidate_ms": 1.0, "speedup": ratio, "speedup_p10": ratio,
                "speedup_p90": ratio}

    monkeypatch.setattr(native, "has_kernel", lambda counter: True)
    monkeypatch.setattr(timing, "time_models", scripted)
    return seen


def test_by_default_each_convolution_is_replaced_exactly_where_its_op_measured_faster(monkeypatch) -> None:
    seen = _scripted_timings(monkeypatch, in_model=[1.1, 1.2])
    model, calib = _digits()
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.05, exprune_dense_rows=0)
    ops = op_types(result.model)
    assert ops.count("ExPruneConvRelu") == 1 and ops.count("Conv") == 2 and ops.count("ExPruneLinearRelu") == 1
    stats, skipped = result.report["passes"][-1]["stats"], result.report["passes"][-1]["skipped"]
    assert stats["/7/Conv.speedup"] == 1.5 and stats["/3/Conv.speedup"] == 0.8 and stats["layers_left_dense"] == 1
    assert stats["/7/Conv.op_ms_predicted"] == pytest.approx(1.5 * (1 - stats["/7/Conv.macs_skipped"]))
    assert [r for r in skipped if "left dense" in r and "Conv" in r] == [
        "/3/Conv: left dense, the op took 1.0000 ms against 0.8000 ms dense at batch 1 (speedup 0.80, p10-p90 "
        "0.80-0.80; kept from 1.02)"]
    # the winning convolution in the model with the linear op in both, then every kept op against none
    assert seen == [(1, 0), (1, 1)] and stats["conv_model_speedup"] == 1.1 and stats["model_speedup"] == 1.2
    assert stats["/12/Gemm.speedup"] == 1.3  # linear layers are timed too
    assert stats["conv_layers"] == 1


def test_a_convolution_faster_alone_that_slows_the_model_stays_dense(monkeypatch) -> None:
    seen = _scripted_timings(monkeypatch, in_model=[0.83, 1.1])
    model, calib = _digits()
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.05, exprune_dense_rows=0)
    ops = op_types(result.model)
    assert "ExPruneConvRelu" not in ops and ops.count("ExPruneLinearRelu") == 1
    stats, skipped = result.report["passes"][-1]["stats"], result.report["passes"][-1]["skipped"]
    assert seen == [(1, 0), (0, 1)] and stats["layers_left_dense"] == 2 and stats.get("conv_layers", 0) == 0
    assert ("/7/Conv: left dense, faster alone but the model with 1 convolution op(s) ran 0.83x as fast as without "
            "them (p10-p90 0.83-0.83, kept from 1.02; the blocked layout is converted around each op)") in skipped


def test_by_default_a_linear_layer_is_kept_only_where_it_is_faster_alone_and_in_the_model(monkeypatch) -> None:
    seen = _scripted_timings(monkeypatch, in_model=[1.1, 0.9, 1.05], linear=1.2)
    model, calib = _digits()
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.05, exprune_dense_rows=0)
    ops = op_types(result.model)
    # faster alone (1.2 against the conv's 1.5), the linear op is the first to go when the model is slower
    assert ops.count("ExPruneConvRelu") == 1 and "ExPruneLinearRelu" not in ops and ops.count("Gemm") == 2
    stats, skipped = result.report["passes"][-1]["stats"], result.report["passes"][-1]["skipped"]
    assert seen == [(1, 0), (1, 1), (1, 0)] and stats["model_speedup"] == 1.05 and stats["layers_left_dense"] == 2
    assert ("/12/Gemm: left dense, faster alone but the model with 2 timed op(s) ran 0.90x as fast as without them "
            "(p10-p90 0.90-0.90, kept from 1.02)") in skipped
    slower = _scripted_timings(monkeypatch, in_model=[1.1], linear=0.7)
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.05, exprune_dense_rows=0)
    assert "ExPruneLinearRelu" not in op_types(result.model) and slower == [(1, 0)]
    assert any(r.startswith("/12/Gemm: left dense, the op took") for r in result.report["passes"][-1]["skipped"])
    assert result.report["passes"][-1]["stats"]["model_speedup"] == 1.1  # the conv timing was the whole model's


def test_the_timed_convolution_models_compute_the_layer_and_its_op() -> None:
    from graphopt.calibration.data import load_data
    from graphopt.ops.exprune_conv import exprune_conv_reference, im2col
    from graphopt.passes.exprune.calib import layer_arrays
    from graphopt.passes.exprune.conv import ConvScoring
    from graphopt.passes.exprune.layers import discover, sample
    from graphopt.passes.exprune.timing import conv_models, typical_map

    model, calib = _digits()
    model = graphopt.optimize(model, method="none").model  # BatchNorm folded into the convolutions
    graph = ir.import_graph(model)
    layers, _ = discover(graph, "conv")
    ctx = PassContext(template=model, data=load_data(calib, model), options={})
    maps = sample(ctx, model, layers[1:], load_data(calib, model))[layers[1].source.name]
    layer = layers[1]
    found = ConvScoring(maps, layer, 0.25, "threshold").calibrate(0.05)
    x = typical_map(layer, found, maps[:7])
    arrays = layer_arrays(layer, found)
    counts = [exprune_conv_reference(maps[[i]], arrays["W"], arrays["B"], arrays["Tau"], arrays["Perm"], found.m, None,
                                     layer.strides, layer.pads, layer.dilations)[1].sum() for i in range(7)]
    assert x.shape == (1, *maps.shape[1:])
    assert exprune_conv_reference(x, arrays["W"], arrays["B"], arrays["Tau"], arrays["Perm"], found.m, None,
                                  layer.strides, layer.pads, layer.dilations)[1].sum() == np.median(counts)
    dense, op = conv_models(layer, found, "threshold", 17, tuple(x.shape[1:]))
    cols = im2col(x, layer.weight.shape[2:], layer.strides, layer.pads, layer.dilations)
    want = np.maximum(np.einsum("nyxcab,mcab->nmyx", cols, layer.weight.astype(np.float64))
                      + layer.bias[None, :, None, None], 0)
    np.testing.assert_allclose(run_ort(dense, {"x": x})["y"], want, rtol=1e-5, atol=1e-5)
    reference, _ = exprune_conv_reference(x, arrays["W"], arrays["B"], arrays["Tau"], arrays["Perm"], found.m, None,
                                          layer.strides, layer.pads, layer.dilations)
    np.testing.assert_allclose(run_ort(op, {"x": x})["y"], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_single_input_has_nothing_to_probe(trans_b: int) -> None:
    model = _gemm_relu(d=1, n=6, trans_b=trans_b)
    data = {"x": np.random.default_rng(0).standard_normal((50, 1)).astype(np.float32)}
    _, result = run_pass(model, "exprune", data=load_data(data, model), options={"exprune_fnr": 0.0, **OP})
    assert not result.modified and result.skipped == ["fc: fewer than 2 inputs: nothing to probe"]
    single = _gemm_relu(d=6, n=1, trans_b=trans_b)
    rows = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    _, wide = run_pass(single, "exprune", data=load_data({"x": rows}, single), options={"exprune_fnr": 0.0, **OP})
    assert wide.modified  # one neuron with six inputs is fine


@pytest.mark.parametrize("kinds,want", [("linear", {"ExPruneLinearRelu": 1}), ("conv", {"ExPruneConvRelu": 2})])
def test_layer_kinds_can_be_chosen(kinds: str, want: dict[str, int]) -> None:
    model, calib = _digits()
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_layers=kinds, exprune_fnr=0.0,
                               exprune_maps=len(calib["input"]), exprune_dense_rows=0)  # every calibration map scored
    ops = op_types(result.model)
    assert {op: ops.count(op) for op in ("ExPruneLinearRelu", "ExPruneConvRelu") if op in ops} == want
    assert result.report["passes"][-1]["stats"]["conv_layers"] == want.get("ExPruneConvRelu", 0)
    assert result.report["fidelity"]["max_abs"] < 1e-4  # fnr 0 on every sample: the outputs are unchanged


def test_the_search_stops_at_the_first_rate_that_fails_even_if_a_later_one_passes() -> None:
    """Fixed-sequence testing: a rate is kept only when every lower grid rate passed too, so one bound at
    the chosen confidence covers the whole search (no monotonicity assumed)."""
    from graphopt.calibration.heldout import HeldOut, Tolerance
    from graphopt.passes.base import PassResult
    from graphopt.passes.exprune.search import GRID, tolerance_search

    model = _gemm_relu(d=16, n=12)
    data = load_data(_data(model, rows=400, d=16), model)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    bias = next(t for t in broken.graph.initializer if t.name == "b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(3.0) * np.arange(12, dtype=np.float32),
                                          "b"))
    tested = []

    def candidate(rate: float) -> tuple[list[float], onnx.ModelProto]:
        tested.append(rate)
        return [rate], broken if rate == GRID[4] else model

    result = PassResult(modified=False)
    chosen = tolerance_search(HeldOut(model, data, confidence=0.95), Tolerance.parse("top1=0.99"), candidate, result,
                              progress=False)
    assert chosen == [GRID[3]] and tested == list(GRID[:5])
    assert result.stats["fnr_level"] == GRID[3] and result.stats["fnr_rejected"] == GRID[4]
    assert result.stats["held_out_top1"] == 1.0 and result.stats["rejected_top1"] < 0.99
    assert result.stats["held_out_disagreements_allowed"] == 0 and result.stats["held_out_samples"] == 400


def test_layers_of_a_model_without_node_names_get_unique_op_names() -> None:
    """Two unnamed MatMul+Relu layers both fall back to the base name: the nodes must still be unique."""
    from tests.calibration.test_collect import mlp_model

    x = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    result = graphopt.optimize(mlp_model(), method="exprune", calib={"x": x}, exprune_fnr=0.05, **OP)
    names = [node.name for node in result.model.graph.node]
    assert sum(node.op_type.startswith("ExPrune") for node in result.model.graph.node) == 2
    assert len(names) == len(set(names))


def _at_opset(model: onnx.ModelProto, opset: int, ir_version: int) -> onnx.ModelProto:
    model.opset_import[0].version = opset
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_model_below_opset_15_is_raised_to_it_where_layers_are_replaced() -> None:
    model = _at_opset(_gemm_relu(), 11, 6)
    data = _data(model)
    result = graphopt.optimize(model, method="exprune", calib=data, exprune_fnr=0.05, **OP)
    assert op_types(result.model).count("ExPruneLinearRelu") == 1
    assert result.report["passes"][-1]["stats"]["opset_raised_from"] == 11
    assert [o.version for o in result.model.opset_import if o.domain == ""] == [15]
    assert result.model.ir_version >= 8  # model-local functions
    onnx.checker.check_model(result.model, full_check=True)
    assert {p.key: p.value for p in result.model.metadata_props} == {"origin": "tests"}
    got, want = run_ort(result.model, data)["y"], run_ort(model, data)["y"]
    assert np.all((got == 0) | np.isclose(got, want, atol=1e-4))  # a unit is exact or skipped
    assert 0 < np.mean((got == 0) & (want > 0)) < 0.05  # the skipped positives: about the rate asked


def test_a_model_below_opset_15_keeps_its_opset_where_nothing_is_replaced() -> None:
    model = _at_opset(_gemm_relu(relu=False), 11, 6)
    result = graphopt.optimize(model, method="exprune", calib=_data(model), exprune_fnr=0.05, **OP)
    assert [o.version for o in result.model.opset_import if o.domain == ""] == [11]
    assert result.model.ir_version == 6 and "opset_raised_from" not in result.report["passes"][-1]["stats"]


def test_a_version_converter_refusal_is_the_reason(monkeypatch) -> None:
    import onnx.version_converter

    def refuse(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
        raise RuntimeError("No Adapter For Example")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    model = _at_opset(_gemm_relu(), 11, 6)
    result = graphopt.optimize(model, method="exprune", calib=_data(model), exprune_fnr=0.05, **OP)
    assert "ExPruneLinearRelu" not in op_types(result.model)
    assert result.report["passes"][-1]["skipped"] == [
        "model opset 11 < 15, which the ExPrune ops' function bodies need, and ONNX's version converter refused: "
        "No Adapter For Example"]


def test_a_gain_within_the_timing_noise_keeps_the_convolution_dense(monkeypatch) -> None:
    seen = _scripted_timings(monkeypatch, in_model=[1.01], linear=0.9)  # faster, but by less than MIN_SPEEDUP
    model, calib = _digits()
    result = graphopt.optimize(model, method="exprune", calib=calib, exprune_fnr=0.05, exprune_dense_rows=0)
    assert seen == [(1, 0)] and "ExPruneConvRelu" not in op_types(result.model)
    assert result.report["passes"][-1]["stats"]["conv_model_speedup"] == 1.01

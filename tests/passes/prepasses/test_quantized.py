"""Quantized models: the pre-passes keep them valid and exact, and the methods leave quantized layers
alone with the reason.

A small CRNN (two Conv+ReLU+MaxPool blocks, a bidirectional GRU over the columns, a Linear per step) is
exported by torch and quantized by onnxruntime.quantization: dynamically (ConvInteger and
MatMulInteger behind DynamicQuantizeLinear), statically in QDQ form (QuantizeLinear/DequantizeLinear
around float Conv and MatMul, weights dequantized from int8), and dynamically with only the MatMul
quantized (the convolutions stay float and prunable). Each passes `onnx.checker` with the full check.

`--method none` must write a model that passes the full check and computes exactly what the quantized
model does (onnxruntime, graph optimisations disabled). Dynamically quantized layers are pruned through
(graphopt.passes.quantize.dynamic): read as the float layers they stand for, then written back in onnxruntime's
integer form, exactly as they were where nothing changed. QDQ weights are pruned through
(graphopt.passes.quantize.through): read as the floats they stand for, then stored as integers again, a channel
that was only sliced keeping its very integers and scale, one that SNP rewrote quantized anew within half a step.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
import graphopt.inspect
from graphopt import cli
from tests.conftest import (assert_equivalent, init, parse, quantize_dynamic, quantize_qdq, random_inputs, run_ort,
                            weights)

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")
from torch import nn  # noqa: E402

INPUT = (1, 16, 24)  # channels, height, width of one sample
REASON = "quantized layer: its integer weights, scales and zero points are left alone"


class CRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d((2, 1))
        self.rnn = nn.GRU(16 * 4, 24, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        batch, channels, height, width = x.shape
        steps, _ = self.rnn(x.permute(0, 3, 1, 2).reshape(batch, width, channels * height))
        return self.fc(steps)


class _Reader(quantization.CalibrationDataReader):
    def __init__(self) -> None:
        self.batches = iter([{"input": _samples(4, seed)} for seed in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *INPUT)).astype(np.float32)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The float CRNN and its quantized forms, by name."""
    folder = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    float_model = folder / "crnn.onnx"
    with warnings.catch_warnings():  # the tracer's notes on the GRU's batch size
        warnings.simplefilter("ignore")
        torch.onnx.export(CRNN().eval(), (torch.from_numpy(_samples(2, 0)),), str(float_model), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    paths = {"dynamic": folder / "crnn_dynamic.onnx", "qdq": folder / "crnn_qdq.onnx",
             "matmul_only": folder / "crnn_matmul_only.onnx"}
    quantization.quantize_dynamic(str(float_model), str(paths["dynamic"]))
    quantization.quantize_static(str(float_model), str(paths["qdq"]), _Reader(),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True)
    quantization.quantize_dynamic(str(float_model), str(paths["matmul_only"]), op_types_to_quantize=["MatMul"])
    for path in paths.values():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return paths


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _outputs(path: Path) -> dict[str, np.ndarray]:
    return run_ort(onnx.load(str(path)), {"input": _samples(3, 9)})


def test_the_models_are_quantized_as_onnxruntime_writes_them(quantized: dict[str, Path]) -> None:
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= _ops(quantized["dynamic"])
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= _ops(quantized["qdq"])
    assert "MatMulInteger" in _ops(quantized["matmul_only"]) and "ConvInteger" not in _ops(quantized["matmul_only"])


@pytest.mark.parametrize("name", ["dynamic", "qdq", "matmul_only"])
def test_method_none_keeps_a_quantized_model_valid_and_exact(name: str, quantized: dict[str, Path],
                                                             tmp_path: Path) -> None:
    output = tmp_path / "none.onnx"
    assert cli.main(["optimize", str(quantized[name]), "-o", str(output), "--method", "none", "--quiet"]) == 0
    onnx.checker.check_model(str(output), full_check=True)
    expected, actual = _outputs(quantized[name]), _outputs(output)
    assert list(actual) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value)
    integer_ops = {"ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
    assert _ops(output) & integer_ops == _ops(quantized[name]) & integer_ops


def _integer_weights(path: Path) -> dict[str, np.ndarray]:
    """The stored integer weight of each ConvInteger and MatMulInteger, by the layer's op and position."""
    model = onnx.load(str(path))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
    return {f"{n.op_type}{index}": values[n.input[1]] for index, n in enumerate(layers)}


@pytest.mark.parametrize("method", ["magnitude", "snp", "cob", "omp"])
def test_methods_prune_through_dynamically_quantized_layers(method: str, quantized: dict[str, Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """onnxruntime's dynamic quantization (DynamicQuantizeLinear, ConvInteger/MatMulInteger, Cast, the scales'
    Mul): the methods see float layers and write the integer form back, one quantizer per input."""
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=_samples(16, 1))
    output, report = tmp_path / f"{method}.onnx", tmp_path / "report.json"
    argv = ["optimize", str(quantized["dynamic"]), "-o", str(output), "--method", method, "--report", str(report),
            "--quiet"] + (["--calib", str(calibration)] if method in ("snp", "cob") else []) \
        + (["--sparsity", "0.5"] if method == "omp" else ["--target-macs", "0.6"])
    assert cli.main(argv) == 0
    onnx.checker.check_model(str(output), full_check=True)
    written = json.loads(report.read_text())
    assert not any(REASON in line for line in written["passes"][-1]["skipped"])
    before, after = _integer_weights(quantized["dynamic"]), _integer_weights(output)
    assert after.keys() == before.keys() and all(w.dtype == before[k].dtype for k, w in after.items())
    assert _ops(output) & {"DynamicQuantizeLinear", "Cast"} == {"DynamicQuantizeLinear", "Cast"}
    if method == "omp":
        assert written["weight_sparsity"]["overall"] >= 0.45
    elif method != "cob":  # cob rotates where a chain exists and may decline
        assert written["macs_ratio"] <= 0.6 * 1.02
        assert sum(w.size for w in after.values()) < sum(w.size for w in before.values())
    if method == "magnitude":  # sliced channels keep their very integers
        for key, weight in after.items():
            rows = {row.tobytes() for row in np.moveaxis(before[key], 0 if weight.ndim == 4 else -1, 0)}
            assert all(row.tobytes() in rows for row in np.moveaxis(weight, 0 if weight.ndim == 4 else -1, 0)) or \
                weight.shape != before[key].shape, key
    outputs = _outputs(output)
    assert outputs["logits"].shape == _outputs(quantized["dynamic"])["logits"].shape
    assert np.isfinite(outputs["logits"]).all()
    capsys.readouterr()
    assert cli.main(["inspect", str(quantized["dynamic"]), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert any(g["prunable"] for g in groups) and not any(REASON in (g["reason"] or "") for g in groups)


def test_dynamic_layers_come_back_as_they_were_when_nothing_changes(quantized: dict[str, Path]) -> None:
    from graphopt.ir import graph as ir
    from graphopt.passes.quantize.dynamic import requantize_layers, unquantize_layers

    model = onnx.load(str(quantized["dynamic"]))
    graph = ir.import_graph(model)
    layers = unquantize_layers(graph)
    floats = ir.export_model(graph, model)
    assert len(layers) == 3 and not _ops_of(floats) & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
    feeds = {"input": _samples(3, 9)}
    reference, approximated = run_ort(model, feeds)["logits"], run_ort(floats, feeds)["logits"]
    assert np.abs(approximated - reference).max() < 0.1 * np.abs(reference).max()  # quantization's error only
    assert requantize_layers(graph, layers)["quantized_channels_requantized"] == 0
    restored = ir.export_model(graph, model)
    assert sorted(n.name for n in restored.graph.node) == sorted(n.name for n in model.graph.node)
    np.testing.assert_array_equal(run_ort(restored, feeds)["logits"], reference)


def _ops_of(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def test_float_and_dynamically_quantized_layers_are_pruned_together(quantized: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    path = quantized["matmul_only"]
    output = tmp_path / "snp.onnx"
    result = graphopt.optimize(path, method="snp", target_macs=0.8, calib={"input": _samples(32, 1)}, output=output)
    onnx.checker.check_model(str(output), full_check=True)
    snp = result.report["passes"][-1]
    assert snp["stats"]["channels_removed"] > 0 and result.report["macs_ratio"] < 1.0
    assert not any(REASON in line for line in snp["skipped"])
    assert "MatMulInteger" in _ops(output) and "ConvInteger" not in _ops(output)
    outputs = _outputs(output)
    assert outputs["logits"].shape == _outputs(path)["logits"].shape and np.all(np.isfinite(outputs["logits"]))


# -- QuantizeLinear/DequantizeLinear of activations ------------------------------------------------

def _qdq_activations(per_channel: bool) -> onnx.ModelProto:
    """Conv (two zero units) -> Relu -> QuantizeLinear/DequantizeLinear -> Conv."""
    first = weights(6, 3, 3, 3, seed=1)
    first[[1, 4]] = 0.0
    bias = np.where(np.isin(np.arange(6), [1, 4]), 0.0, 0.1).astype(np.float32)
    if per_channel:
        quantizer = f"{init('s', np.linspace(0.02, 0.05, 6).astype(np.float32))}, uint8[6] z = {{0, 0, 0, 0, 0, 0}}"
    else:
        quantizer = "float s = {0.03}, uint8 z = {0}"  # scalars
    inits = ", ".join([init("w1", first), init("b1", bias), init("w2", weights(5, 6, 1, 1, seed=2)), quantizer])
    axis = " <axis = 1>" if per_channel else ""
    return parse(f'''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] y) <{inits}> {{
            h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            r = Relu (h)
            q = QuantizeLinear{axis} (r, s, z)
            d = DequantizeLinear{axis} (q, s, z)
            y = Conv (d, w2)
        }}''')


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_quantized_activations_pass_channels_and_slice_their_scales(per_channel: bool, tmp_path: Path) -> None:
    model = _qdq_activations(per_channel)
    source = tmp_path / "qdq.onnx"
    onnx.save(model, str(source))
    output = tmp_path / "pruned.onnx"
    report = graphopt.optimize(source, method="magnitude", target_macs=4 / 6, round_to=1, output=output).report
    assert report["passes"][-1]["stats"]["channels_removed"] == 2
    onnx.checker.check_model(str(output), full_check=True)
    pruned = onnx.load(str(output))
    scales = [onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name.startswith("s")]
    assert all(s.size == (4 if per_channel else 1) for s in scales) and scales
    assert_equivalent(model, pruned, random_inputs(model, batch=3))


def test_quantization_per_another_axis_blocks_with_the_reason(tmp_path: Path) -> None:
    scale = init("s", np.full(6, 0.03, np.float32))
    model = parse(f'''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] y) <{init("w1", weights(6, 3, 3, 3))}, {scale},
                                                          {init("w2", weights(5, 6, 1, 1, seed=2))}> {{
            h = Conv <pads = [1, 1, 1, 1]> (x, w1)
            t = Transpose <perm = [0, 2, 3, 1]> (h)
            q = QuantizeLinear <axis = 1> (t, s)
            d = DequantizeLinear <axis = 1> (q, s)
            b = Transpose <perm = [0, 3, 1, 2]> (d)
            y = Conv (b, w2)
        }}''')
    groups = graphopt.inspect.channel_groups(model, {"x": (1, 3, 6, 6)})
    (group,) = [g for g in groups if g["size"] == 6]
    assert not group["prunable"] and "quantizes per axis, not per tensor or per channel" in group["reason"]


def test_rules_are_registered_for_the_quantized_ops() -> None:
    from graphopt.analysis.oprules import rule_for
    from graphopt.analysis.registry import DEFAULT_RULE
    import onnx_graphsurgeon as gs

    for op, domain in (("ConvInteger", ""), ("MatMulInteger", ""), ("QLinearConv", ""), ("QLinearMatMul", ""),
                       ("DynamicQuantizeLinear", ""), ("QuantizeLinear", ""), ("DequantizeLinear", ""),
                       ("DynamicQuantizeLSTM", "com.microsoft"), ("QLinearAdd", "com.microsoft")):
        assert rule_for(gs.Node(op, domain=domain), {"": 17}) is not DEFAULT_RULE, op


def _shared_target() -> onnx.ModelProto:
    """A float MLP, then two quantized projections (int8 weights behind DequantizeLinear) reshaped into
    [N, T, 2, 4] by one target built at run time, as torch's dynamo exporter shares it between attention
    reshapes."""
    rng = np.random.default_rng(3)
    inits = [init("wq", rng.integers(-127, 128, (8, 8)), "int8"), init("vq", rng.integers(-127, 128, (8, 8)), "int8"),
             "float scale = {0.01}", "int8 zp = {0}", init("out", weights(8, 4, seed=4)),
             init("start", [0], "int64"), init("stop", [2], "int64"), init("split", [2, 4], "int64"),
             init("merge", [0, 0, 8], "int64"), init("w0", weights(8, 16, seed=5)), init("w1", weights(16, 8, seed=6))]
    return parse(f"""<ir_version: 8, opset_import: ["" : 17]>
    main (float[N, T, 8] input) => (float[N, T, 4] y) <{", ".join(inits)}> {{
        h0 = MatMul (input, w0)
        a0 = Relu (h0)
        x = MatMul (a0, w1)
        w = DequantizeLinear (wq, scale, zp)
        v = DequantizeLinear (vq, scale, zp)
        h = MatMul (x, w)
        g = MatMul (x, v)
        s = Shape (x)
        nt = Slice (s, start, stop)
        target = Concat <axis = 0> (nt, split)
        r1 = Reshape (h, target)
        r2 = Reshape (g, target)
        both = Add (r1, r2)
        merged = Reshape (both, merge)
        y = MatMul (merged, out)
    }}""")


@pytest.mark.parametrize("method", ["magnitude", "snp"])
def test_a_shared_reshape_target_stays_as_it_was_when_nothing_is_cut(method: str, tmp_path: Path) -> None:
    """Groups that keep every channel leave the nodes computing their reshape targets alone: no private copies
    (a copy placed after its reader, with nothing cut, made the written model invalid: exit 1)."""
    model = _shared_target()
    source, output, calibration = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(source))
    np.savez(calibration, input=np.random.default_rng(1).standard_normal((32, 5, 8)).astype(np.float32))
    assert cli.main(["optimize", str(source), "-o", str(output), "--method", method, "--target-macs", "1.0",
                     "--calib", str(calibration), "--quiet"]) == 0
    onnx.checker.check_model(str(output), full_check=True)
    written = onnx.load(str(output))
    assert [n.op_type for n in written.graph.node].count("Concat") == 1
    feeds = {"input": np.random.default_rng(2).standard_normal((3, 5, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(written, feeds)["y"], run_ort(model, feeds)["y"])


# -- QDQ weights pruned through ----------------------------------------------------------------------

def _weight_quantization(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Each layer's stored integer weight, its scales and their axis, by the layer's output."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        source = producers.get(node.input[1]) if node.op_type in ("Conv", "MatMul", "Gemm") else None
        if source is not None and source.op_type == "DequantizeLinear":
            axis = next((a.i for a in source.attribute if a.name == "axis"), 1)
            found[node.output[0]] = (values[source.input[0]], values[source.input[1]].reshape(-1), axis)
    return found


def test_qdq_weights_come_back_as_they_were_when_nothing_changes(quantized: dict[str, Path]) -> None:
    from graphopt.ir import graph as ir
    from graphopt.passes.quantize.through import requantize_weights, unquantize_weights

    model = onnx.load(str(quantized["qdq"]))
    graph = ir.import_graph(model)
    records = unquantize_weights(graph)
    floats = ir.export_model(graph, model)
    assert len(records) == 6  # 3 weights, 2 conv biases, the constant the Linear's bias Add reads
    assert not _weight_quantization(floats)
    feeds = {"input": _samples(3, 9)}
    for key, value in run_ort(model, feeds).items():  # the floats are what DequantizeLinear computes
        np.testing.assert_array_equal(run_ort(floats, feeds)[key], value)
    stats = requantize_weights(graph, records)
    assert stats["quantized_channels_requantized"] == 0
    restored = ir.export_model(graph, model)
    assert sorted(n.name for n in restored.graph.node) == sorted(n.name for n in model.graph.node)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in restored.graph.initializer}
    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def _planted_qdq() -> onnx.ModelProto:
    """x -> QDQ -> Conv (int8 weight per output channel, int32 bias; units 1 and 4 dead) -> Relu -> QDQ -> Conv."""
    rng = np.random.default_rng(7)
    first = rng.integers(-127, 128, (6, 3, 3, 3))
    first[[1, 4]] = 0
    bias = np.where(np.isin(np.arange(6), [1, 4]), 0, rng.integers(-500, 500, 6))
    scales = np.linspace(0.002, 0.006, 6).astype(np.float32)
    inits = ", ".join([init("w1", first, "int8"), init("s1", scales), init("z1", np.zeros(6), "int8"),
                       init("b1", bias, "int32"), init("bs", scales * np.float32(0.02)),
                       init("bz", np.zeros(6), "int32"), init("w2", rng.integers(-127, 128, (5, 6, 1, 1)), "int8"),
                       init("s2", np.full(5, 0.01, np.float32)), init("z2", np.zeros(5), "int8"),
                       "float sa = {0.02}", "uint8 za = {128}", "float sr = {0.05}", "uint8 zr = {0}"])
    return parse(f'''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] y) <{inits}> {{
            xq = QuantizeLinear (x, sa, za)
            xd = DequantizeLinear (xq, sa, za)
            w1f = DequantizeLinear <axis = 0> (w1, s1, z1)
            b1f = DequantizeLinear <axis = 0> (b1, bs, bz)
            h = Conv <pads = [1, 1, 1, 1]> (xd, w1f, b1f)
            r = Relu (h)
            rq = QuantizeLinear (r, sr, zr)
            rd = DequantizeLinear (rq, sr, zr)
            w2f = DequantizeLinear <axis = 0> (w2, s2, z2)
            y = Conv (rd, w2f)
        }}''')


def test_magnitude_prunes_through_qdq_weights_keeping_their_integers(tmp_path: Path) -> None:
    """The dead units go; every kept channel keeps its integers, scale and bias exactly, so the quantized model
    computes what it did."""
    model = _planted_qdq()
    source, output = tmp_path / "qdq.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, str(source))
    report = graphopt.optimize(source, method="magnitude", target_macs=4 / 6, round_to=1, output=output).report
    stats = report["passes"][-1]["stats"]
    assert stats["channels_removed"] == 2 and stats["quantized_channels_requantized"] == 0
    onnx.checker.check_model(str(output), full_check=True)
    pruned = onnx.load(str(output))
    assert_equivalent(model, pruned, random_inputs(model, batch=3))
    kept = [0, 2, 3, 5]
    before, after = _weight_quantization(model), _weight_quantization(pruned)
    assert after.keys() == before.keys()
    (first,) = [name for name, (stored, _, _) in before.items() if stored.shape[0] == 6]
    (second,) = [name for name in before if name != first]
    np.testing.assert_array_equal(after[first][0], before[first][0][kept])
    np.testing.assert_array_equal(after[first][1], before[first][1][kept])
    np.testing.assert_array_equal(after[second][0], before[second][0][:, kept])
    np.testing.assert_array_equal(after[second][1], before[second][1])
    assert all(stored.dtype == np.int8 for stored, _, _ in after.values())


@pytest.mark.parametrize("method", ["magnitude", "random", "snp", "omp", "dead-units"])
def test_methods_prune_qdq_layers_and_store_them_as_integers(method: str, quantized: dict[str, Path],
                                                              tmp_path: Path) -> None:
    output = tmp_path / f"{method}.onnx"
    options = {"sparsity": 0.5} if method == "omp" else {} if method == "dead-units" else {"target_macs": 0.5}
    result = graphopt.optimize(quantized["qdq"], method=method, output=output,
                               calib={"input": _samples(32, 1)} if method == "snp" else None, **options)
    onnx.checker.check_model(str(output), full_check=True)
    pruned = onnx.load(str(output))
    layers = _weight_quantization(pruned)
    assert len(layers) == 3 and all(stored.dtype == np.int8 for stored, _, _ in layers.values())
    assert not any(REASON in line for line in result.report["passes"][-1]["skipped"])
    if method == "omp":
        assert result.report["weight_sparsity"]["overall"] >= 0.45  # zero points stored where weights went
    elif method != "dead-units":
        assert result.report["macs_ratio"] <= 0.52
    outputs = _outputs(output)
    assert outputs["logits"].shape == _outputs(quantized["qdq"])["logits"].shape


def test_snp_requantizes_what_it_rewrote_within_half_a_step(quantized: dict[str, Path], tmp_path: Path) -> None:
    """SNP on the QDQ model against SNP on the same model with its weights as floats (the same statistics, so
    the same cuts): every weight it wrote back is the float one to within half its channel's step."""
    from graphopt.ir import graph as ir
    from graphopt.passes.quantize.through import unquantize_weights

    model = onnx.load(str(quantized["qdq"]))
    graph = ir.import_graph(model)
    unquantize_weights(graph)
    twin = tmp_path / "twin.onnx"
    onnx.save(ir.export_model(graph, model), str(twin))
    calib = {"input": _samples(32, 1)}
    results = {name: graphopt.optimize(path, method="snp", target_macs=0.6, calib=calib,
                                       output=tmp_path / f"{name}_snp.onnx")
               for name, path in (("qdq", quantized["qdq"]), ("float", twin))}
    stats = results["qdq"].report["passes"][-1]["stats"]
    assert stats["quantized_channels_requantized"] > 0
    assert results["qdq"].report["macs_ratio"] == pytest.approx(results["float"].report["macs_ratio"])
    written = _weight_quantization(onnx.load(str(tmp_path / "qdq_snp.onnx")))
    floats = onnx.load(str(tmp_path / "float_snp.onnx"))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in floats.graph.initializer}
    by_layer = {n.output[0]: values[n.input[1]] for n in floats.graph.node if n.op_type in ("Conv", "MatMul")}
    for name, (stored, scale, axis) in written.items():
        shape = [1] * stored.ndim
        shape[axis] = -1
        step = scale.reshape(shape)
        assert stored.shape == by_layer[name].shape, name
        assert np.all(np.abs(stored * step - by_layer[name]) <= step / 2 * (1 + 1e-5) + 1e-7), name


def _quantized_zoo(name: str, exporter: str, folder: Path) -> Path:
    """A torch zoo model exported by `exporter` and quantized statically by onnxruntime in QDQ form."""
    from graphopt.torch import export, zoo

    module, example = zoo.ZOO[name]()
    source = export.export_onnx(module, example, folder / f"{name}.onnx", exporter=exporter, fold_bn=False)
    batches = [{"input": np.random.default_rng(seed).standard_normal((4, *example.shape[1:])).astype(np.float32)}
               for seed in range(4)]
    return quantize_qdq(source, folder / f"{name}_qdq.onnx", batches)


def _group_norm_scales(model: onnx.ModelProto) -> list[np.ndarray]:
    """What each InstanceNormalization's scale computes, run in onnxruntime."""
    wanted = [n.input[1] for n in model.graph.node if n.op_type == "InstanceNormalization"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in wanted)
    found = run_ort(probe, {"input": np.zeros((1, 3, 16, 16), np.float32)})
    return [found[name] for name in wanted]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_group_norm_of_a_qdq_model_is_pruned_in_whole_groups(exporter: str, tmp_path: Path) -> None:
    """torch's GroupNorm quantized by onnxruntime: quantize/dequantize pairs stand between the Reshape to groups,
    the InstanceNormalization and the Reshape back, and the per-group scale is a QuantizeLinear of a Constant node
    and its DequantizeLinear (legacy export). Read as floats and written back untouched, the model is as it was, that
    QuantizeLinear included; magnitude cuts whole groups through it, the kept groups' scales as they were."""
    from graphopt.ir import graph as ir
    from graphopt.passes.quantize.through import requantize_weights, unquantize_weights

    source = _quantized_zoo("groupnorm_resnet", exporter, tmp_path)
    model = graphopt.optimize(source, method="none").model
    graph = ir.import_graph(model)
    records = unquantize_weights(graph)
    # the legacy export's norm scales are Constant nodes, quantized at run time; the dynamo export's one shared
    # initializer is stored as integers
    assert sum(r.quantize is not None for r in records) == (3 if exporter == "legacy" else 0)
    assert requantize_weights(graph, records)["quantized_channels_requantized"] == 0
    back = ir.export_model(graph, model)
    assert sorted(n.name for n in back.graph.node) == sorted(n.name for n in model.graph.node)
    output = tmp_path / "pruned.onnx"
    report = graphopt.optimize(source, method="magnitude", target_macs=0.5, output=output).report
    assert report["macs_ratio"] <= 0.51
    assert not any("channel layout not recognised" in line for line in report["passes"][-1]["skipped"])
    onnx.checker.check_model(str(output), full_check=True)
    before, after = _group_norm_scales(model), _group_norm_scales(onnx.load(str(output)))
    assert all(len(a) < len(b) and np.isin(a, b).all() for a, b in zip(after, before))


def test_exprune_names_qdq_weights_as_the_reason_it_leaves_a_layer(tmp_path: Path) -> None:
    source = tmp_path / "qdq.onnx"
    onnx.save(_planted_qdq(), str(source))
    calib = {"x": np.random.default_rng(3).standard_normal((16, 3, 6, 6)).astype(np.float32)}
    report = graphopt.optimize(source, method="exprune", calib=calib).report
    skipped = [line for entry in report["passes"] for line in entry["skipped"]]
    assert any("weight is quantized (QDQ)" in line for line in skipped), skipped


def _older_dynamic_conv() -> onnx.ModelProto:
    """Two convolutions in an older form of onnxruntime's dynamic quantization (as ddddocr ships its recogniser):
    uint8 weights, and each bias added to the integer counts, computed at run time as
    Cast(Floor(bias / (x_scale x W_scale))) reshaped to [1, C, 1, 1]. Units 1 and 4 of the first are dead."""
    rng = np.random.default_rng(11)
    first = rng.integers(0, 256, (6, 3, 3, 3))
    first[[1, 4]] = 128  # the zero point: dead units
    bias = np.where(np.isin(np.arange(6), [1, 4]), 0.0, rng.uniform(0.1, 0.5, 6)).astype(np.float32)
    inits = ", ".join([init("w1", first, "uint8"), "float s1 = {0.004}", "uint8 z1 = {128}", init("b1", bias),
                       init("w2", rng.integers(0, 256, (5, 6, 1, 1)), "uint8"), "float s2 = {0.01}",
                       "uint8 z2 = {128}", init("b2", np.full(5, 0.05, np.float32)),
                       init("shape6", [1, 6, 1, 1], "int64"), init("shape5", [1, 5, 1, 1], "int64")])
    return parse(f'''<ir_version: 8, opset_import: ["" : 12]>
        g (float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] y) <{inits}> {{
            {_older_layer(1, "x", "h", 6, " <pads = [1, 1, 1, 1]>")}
            r = Relu (h)
            {_older_layer(2, "r", "y", 5, "")}
        }}''')


def _older_layer(k: int, source: str, output: str, channels: int, attrs: str) -> str:
    """ONNX text of layer k: weight wk, scale sk, zero point zk, bias bk, in the older dynamic form."""
    return f"""q{k}, xs{k}, xz{k} = DynamicQuantizeLinear ({source})
            bs{k} = Mul (xs{k}, s{k})
            bd{k} = Div (b{k}, bs{k})
            bf{k} = Floor (bd{k})
            bi{k} = Cast <to = 6> (bf{k})
            br{k} = Reshape (bi{k}, shape{channels})
            c{k} = ConvInteger{attrs} (q{k}, w{k}, xz{k}, z{k})
            a{k} = Add (c{k}, br{k})
            f{k} = Cast <to = 1> (a{k})
            m{k} = Mul (xs{k}, s{k})
            {output} = Mul (f{k}, m{k})"""


def test_an_older_dynamic_form_with_integer_biases_is_pruned_through(tmp_path: Path) -> None:
    """The dead units go, the kept integers stay as they were, and the bias comes back as a float Add after the
    rescaling (within the Floor's step of the original's integer bias); untouched, the model is as it was."""
    from graphopt.ir import graph as ir
    from graphopt.passes.quantize.dynamic import requantize_layers, unquantize_layers

    model = _older_dynamic_conv()
    graph = ir.import_graph(model)
    layers = unquantize_layers(graph)
    assert len(layers) == 2 and all(layer.bias is not None for layer in layers)
    assert requantize_layers(graph, layers)["quantized_channels_requantized"] == 0
    assert sorted(n.name for n in ir.export_model(graph, model).graph.node) == sorted(n.name for n in model.graph.node)
    source, output = tmp_path / "old.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, str(source))
    report = graphopt.optimize(source, method="magnitude", target_macs=4 / 6, round_to=1, output=output).report
    assert report["passes"][-1]["stats"]["channels_removed"] == 2
    onnx.checker.check_model(str(output), full_check=True)
    pruned = onnx.load(str(output))
    stored = [onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert sorted(w.shape for w in stored if w.ndim == 4) == [(4, 3, 3, 3), (5, 4, 1, 1)]
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 3, 6, 6)).astype(np.float32)}
    expected, actual = run_ort(model, feeds)["y"], run_ort(pruned, feeds)["y"]
    assert np.abs(actual - expected).max() <= 0.05 * np.abs(expected).max()


def test_snp_shifts_the_bias_of_a_dynamically_quantized_bias_free_layer(tmp_path: Path) -> None:
    """SNP puts an Add (its bias shift) after a bias-free projection it refits; the integer chain written back
    feeds that Add (it wrote the original output before: an unsorted graph, exit 1)."""
    from graphopt.torch import export, zoo

    module, example = zoo.ZOO["bias_free_tokens"]()
    source = export.export_onnx(module, example, tmp_path / "m.onnx", exporter="legacy", fold_bn=False)
    path = quantize_dynamic(source, tmp_path / "dynamic.onnx")
    calib = {"input": np.random.default_rng(0).standard_normal((32, *example.shape[1:])).astype(np.float32)}
    output = tmp_path / "snp.onnx"
    result = graphopt.optimize(path, method="snp", target_macs=0.7, calib=calib, output=output)
    onnx.checker.check_model(str(output), full_check=True)
    stats = result.report["passes"][-1]["stats"]
    assert result.report["macs_ratio"] <= 0.7 * 1.02 and stats["quantized_channels_requantized"] > 0
    assert _ops(output) >= {"MatMulInteger", "DynamicQuantizeLinear"}
    assert result.report["fidelity"]["cosine"] > 0.9

"""ExPrune on Conv+ReLU: matching (and its declines), calibration on sampled feature maps, replacement, on
ONNX-text graphs and on a small digits CNN exported by both torch exporters. The pieces are driven
directly: match_conv -> sample_maps -> ConvScoring.calibrate -> replace_conv -> onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.calibration.data import load_data
from graphopt.calibration.maps import sample_maps
from graphopt.ir import graph as ir
from graphopt.passes.exprune.calib import Calibrated
from graphopt.passes.exprune.conv import ConvLayer, ConvScoring, match_conv, replace_conv
from tests.conftest import init, op_types, run_ort, tiny, weights


def _rewrite(model: onnx.ModelProto, data: dict[str, np.ndarray], fnr: float, rule: str = "threshold",
             only: str | None = None, probe: float = 0.25) -> tuple[onnx.ModelProto, dict[str, Calibrated], list[str]]:
    """The model with every matched Conv+Relu (or only the one named `only`) replaced; (model, calibrated
    per layer name, declined reasons)."""
    graph = ir.import_graph(model)
    layers: list[ConvLayer] = []
    declined = []
    for node in list(graph.nodes):
        if node.op == "Conv":
            found = match_conv(graph, node)
            if isinstance(found, str):
                declined.append(f"{node.name}: {found}")
            elif only is None or found.name == only:
                layers.append(found)
    maps = sample_maps(model, load_data(data, model), [layer.source.name for layer in layers], max_items=256,
                       batch_size=64)
    calibrated = {}
    for layer in layers:
        calibrated[layer.name] = found = ConvScoring(maps[layer.source.name], layer, probe, rule).calibrate(fnr)
        replace_conv(graph, layer, found)
    ir.cleanup(graph)
    rewritten = ir.export_model(graph, model)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten, calibrated, declined


# --- ONNX-text graphs ------------------------------------------------------------------------------

def _conv_then(tail: str, attrs: str = "pads = [1, 1, 1, 1]", group: int = 1, spatial: str = "8, 8") -> onnx.ModelProto:
    w = weights(6, 4 // group, 3, 3, seed=2) * 0.3
    b = weights(6, seed=3) * 0.1
    body = f"z = Conv <{attrs}, group = {group}> (x, w, b)\n y = {tail}(z)"
    return tiny(body, inputs=f"float[N, 4, {spatial}] x", outputs="float[N, 6, H, W] y",
                inits=", ".join([init("w", w), init("b", b)]))


def _maps(batch: int = 40, spatial: tuple[int, int] = (8, 8), seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.array([2.0, 1.0, 0.5, 0.25], dtype=np.float32)[None, :, None, None]
    return {"x": (rng.standard_normal((batch, 4, *spatial)) * scales + 0.2).astype(np.float32)}


def test_conv_not_followed_by_relu_is_declined_with_the_reason() -> None:
    model = _conv_then("Sigmoid")
    rewritten, calibrated, declined = _rewrite(model, _maps(), fnr=0.0)
    assert not calibrated and op_types(rewritten) == ["Conv", "Sigmoid"]
    assert declined == [f"{model.graph.node[0].name}: output is not read by a Relu alone"]


def test_grouped_conv_and_unknown_same_padding_are_declined() -> None:
    graph = ir.import_graph(_conv_then("Relu", group=2))
    assert match_conv(graph, graph.nodes[0]) == "group 2 (the op is a dense convolution)"
    graph = ir.import_graph(_conv_then("Relu", attrs='auto_pad = "SAME_UPPER"', spatial="H0, W0"))
    assert match_conv(graph, graph.nodes[0]) == "auto_pad SAME_UPPER with an input of unknown spatial size"


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_becomes_explicit_pads(auto_pad: str) -> None:
    model = _conv_then("Relu", attrs=f'auto_pad = "{auto_pad}", strides = [2, 2]', spatial="9, 8")
    data = _maps(spatial=(9, 8))
    rewritten, calibrated, _ = _rewrite(model, data, fnr=0.0)
    assert op_types(rewritten) == ["ExPruneConvRelu"]
    node = rewritten.graph.node[0]
    pads = next(list(a.ints) for a in node.attribute if a.name == "pads")
    assert pads == {"SAME_UPPER": [1, 0, 1, 1], "SAME_LOWER": [1, 1, 1, 0], "VALID": [0, 0, 0, 0]}[auto_pad]
    np.testing.assert_allclose(run_ort(rewritten, data)["y"], run_ort(model, data)["y"], rtol=1e-5, atol=1e-5)


# --- a small digits CNN exported by both torch exporters ---------------------------------------------

@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch = pytest.importorskip("torch")
    export = pytest.importorskip("graphopt.torch.export")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny net trains several times faster on one thread than on a busy pool
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, labels = torch.from_numpy(images[:512]), torch.from_numpy(digits.target[:512])
    for _ in range(40):  # about 90% accuracy on the rest of digits
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()
    net.eval()
    torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("exprune_conv")
    models = {}
    for exporter in ("legacy", "dynamo"):
        path = export.export_onnx(net, inputs[:2], folder / f"cnn_{exporter}.onnx", exporter=exporter, opset=17)
        models[exporter] = onnx.load(str(path))
    return {"models": models, "calib": images[:256]}


def _feeds(model: onnx.ModelProto, images: np.ndarray) -> dict[str, np.ndarray]:
    return {model.graph.input[0].name: images}


def _layer_macs(calibrated: dict[str, Calibrated], model: onnx.ModelProto) -> float:
    """The fraction of the replaced layers' MACs skipped on the calibration maps (both read 8x8 maps)."""
    graph = ir.import_graph(model)
    total = skipped = 0.0
    for node in graph.nodes:
        if node.name in calibrated:
            layer = match_conv(graph, node)
            macs = layer.macs(8, 8)
            total, skipped = total + macs, skipped + macs * calibrated[node.name].macs_skipped
    return skipped / total


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("rule", ["threshold", "sequential"])
def test_cnn_with_zero_fnr_keeps_the_calibration_outputs(digits_cnn: dict[str, object], exporter: str,
                                                        rule: str) -> None:
    model = digits_cnn["models"][exporter]
    data = _feeds(model, digits_cnn["calib"])
    rewritten, calibrated, declined = _rewrite(model, data, fnr=0.0, rule=rule)
    # the first Conv reads the 1-channel image; the other two Conv+Relu become ExPrune
    assert op_types(rewritten).count("ExPruneConvRelu") == 2 and op_types(rewritten).count("Relu") == 1
    assert declined == [f"{model.graph.node[0].name}: one input channel: nothing to probe"]
    assert [c.checkpoints for c in calibrated.values()] == ([[2], [4]] if rule == "threshold" else [[2, 4], [4, 8]])
    assert all(c.fnr == 0.0 for c in calibrated.values())
    np.testing.assert_allclose(run_ort(rewritten, data)["output"], run_ort(model, data)["output"],
                               rtol=1e-5, atol=1e-5)
    assert all(c.skip_rate > 0.05 and c.macs_skipped > 0.02 for c in calibrated.values())
    assert 0.02 < _layer_macs(calibrated, model) < 0.75


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_cnn_false_negative_rate_per_channel(digits_cnn: dict[str, object], exporter: str) -> None:
    """Each layer replaced alone, so its input is the original model's: per output channel at most 5% of
    the positive positions on the sampled maps are zeroed, in onnxruntime."""
    model = digits_cnn["models"][exporter]
    data = _feeds(model, digits_cnn["calib"])
    conv_names = [node.name for node in model.graph.node if node.op_type == "Conv"][1:]
    loose_macs = []
    for name in conv_names:
        rewritten, calibrated, _ = _rewrite(model, data, fnr=0.05, only=name)
        output = next(node.output[0] for node in rewritten.graph.node if node.op_type == "ExPruneConvRelu")
        want = sample_maps(model, load_data(data, model), [output], max_items=256, batch_size=64)[output]
        got = sample_maps(rewritten, load_data(data, rewritten), [output], max_items=256, batch_size=64)[output]
        positive = (want > 0).sum(axis=(0, 2, 3))
        missed = ((want > 1e-6) & (got == 0)).sum(axis=(0, 2, 3))
        assert np.all(missed <= np.floor(0.05 * positive)), (missed, positive)
        kept = ~((want > 1e-6) & (got == 0))
        np.testing.assert_allclose(got[kept], want[kept], rtol=1e-5, atol=1e-5)  # all else exact
        assert 0 < calibrated[name].fnr <= 0.05
        loose_macs.append(calibrated[name].macs_skipped)
    exact = _rewrite(model, data, fnr=0.0)[1]
    assert all(loose > exact[name].macs_skipped for loose, name in zip(loose_macs, conv_names))


def test_scoring_measures_what_it_calibrated_and_bounds_positions() -> None:
    model = _conv_then("Relu")
    graph = ir.import_graph(model)
    layer = match_conv(graph, graph.nodes[0])
    maps = _maps(batch=60)["x"]
    scoring = ConvScoring(maps, layer, 0.5, "sequential")
    assert scoring.scores.shape == (60 * 64, 6, 1) and scoring.checkpoints == [2]  # 2·2 = C: one checkpoint
    found = scoring.calibrate(0.1)
    assert scoring.measure(maps, found.tau) == (found.skip_rate, found.fnr, found.macs_skipped)
    assert 0 < found.fnr <= 0.1 and found.macs_skipped == pytest.approx(found.skip_rate * 0.5)
    assert scoring.macs_per_sample == layer.macs_per_sample() == 6 * 4 * 9 * 64
    bounded = ConvScoring(maps, layer, 0.5, "threshold", max_positions=500)
    assert 450 <= bounded.scores.shape[0] <= 550 and bounded.calibrate(0.1).fnr <= 0.1

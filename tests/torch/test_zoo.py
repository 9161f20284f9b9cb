"""Zoo models export with both torch exporters and run in onnxruntime exactly like in torch."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graphopt.torch.export import export_onnx  # noqa: E402
from graphopt.torch.zoo import ZOO, zoo_names  # noqa: E402
from tests.conftest import OPSET_SAMPLE  # noqa: E402

ZooExport = Callable[..., Path]

CHECK_BATCH = 3  # differs from the export batch (2) so a static batch axis would fail
EXPORTERS = ("legacy", "dynamo")
DYNAMO_UNSUPPORTED = {("se_hardswish", 13): "HardSwish", ("transformer", 13): "LayerNormalization"}


@pytest.fixture(scope="session")
def zoo_model(zoo_path) -> ZooExport:
    """Factory ``zoo_model(name, exporter="legacy", opset=17, fold_bn=True) -> Path`` over the session's export
    cache (tests/conftest.py); an export that raises fails the test."""

    def export(name: str, exporter: str = "legacy", opset: int = 17, fold_bn: bool = True) -> Path:
        return zoo_path(name, exporter, opset, fold_bn, strict=True)

    return export


def _check_input(name: str) -> torch.Tensor:
    _, example = ZOO[name]()
    return torch.randn((CHECK_BATCH, *example.shape[1:]), generator=torch.Generator().manual_seed(7))


def _run_onnxruntime(path: Path, inputs: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": inputs})[0]


def _op_histogram(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def _assert_export_matches_torch(path: Path, name: str, opset: int, fold_bn: bool) -> None:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {opset}
    torch_model, _ = ZOO[name]()
    batchnorms = sum(isinstance(module, torch.nn.BatchNorm2d) for module in torch_model.modules())
    assert _op_histogram(model)["BatchNormalization"] == (0 if fold_bn else batchnorms)
    inputs = _check_input(name)
    with torch.no_grad():
        expected = torch_model(inputs).numpy()
    np.testing.assert_allclose(_run_onnxruntime(path, inputs.numpy()), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold_bn", [True, False], ids=["folded", "bn"])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", zoo_names())
def test_opset17_export_matches_torch(zoo_model: ZooExport, name: str, exporter: str, fold_bn: bool) -> None:
    path = zoo_model(name, exporter, 17, fold_bn)
    _assert_export_matches_torch(path, name, 17, fold_bn)


OTHER_OPSET_CASES = [
    (name, exporter, opset)
    for name in OPSET_SAMPLE for exporter in EXPORTERS for opset in (13, 20)
    if exporter == "legacy" or (name, opset) not in DYNAMO_UNSUPPORTED
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "exporter", "opset"), OTHER_OPSET_CASES)
def test_other_opsets_match_torch(zoo_model: ZooExport, name: str, exporter: str, opset: int) -> None:
    path = zoo_model(name, exporter, opset, False)
    _assert_export_matches_torch(path, name, opset, fold_bn=False)


@pytest.mark.parametrize(("name", "opset"), list(DYNAMO_UNSUPPORTED))
def test_dynamo_rejects_opset_it_cannot_express(tmp_path: Path, name: str, opset: int) -> None:
    model, example = ZOO[name]()
    with pytest.raises(ValueError, match=DYNAMO_UNSUPPORTED[(name, opset)]):
        export_onnx(model, example, tmp_path / "model.onnx", exporter="dynamo", opset=opset)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", zoo_names())
def test_fold_bn_changes_only_batchnorm(zoo_model: ZooExport, name: str, exporter: str) -> None:
    folded = _op_histogram(onnx.load(zoo_model(name, exporter, 17, True)))
    unfolded = _op_histogram(onnx.load(zoo_model(name, exporter, 17, False)))
    unfolded.pop("BatchNormalization", None)
    assert unfolded == folded


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_static_batch_export_fixes_batch_axis(tmp_path: Path, exporter: str) -> None:
    model, example = ZOO["conv_flatten_gemm"]()
    path = export_onnx(model, example, tmp_path / "model.onnx", exporter=exporter, dynamic_batch=False)
    graph = onnx.load(path).graph
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_value == example.shape[0]


def test_export_refuses_training_mode(tmp_path: Path) -> None:
    model, example = ZOO["resnet_basic"]()
    with pytest.raises(ValueError, match="eval"):
        export_onnx(model.train(), example, tmp_path / "model.onnx")


def test_unknown_exporter_is_rejected(tmp_path: Path) -> None:
    model, example = ZOO["mlp"]()
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, example, tmp_path / "model.onnx", exporter="jit")


@pytest.mark.parametrize("name", zoo_names())
def test_builds_are_deterministic_and_leave_global_rng_alone(name: str) -> None:
    rng_state = torch.get_rng_state()
    first_model, first_example = ZOO[name]()
    second_model, second_example = ZOO[name]()
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(first_example, second_example)
    assert first_example.shape[0] == 2
    assert not first_model.training
    for first, second in zip(first_model.state_dict().values(), second_model.state_dict().values()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name", zoo_names())
def test_batchnorm_statistics_are_nontrivial(name: str) -> None:
    model, _ = ZOO[name]()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean.abs().min() > 0
            assert not torch.allclose(module.running_var, torch.ones_like(module.running_var))
            assert not torch.allclose(module.weight, torch.ones_like(module.weight))
            assert module.bias.abs().min() > 0

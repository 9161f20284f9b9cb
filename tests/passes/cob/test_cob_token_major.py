"""CoB on token-major [N, T, C] networks: Linear -> RMSNorm or TSRA over the last axis -> Linear, from
both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from tests.conftest import assert_equivalent

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graphopt.torch.export import export_onnx  # noqa: E402
from graphopt.torch.tsra import TSRA, RMSNorm  # noqa: E402

TOKENS, DIM, HIDDEN, MIDDLE, OUT = 6, 16, 24, 12, 8


class DivRMSNorm(nn.Module):
    """x / sqrt(mean(x², dim, keepdim) + eps): the division form other code writes."""

    def __init__(self, dim: int = -1, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(torch.mean(x * x, dim=self.dim, keepdim=True) + self.eps)


def _block(seed: int = 0, ranks: tuple[int, int] | None = None, middle: nn.Module | None = None) -> nn.Sequential:
    """Linear -> RMSNorm(dim=-1) -> Linear -> DivRMSNorm(-1) -> Linear; `ranks` plants low-rank producers."""
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(DIM, HIDDEN), RMSNorm(dim=-1), nn.Linear(HIDDEN, MIDDLE),
                          middle if middle is not None else DivRMSNorm(), nn.Linear(MIDDLE, OUT)).eval()
    for layer, rank in zip((block[0], block[2]), ranks or ()):
        with torch.no_grad():  # output columns (and bias) spanning `rank` directions
            basis = torch.randn(layer.out_features, rank)
            layer.weight.copy_(basis @ torch.randn(rank, layer.in_features) * 0.3)
            layer.bias.copy_(basis @ torch.randn(rank) * 0.1)
    return block


def _tokens(count: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, TOKENS, DIM)) * np.linspace(2.0, 0.1, DIM)).astype(np.float32)


def _export(module: nn.Module, exporter: str, tmp_path) -> onnx.ModelProto:
    example = torch.tensor(_tokens(2))
    return onnx.load(export_onnx(module, example, tmp_path / f"{exporter}.onnx", exporter=exporter, opset=17))


def _cob(model: onnx.ModelProto, **options: object) -> tuple[graphopt.api.OptimizeResult, dict]:
    result = graphopt.optimize(model, method="cob", calib={"input": _tokens()}, **{"round_to": 1, **options})  # exact counts: planted dims
    return result, result.report["passes"][-1]


def _assert_second_run_changes_nothing(first: graphopt.api.OptimizeResult) -> None:
    """CoB on its own result removes nothing and computes the same (its norms, written out as onnxruntime fuses
    them, are read back and written out again, the divisor's factor folded into the readers)."""
    again, passed = _cob(first.model, keep_variance=1.0)
    assert passed["stats"]["channels_removed"] == 0 and passed["stats"]["chains_rotated"] == 0
    assert again.report["macs_after"] == first.report["macs_after"]
    assert [n.op_type for n in again.model.graph.node] == [n.op_type for n in first.model.graph.node]
    assert_equivalent(first.model, again.model, {"input": _tokens()})


def _rms_axes(model: onnx.ModelProto) -> list[int]:
    """The axis of every RMS norm in node order: graphopt.RMSNorm's attribute, -1 for one written out over the
    last axis as onnxruntime fuses it (Pow -> ReduceMean, graphopt.ops.lower)."""
    squares = {n.output[0] for n in model.graph.node if n.op_type == "Pow"}
    return [next((a.i for a in n.attribute if a.name == "axis"), 1) if n.op_type == "RMSNorm" else -1
            for n in model.graph.node
            if n.op_type == "RMSNorm" or (n.op_type == "ReduceMean" and n.input[0] in squares)]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("rotation", ["pca", "l1pca"])
def test_last_axis_rms_norms_are_recognised_and_rotation_is_exact(exporter: str, rotation: str, tmp_path) -> None:
    model = _export(_block(), exporter, tmp_path)
    result, passed = _cob(model, rotation=rotation)
    assert passed["stats"]["rms_norms_recognised"] == 2, passed["skipped"]
    assert _rms_axes(result.model) == [-1, -1]
    assert passed["stats"]["chains_rotated"] == 2, passed["skipped"]
    assert_equivalent(model, result.model, {"input": _tokens()})


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_planted_zero_variance_directions_are_pruned_exactly_and_idempotently(exporter: str, tmp_path) -> None:
    model = _export(_block(seed=1, ranks=(7, 5)), exporter, tmp_path)
    result, passed = _cob(model, keep_variance=1.0)
    assert passed["stats"]["channels_removed"] == (HIDDEN - 7) + (MIDDLE - 5), passed["skipped"]
    shapes = sorted(tuple(i.dims) for i in result.model.graph.initializer if len(i.dims) == 2)
    assert shapes == sorted([(DIM, 7), (7, 5), (5, OUT)])
    # each norm keeps its original divisor: written out over the kept width d, its gain is sqrt(C / d)
    gains = [onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.endswith("_scale")]
    assert sorted(round(float(g[0]) ** 2 * g.size) for g in gains) == [MIDDLE, HIDDEN]
    assert_equivalent(model, result.model, {"input": _tokens()})
    _assert_second_run_changes_nothing(result)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_rms_norm_over_the_token_axis_declines_the_chain(exporter: str, tmp_path) -> None:
    model = _export(_block(middle=RMSNorm(dim=1)), exporter, tmp_path)
    result, passed = _cob(model, keep_variance=0.9)
    assert passed["stats"]["rms_norms_recognised"] == 2 and _rms_axes(result.model) == [-1, 1]
    assert passed["stats"]["chains"] == 1  # the first chain; the second ends at the norm over tokens
    assert any("RMSNorm over axis 1, not the chain's channel axis 2" in r for r in passed["skipped"]), passed["skipped"]
    shapes = {tuple(i.dims) for i in result.model.graph.initializer if len(i.dims) == 2}
    kept = next(columns for rows, columns in shapes if rows == DIM)
    assert kept < HIDDEN and shapes == {(DIM, kept), (kept, MIDDLE), (MIDDLE, OUT)}  # only the first chain is cut
    assert_equivalent(model, _cob(model)[0].model, {"input": _tokens()})  # rotation alone: still exact
    magnitude = graphopt.optimize(model, method="magnitude", calib={"input": _tokens()}, target_macs=0.9)
    skipped = magnitude.report["passes"][-1]["skipped"]  # the channel rule blocks that group too
    assert any(f"({MIDDLE} channels)" in r and "channels off its normalised axis" in r for r in skipped), skipped


def test_magnitude_prunes_through_last_axis_rms_norms(tmp_path) -> None:
    model = _export(_block(seed=2), "legacy", tmp_path)
    result = graphopt.optimize(model, method="magnitude", calib={"input": _tokens()}, target_macs=0.7)
    assert result.report["passes"][-1]["stats"]["prunable_groups"] == 2
    assert 0.6 < result.report["macs_ratio"] <= 0.7
    onnx.checker.check_model(result.model)


def test_torch_rms_norm_without_weights_is_recognised_from_the_dynamo_export(tmp_path) -> None:
    """nn.RMSNorm(elementwise_affine=False) over the last axis (the legacy exporter has no aten::rms_norm at 17)."""
    model = _export(_block(middle=nn.RMSNorm(MIDDLE, eps=1e-6, elementwise_affine=False)), "dynamo", tmp_path)
    result, passed = _cob(model)
    assert passed["stats"]["rms_norms_recognised"] == 2 and _rms_axes(result.model) == [-1, -1]
    assert passed["stats"]["chains_rotated"] == 2, passed["skipped"]
    assert_equivalent(model, result.model, {"input": _tokens()})


@pytest.mark.parametrize(("tokens", "axes", "expected"), [(1, "[-1]", [-1]), (6, "[-1]", [-1]), (6, "[1, 2]", []),
                                                          (6, "[1]", [1])])
def test_the_probe_tells_the_normalised_axes_apart(tokens: int, axes: str, expected: list[int]) -> None:
    """x / sqrt(mean(x², axes) + eps) on [N, T, 16]: over the last axis (also with T = 1), over tokens,
    or over both (no RMS norm of one axis: left alone)."""
    from graphopt.ir import graph as ir
    from graphopt.passes.channels.function_patterns import canonicalise
    from tests.conftest import tiny

    body = f"""squares = Mul(x, x)
    mean = ReduceMean <axes = {axes}> (squares)
    shifted = Add(mean, eps)
    rms = Sqrt(shifted)
    y = Div(x, rms)"""
    shape = f"float[N, {tokens}, 16]"
    model = tiny(body, inputs=f"{shape} x", outputs=f"{shape} y", inits="float eps = {1e-5}", opset=17)
    graph = ir.import_graph(model)
    assert canonicalise(graph) == (len(expected), 0)
    exported = ir.export_model(graph, model)
    assert _rms_axes(exported) == expected
    feeds = {"x": np.random.default_rng(0).standard_normal((3, tokens, 16)).astype(np.float32)}
    assert_equivalent(model, exported, feeds)


SPLIT = 10  # TSRA(dim=-1) splits the HIDDEN = 24 channels into U = 10 and V = 14


def _tsra_block(seed: int = 0, ranks: tuple[int, int] | None = None, dim: int = -1,
                split: int = SPLIT) -> nn.Sequential:
    """Linear -> TSRA(dim) -> Linear -> RMSNorm(-1) -> Linear; `ranks` = (U, V) plants a first producer
    whose outputs (and bias) span `ranks[0]` directions in U and `ranks[1]` in V."""
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(DIM, HIDDEN), TSRA(split, dim=dim), nn.Linear(HIDDEN, MIDDLE),
                          RMSNorm(dim=-1), nn.Linear(MIDDLE, OUT)).eval()
    if ranks is not None:
        with torch.no_grad():
            for rows, rank in zip((slice(0, split), slice(split, HIDDEN)), ranks):
                size = rows.stop - rows.start
                basis = torch.randn(size, rank)
                block[0].weight[rows] = basis @ torch.randn(rank, DIM) * 0.3
                block[0].bias[rows] = basis @ torch.randn(rank) * 0.1
    return block


def _tsra_nodes(model: onnx.ModelProto) -> list[dict[str, int]]:
    return [{a.name: a.i for a in n.attribute if a.name in ("axis", "split")} for n in model.graph.node
            if n.op_type == "TSRA"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("rotation", ["pca", "l1pca"])
def test_last_axis_tsra_is_recognised_and_rotation_is_exact(exporter: str, rotation: str, tmp_path) -> None:
    model = _export(_tsra_block(), exporter, tmp_path)
    result, passed = _cob(model, rotation=rotation)
    assert passed["stats"]["tsra_recognised"] == 1 and passed["stats"]["rms_norms_recognised"] == 1
    assert _tsra_nodes(result.model) == [{"axis": -1, "split": SPLIT}]
    assert passed["stats"]["chains_rotated"] == 2, passed["skipped"]
    assert_equivalent(model, result.model, {"input": _tokens()}, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_planted_zero_variance_in_both_subspaces_is_pruned_exactly(exporter: str, tmp_path) -> None:
    model = _export(_tsra_block(seed=1, ranks=(4, 6)), exporter, tmp_path)
    result, passed = _cob(model, keep_variance=1.0)
    # the TSRA's output spans the 4 + 6 directions, so the middle Linear's spans 10 and its bias: 11
    assert passed["stats"]["channels_removed"] == (HIDDEN - 4 - 6) + (MIDDLE - 11), passed["skipped"]
    assert _tsra_nodes(result.model) == [{"axis": -1, "split": 4}]  # U keeps its 4 directions, first
    shapes = sorted(tuple(i.dims) for i in result.model.graph.initializer if len(i.dims) == 2)
    assert shapes == sorted([(DIM, 10), (10, 11), (11, OUT)])
    assert_equivalent(model, result.model, {"input": _tokens()})
    _assert_second_run_changes_nothing(result)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_tsra_over_the_token_axis_declines_the_chain(exporter: str, tmp_path) -> None:
    model = _export(_tsra_block(dim=1, split=2), exporter, tmp_path)
    result, passed = _cob(model, keep_variance=0.9)
    assert passed["stats"]["tsra_recognised"] == 1 and _tsra_nodes(result.model) == [{"split": 2}]
    assert any("TSRA over axis 1, not the chain's channel axis 2" in r for r in passed["skipped"]), passed["skipped"]
    assert passed["stats"]["chains"] == 1  # the chain behind the RMS norm; the first ends at the TSRA
    assert (DIM, HIDDEN) in {tuple(i.dims) for i in result.model.graph.initializer}
    magnitude = graphopt.optimize(model, method="magnitude", calib={"input": _tokens()}, target_macs=0.9)
    skipped = magnitude.report["passes"][-1]["skipped"]  # the channel rule blocks that group too
    assert any(f"({HIDDEN} channels)" in r and "channels off its normalised axis" in r for r in skipped), skipped

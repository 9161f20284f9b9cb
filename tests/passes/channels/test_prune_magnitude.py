"""magnitude and random structured pruning: the torch zoo from both exporters, exact removal of planted
zero channels, options and their refusals, idempotence, and real model-zoo topologies.

Pruned models are saved, checked by path with the ONNX checker, and run in onnxruntime (graph
optimisations disabled) on batch-3 inputs with the original's output names, dtypes and shapes. The
MACs reached are within 3 points of the target and never above it, unless the prunable groups cannot
go that low: then the pass's `min_macs_ratio` stat says so and the minimum is what is reached.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt import cli
from graphopt.errors import GraphoptError
from tests.conftest import OPSET_SAMPLE, ZooPath, assert_equivalent, init, random_inputs, run_ort, tiny, weights

try:  # torch is optional: without it the zoo and planted-channel tests skip, the rest still run
    import torch

    from graphopt.torch import export, zoo
except ImportError:
    torch = export = zoo = None  # type: ignore[assignment]

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

TOLERANCE = 0.03  # of the MACs ratio, below the target
TARGETS = (0.7, 0.5)
NAMES = list(zoo.ZOO) if zoo is not None else []
# (exporter, opset, fold_bn): legacy at every opset both ways, dynamo where it is cheap enough
CONFIGS = [("legacy", opset, fold) for opset in (13, 17, 20) for fold in (True, False)]
CONFIGS += [("dynamo", 17, False), ("dynamo", 18, True)]
SLOW_CONFIGS = [("dynamo", 13, False), ("dynamo", 20, False)]  # the export tests' files


def prune_file(source: Path | str, tmp_path: Path, **options: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Optimize to a file, check it by path; (pruned model, report)."""
    output = tmp_path / "pruned.onnx"
    result = graphopt.optimize(source, output=output, **options)
    onnx.checker.check_model(str(output), full_check=True)
    return onnx.load(str(output)), result.report


def stats_of(report: dict[str, Any]) -> dict[str, Any]:
    return report["passes"][-1]["stats"]


def assert_same_interface(reference: onnx.ModelProto, candidate: onnx.ModelProto, batch: int = 3) -> None:
    feeds = random_inputs(reference, batch=batch)
    expected, actual = run_ort(reference, feeds), run_ort(candidate, feeds)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert (actual[name].dtype, actual[name].shape) == (value.dtype, value.shape), name
        assert np.all(np.isfinite(actual[name])), name


def assert_reaches(report: dict[str, Any], target: float) -> None:
    """Within TOLERANCE below the target (further only where no group could keep one more step within the
    target: whole GroupNorm groups are coarse steps), or at the floor the prunable groups allow (and the
    stats say so)."""
    ratio, stats = report["macs_ratio"], stats_of(report)
    assert ratio == pytest.approx(stats["estimated_macs_ratio"], rel=1e-9, abs=1e-12)  # the MAC model is exact
    if stats["min_macs_ratio"] <= target:
        assert ratio <= target + 1e-9, stats
        assert ratio >= target - TOLERANCE or ratio + stats["cheapest_restore"] > target, stats
    else:
        assert ratio == pytest.approx(stats["min_macs_ratio"], rel=1e-9), stats


def assert_same_graph(first: onnx.ModelProto, second: onnx.ModelProto) -> None:
    """Same nodes, interface and initializer values (whatever the tensors' storage encoding)."""
    def parts(model: onnx.ModelProto) -> tuple:
        graph = model.graph
        return ([n.SerializeToString() for n in graph.node], [v.SerializeToString() for v in graph.input],
                [v.SerializeToString() for v in graph.output])

    assert parts(first) == parts(second)
    arrays = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (first, second)]
    assert arrays[0].keys() == arrays[1].keys()
    for name, value in arrays[0].items():
        assert value.dtype == arrays[1][name].dtype and np.array_equal(value, arrays[1][name]), name


def conv_out_channels(model: onnx.ModelProto) -> dict[str, int]:
    initializers = {t.name: t for t in model.graph.initializer}
    return {n.name: initializers[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv"}


# -- 1. the zoo -----------------------------------------------------------------------------------

def _zoo_params(configs: list[tuple[str, int, bool]], names: list[str], marks: tuple = ()) -> list:
    """Each architecture once per export configuration, the target alternating with the architecture and the
    configuration: every architecture and every configuration meets both targets."""
    return [pytest.param(name, exporter, opset, fold, target, marks=marks,
                         id=f"{name}-{exporter}{opset}-{'bn_folded' if fold else 'bn_kept'}-{target}")
            for c, (exporter, opset, fold) in enumerate(configs) for a, name in enumerate(names)
            for target in (TARGETS[(a + c) % 2],)]


# the dynamo exports at opsets 13 and 20 (its slowest) on the architectures the export tests take at those opsets
@pytest.mark.parametrize("name,exporter,opset,fold_bn,target",
                         _zoo_params(CONFIGS, NAMES) + _zoo_params(SLOW_CONFIGS, list(OPSET_SAMPLE), (pytest.mark.slow,)))
def test_zoo_prunes_to_target_and_runs(name: str, exporter: str, opset: int, fold_bn: bool, target: float,
                                       zoo_path: ZooPath, tmp_path: Path) -> None:
    source = zoo_path(name, exporter, opset, fold_bn)
    pruned, report = prune_file(source, tmp_path, method="magnitude", target_macs=target)
    assert stats_of(report)["channels_removed"] > 0
    assert_reaches(report, target)
    assert_same_interface(onnx.load(str(source)), pruned)


# -- 2. exactness: planted zero channels are exactly the ones removed ---------------------------

def _zero_channels(conv_bn: Any, channels: tuple[int, ...]) -> None:
    """Zero the conv rows and the BN scale and shift: the channel is exactly 0, before and after folding."""
    conv, norm = conv_bn[0], conv_bn[1]
    with torch.no_grad():
        conv.weight[list(channels)] = 0.0
        norm.weight[list(channels)] = 0.0
        norm.bias[list(channels)] = 0.0


def _planted_resnet() -> tuple[Any, Any, int, int]:
    """resnet_basic with zeros in both residual streams (every coupled producer) and in both blocks' middles."""
    model, example = zoo.ZOO["resnet_basic"]()
    stem, block1, block2 = model[0], model[1], model[2]
    stream16, middle1, stream32, middle2 = (3, 9), (5,), (0, 17, 30), (12,)
    for conv_bn in (stem, block1.conv2):
        _zero_channels(conv_bn, stream16)
    _zero_channels(block1.conv1, middle1)
    for conv_bn in (block2.conv2, block2.shortcut):
        _zero_channels(conv_bn, stream32)
    _zero_channels(block2.conv1, middle2)

    def macs(s: int, m: int, p: int, q: int) -> int:  # widths: stream16, middle1, stream32, middle2
        full = 16 * 16 * 9 * (3 * s + 2 * s * m) + 8 * 8 * 9 * (s * q + q * p)
        return full + 8 * 8 * s * p + p * 10

    return model, example, macs(16, 16, 32, 32), macs(14, 15, 29, 31)


def _planted_mlp() -> tuple[Any, Any, int, int]:
    model, example = zoo.ZOO["mlp"]()
    with torch.no_grad():
        for layer, rows in ((model[0], (4, 20)), (model[2], (0, 7, 31))):
            layer.weight[list(rows)] = 0.0
            layer.bias[list(rows)] = 0.0
    return model, example, 64 * 32 + 32 * 32 + 32 * 10, 64 * 30 + 30 * 29 + 29 * 10


@needs_torch
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("planted", [_planted_resnet, _planted_mlp], ids=["resnet_basic", "mlp"])
def test_planted_zero_channels_are_removed_exactly(planted: Callable, exporter: str, tmp_path: Path) -> None:
    model, example, macs_before, macs_after = planted()
    source = export.export_onnx(model, example, tmp_path / "planted.onnx", exporter=exporter, opset=17, fold_bn=True)
    original = onnx.load(str(source))
    target = macs_after / macs_before + 1e-9
    feeds = random_inputs(original, batch=3)

    for norm in ("l1", "l2"):
        pruned, report = prune_file(source, tmp_path, method="magnitude", target_macs=target, norm=norm, round_to=1)
        assert (report["macs_before"], report["macs_after"]) == (macs_before, macs_after)
        assert_equivalent(original, pruned, feeds, rtol=1e-5, atol=1e-5)

    shuffled, report = prune_file(source, tmp_path, method="random", target_macs=target, seed=0, round_to=1)
    assert report["macs_after"] <= macs_after
    expected, actual = run_ort(original, feeds)["output"], run_ort(shuffled, feeds)["output"]
    assert np.max(np.abs(expected - actual)) > 1e-3  # the same budget spent at random does change outputs


@needs_torch
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_planted_head_dims_of_attention_split_in_sections_are_removed_exactly(exporter: str, tmp_path: Path) -> None:
    """timm's attention (q/k/v split at once into [3, heads, head_dim]): head dims 2 and 5, zero in every head's
    query, key and value and in the output projection's rows, go from all three sections and every head;
    queries·keys and the context lose only zeros, so the output is unchanged."""
    model, example = zoo.ZOO["sectioned_transformer"]()
    block, dims = model[0], [2, 5]
    heads, width = block.heads, block.head_dim
    rows = [s * heads * width + h * width + i for s in range(3) for h in range(heads) for i in dims]
    columns = [h * width + i for h in range(heads) for i in dims]
    with torch.no_grad():
        block.qkv.weight[rows] = 0.0
        block.qkv.bias[rows] = 0.0
        block.out.weight[:, columns] = 0.0
    source = export.export_onnx(model, example, tmp_path / "planted.onnx", exporter=exporter, opset=17)
    original = onnx.load(str(source))
    tokens, d_model = example.shape[-2:]
    removed = tokens * d_model * len(rows) + 2 * heads * tokens * tokens * len(dims) + tokens * len(columns) * d_model
    macs_before = graphopt.optimize(source, method="none").report["macs_before"]

    pruned, report = prune_file(source, tmp_path, method="magnitude", target_macs=1 - removed / macs_before + 1e-9,
                                round_to=1)
    assert report["macs_after"] == macs_before - removed
    expected = _matmul_weight_shapes(original)
    for before, after in (((d_model, 3 * d_model), (d_model, 3 * d_model - len(rows))),
                          ((d_model, d_model), (d_model - len(columns), d_model))):
        expected[expected.index(before)] = after
    assert sorted(_matmul_weight_shapes(pruned)) == sorted(expected)
    assert_equivalent(original, pruned, random_inputs(original, batch=3), rtol=1e-5, atol=1e-5)


def _matmul_weight_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    constants = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [constants[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


# -- 4. options, refusals, idempotence ----------------------------------------------------------

def test_round_to_keeps_multiples(zoo_path: ZooPath, tmp_path: Path) -> None:
    source = zoo_path("resnet_basic", "legacy", 17, True)
    output, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code = cli.main(["optimize", str(source), "-o", str(output), "--method", "magnitude", "--target-macs", "0.5",
                     "--round-to", "8", "--report", str(report), "--quiet"])
    assert code == 0
    assert_reaches(json.loads(report.read_text()), 0.5)
    pruned, original = onnx.load(str(output)), onnx.load(str(source))
    before, after = conv_out_channels(original), conv_out_channels(pruned)
    assert any(after[name] < before[name] for name in before)
    assert all(count % 8 == 0 for count in after.values()), after
    gemm = next(n for n in pruned.graph.node if n.op_type == "Gemm")
    weight = next(t for t in pruned.graph.initializer if t.name == gemm.input[1])
    assert all(dim % 8 == 0 for dim in weight.dims if dim != 10)  # the 10 classes are a graph output


def test_tiny_target_keeps_one_channel_per_group(zoo_path: ZooPath, tmp_path: Path) -> None:
    source = zoo_path("resnet_basic", "legacy", 17, True)
    pruned, report = prune_file(source, tmp_path, method="magnitude", target_macs=0.001)
    stats = stats_of(report)
    assert stats["min_macs_ratio"] > 0.001
    assert_reaches(report, 0.001)
    assert set(conv_out_channels(pruned).values()) == {1}
    assert stats["channels_removed"] == stats["channels_prunable"] - stats["prunable_groups"]
    assert_same_interface(onnx.load(str(source)), pruned)


def test_missing_target_is_one_line_exit_2(zoo_path: ZooPath, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = zoo_path("mlp", "legacy", 17, True)
    output = tmp_path / "pruned.onnx"
    assert cli.main(["optimize", str(source), "-o", str(output), "--method", "magnitude", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--target-macs" in error
    assert not output.exists()
    with pytest.raises(GraphoptError, match="--target-macs"):
        graphopt.optimize(source, method="random")


def _unchanged_by_full_target(source: Path | onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """Magnitude at target 1.0 gives exactly what the pre-passes alone give; returns that model."""
    kept, report = prune_file(source, tmp_path, method="magnitude", target_macs=1.0)
    reference = graphopt.optimize(source, method="none").model
    assert_same_graph(kept, reference)
    assert not report["passes"][-1]["modified"] and stats_of(report)["channels_removed"] == 0
    assert report["macs_ratio"] == 1.0
    return kept


def test_full_target_changes_nothing_and_pruning_is_idempotent(zoo_path: ZooPath, tmp_path: Path) -> None:
    source = zoo_path("yolo_c2f", "legacy", 17, True)
    _unchanged_by_full_target(source, tmp_path)
    pruned, report = prune_file(source, tmp_path, method="magnitude", target_macs=0.5)
    assert stats_of(report)["channels_removed"] > 0
    again = _unchanged_by_full_target(pruned, tmp_path)
    feeds = random_inputs(pruned, batch=3)
    assert_equivalent(pruned, again, feeds)


def test_model_without_prunable_groups_is_left_unchanged_with_reasons(tmp_path: Path) -> None:
    model = tiny("[a] a = Conv <pads = [1, 1, 1, 1]> (x, w)\n[n] y = LRN <size = 3> (a)",
                 inits=f"{init('w', np.ones((4, 3, 3, 3)))}")
    kept, report = prune_file(model, tmp_path, method="magnitude", target_macs=0.5)
    record = report["passes"][-1]
    assert not record["modified"] and report["macs_ratio"] == 1.0
    assert stats_of(report)["prunable_groups"] == 0 and stats_of(report)["min_macs_ratio"] == 1.0
    assert len(record["skipped"]) == 1  # the one group, with its first reason
    assert "n (LRN): no channel rule for this op" in record["skipped"][0]
    assert_same_graph(kept, graphopt.optimize(model, method="none").model)


def test_equal_scores_prune_evenly_instead_of_collapsing(tmp_path: Path) -> None:
    """Weights that are all equal (as when a model's weights come from ConstantOfShape) tie every score."""
    model = tiny("[h1] h = MatMul (x, w1)\n[r1] r = Relu (h)\n[h2] k = MatMul (r, w2)\n[r2] s = Relu (k)\n"
                 "[o] y = MatMul (s, w3)", inputs="float[N, 16] x", outputs="float[N, 4] y",
                 inits=", ".join(init(name, np.full(shape, 0.25)) for name, shape in
                                 (("w1", (16, 24)), ("w2", (24, 24)), ("w3", (24, 4)))))
    pruned, report = prune_file(model, tmp_path, method="magnitude", target_macs=0.5)
    assert_reaches(report, 0.5)
    shapes = {t.name: numpy_helper.to_array(t).shape for t in pruned.graph.initializer}
    first, second = (shapes[n.input[1]][1] for n in pruned.graph.node if n.name in ("h1", "h2"))
    assert abs(first - second) <= 1 and 1 < first < 24  # both hidden layers pruned alike


def _kept_columns(pruned: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Which of `original`'s columns `pruned` kept (each matched exactly, in order)."""
    kept = [next(j for j in range(original.shape[1]) if np.array_equal(pruned[:, i], original[:, j]))
            for i in range(pruned.shape[1])]
    assert kept == sorted(set(kept))
    return np.array(kept, dtype=np.int64)


def test_history_says_which_channels_went_with_their_scores(tmp_path: Path) -> None:
    """x[16] -> h1 (24 units) -> h2 (20 units) -> y: the removed indices are the columns missing from
    the pruned weights, with the L1 norms that ranked them below every kept channel of their group."""
    rng = np.random.default_rng(3)
    values = {"w1": rng.standard_normal((16, 24)) * rng.uniform(0.2, 2.0, 24),
              "w2": rng.standard_normal((24, 20)) * rng.uniform(0.2, 2.0, 20), "w3": rng.standard_normal((20, 4))}
    model = tiny("[h1] h = MatMul (x, w1)\n[r1] r = Relu (h)\n[h2] k = MatMul (r, w2)\n[r2] s = Relu (k)\n"
                 "[o] y = MatMul (s, w3)", inputs="float[N, 16] x", outputs="float[N, 4] y",
                 inits=", ".join(init(name, value.astype(np.float32)) for name, value in values.items()))
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pruned, report = prune_file(model, tmp_path, method="magnitude", target_macs=0.5)
    stored = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    after = {n.name: stored[n.input[1]] for n in pruned.graph.node if n.op_type == "MatMul"}  # by node name
    history = json.loads(json.dumps(report))["passes"][-1]["history"]
    by_producer = {next(m for m in entry["members"] if m.endswith(":producer")): entry for entry in history}
    assert set(by_producer) == {"h1:producer", "h2:producer"}
    kept_1 = _kept_columns(after["h1"], original["w1"])
    kept_2 = _kept_columns(after["h2"], original["w2"][kept_1])
    for (name, kept), weight in zip((("h1", kept_1), ("h2", kept_2)), (original["w1"], original["w2"])):
        entry = by_producer[f"{name}:producer"]
        assert entry["by"] == "magnitude" and entry["criterion"] == "l1_norm" and entry["target_macs"] == 0.5
        assert entry["size"] == weight.shape[1] and entry["kept"] == kept.size < weight.shape[1]
        assert entry["removed"] == sorted(set(range(weight.shape[1])) - set(kept.tolist()))
        norms = np.abs(weight.astype(np.float64)).sum(axis=0)
        np.testing.assert_allclose(entry["scores"], norms[entry["removed"]], rtol=1e-5)
        assert entry["lowest_kept_score"] == pytest.approx(norms[kept].min(), rel=1e-5)
        assert max(entry["scores"]) <= entry["lowest_kept_score"]
        assert entry["group_mean_score"] == pytest.approx(norms.mean(), rel=1e-5)
    assert sum(len(e["removed"]) for e in history) == stats_of(report)["channels_removed"]


def test_history_is_left_out_when_nothing_is_removed(tmp_path: Path) -> None:
    model = tiny("[a] y = Conv <pads = [1, 1, 1, 1]> (x, w)", inits=init("w", weights(4, 3, 3, 3)))
    _, report = prune_file(model, tmp_path, method="magnitude", target_macs=0.5)
    assert all("history" not in record for record in report["passes"])


# -- 5. real topologies: the light model zoo shipped inside the onnx wheel ------------------------

# vgg19 (70 s) and zfnet512 (30 s) are left out: plain Conv/LRN/Gemm chains like alexnet, which stays
LEFT_OUT = {"light_vgg19.onnx", "light_zfnet512.onnx"}
LIGHT = sorted(path for path in glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data",
                                                       "light", "*.onnx")) if Path(path).name not in LEFT_OUT)
SLOW_LIGHT = {"light_bvlc_alexnet.onnx"}  # 240 MB of weights: about 11 s


# What each model is expected to give at --target-macs 0.7: pruned to the target (floor None), or held at a
# floor above it because the named reasons (from any pass) block every group but a few; the reasons named for a
# model that reaches the target are those of the groups it leaves whole. None is refused outright.
# The light models store their weights as ConstantOfShape fills: alexnet's fc6 weight (144 MiB from a 16-byte
# shape) is above the constant-folding limit, so it stays a node and fc6's channels are not prunable; its LRN
# layers have no channel rule. Its grouped convolutions and ShuffleNet's prune by units of one channel per
# group, except where a channel shuffle of another width splits the shuffle's units across groups.
LIGHT_FLOORS = {
    "light_bvlc_alexnet": (None, ["(LRN): no channel rule for this op",
                                  "fc6_w_0: ConstantOfShape to [4096, 9216] is above the folding limit"]),
    "light_shufflenet": (None, ["(Conv): grouped convolution (groups=4) whose groups split the channels' coupled"]),
}


@pytest.mark.parametrize("path", [pytest.param(p, id=Path(p).stem, marks=(pytest.mark.slow,) if Path(p).name in
                                               SLOW_LIGHT else ()) for p in LIGHT])
def test_light_model_zoo_prunes_to_the_target_or_its_named_floor(path: str, tmp_path: Path) -> None:
    pruned, report = prune_file(path, tmp_path, method="magnitude", target_macs=0.7)
    stats, skipped = stats_of(report), [line for record in report["passes"] for line in record["skipped"]]
    floor, reasons = LIGHT_FLOORS.get(Path(path).stem, (None, []))
    assert_reaches(report, 0.7)
    if floor is None:
        assert stats["min_macs_ratio"] <= 0.7 and 0.7 - TOLERANCE <= report["macs_ratio"] <= 0.7, stats
        assert stats["channels_removed"] > 0
    else:
        assert stats["min_macs_ratio"] == pytest.approx(floor, abs=0.005), stats
    for reason in reasons:
        assert any(reason in line for line in skipped), (reason, skipped[:5])
    if floor == 1.0:  # nothing prunable: the model comes back computing exactly what it did
        assert stats["prunable_groups"] == 0 and stats["channels_removed"] == 0
        assert_equivalent(onnx.load(path), pruned, random_inputs(onnx.load(path), batch=1))
    else:
        assert_same_interface(onnx.load(path), pruned, batch=1)

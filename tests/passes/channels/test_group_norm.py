"""GroupNorm: its channels go in whole groups. Removing a whole group leaves every other group's statistics as
they were, so a group whose output is zero (or repeats another group) goes exactly; part of a group never goes.
Covered: torch's GroupNorm as both exporters write it at opset 17 (Reshape to [N, groups, -1],
InstanceNormalization, Reshape back) and the GroupNormalization op the dynamo exporter writes at opset 21."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.analysis.channels import AtomTable
from graphopt.inspect import inspect_model
from tests.conftest import assert_equivalent

torch = pytest.importorskip("torch")
export = pytest.importorskip("graphopt.torch.export")
zoo = pytest.importorskip("graphopt.torch.zoo")

ZERO, COPIED, ORIGINAL = 3, 5, 1  # planted in the block's second GroupNorm: group 3 is zero, group 5 repeats 1
HALF_DEAD = slice(24, 26)  # the next convolution ignores two channels of group 6: the group stays
RUN = 4  # 48 channels in 12 groups


def _planted() -> torch.nn.Module:
    model, _ = zoo.ZOO["groupnorm_resnet"]()
    block = model[1]
    with torch.no_grad():
        rows = lambda group: slice(group * RUN, (group + 1) * RUN)  # noqa: E731
        block.norm2.weight[rows(ZERO)] = 0.0
        block.norm2.bias[rows(ZERO)] = 0.0
        block.conv2.weight[:, rows(ZERO)] = 0.0
        block.conv2.weight[:, HALF_DEAD] = 0.0
        block.conv1.weight[rows(COPIED)] = block.conv1.weight[rows(ORIGINAL)]
        block.conv1.bias[rows(COPIED)] = block.conv1.bias[rows(ORIGINAL)]
        block.norm2.weight[rows(COPIED)] = block.norm2.weight[rows(ORIGINAL)]
        block.norm2.bias[rows(COPIED)] = block.norm2.bias[rows(ORIGINAL)]
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("groupnorm")
    found = {}

    def get(exporter: str, opset: int) -> onnx.ModelProto:
        if (exporter, opset) not in found:
            path = folder / f"{exporter}_{opset}.onnx"
            export.export_onnx(_planted(), torch.randn(2, 3, 16, 16), path, exporter=exporter, opset=opset)
            found[exporter, opset] = onnx.load(str(path))
        return found[exporter, opset]

    return get


EXPORTS = [("legacy", 17), ("dynamo", 17), ("dynamo", 21)]
EXPORT_IDS = ["legacy-17", "dynamo-17", "dynamo-21"]


def _calibration(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((count, 3, 16, 16)).astype(np.float32)}


def _group_counts(model: onnx.ModelProto) -> list[int]:
    """Groups of each GroupNorm of a written model: InstanceNormalization scales or num_groups attributes."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "InstanceNormalization":
            found.append(int(weights[node.input[1]].size))
        elif node.op_type == "GroupNormalization":
            found.append(next(a.i for a in node.attribute if a.name == "num_groups"))
    return found


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=EXPORT_IDS)
def test_the_groups_a_groupnorm_normalises_go_whole(exporter: str, opset: int, planted) -> None:
    model = planted(exporter, opset)
    if opset >= 21:
        assert any(n.op_type == "GroupNormalization" for n in model.graph.node)
    groups = inspect_model(model, groups=True)["groups"]
    prunable = [g for g in groups if g["prunable"]]
    assert len(prunable) == 2 and all(g["size"] == 48 and g["whole_runs_of"] == RUN for g in prunable)


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=EXPORT_IDS)
def test_snp_removes_a_zero_and_a_repeated_group_exactly(exporter: str, opset: int, planted) -> None:
    model = planted(exporter, opset)
    result = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=_calibration(64, 1), round_to=1,
                               criterion="variance", reconstruct_target="self")
    assert sorted(_group_counts(result.model)) == [10, 12, 12]  # the block's second GroupNorm lost two groups
    assert_equivalent(model, result.model, _calibration(3, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=EXPORT_IDS)
def test_dead_units_remove_only_whole_dead_groups(exporter: str, opset: int, planted) -> None:
    model = planted(exporter, opset)
    result = graphopt.optimize(model, method="dead-units")
    assert sorted(_group_counts(result.model)) == [11, 12, 12]  # group 3 went; group 6, half dead, stayed
    assert_equivalent(model, result.model, _calibration(3, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["magnitude", "random", "snp"])
@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=EXPORT_IDS)
def test_a_cut_keeps_whole_groups(exporter: str, opset: int, method: str, planted) -> None:
    model = planted(exporter, opset)
    result = graphopt.optimize(model, method=method, target_macs=0.5, calib=_calibration(32, 3))
    assert result.report["macs_ratio"] <= 0.51
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    convs = [weights[n.input[1]].shape[0] for n in result.model.graph.node if n.op_type == "Conv"]
    assert min(convs) < 48 and all(c % RUN == 0 for c in convs) and convs[0] == convs[2]  # [0], [2]: the stream
    assert sorted(_group_counts(result.model)) == sorted([convs[0] // RUN, convs[1] // RUN, convs[0] // RUN])
    onnx.checker.check_model(result.model, full_check=True)


def _group_normalization(scale_size: int, concat: bool = False) -> onnx.ModelProto:
    """x -> Conv 3->16 (two Convs of 2 and 14 channels concatenated, with `concat`) -> GroupNormalization
    (4 groups; scale and bias of `scale_size`) -> Relu -> Conv 16->5."""
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((16, 3, 3, 3)), "s": rng.uniform(0.5, 1.5, scale_size),
              "b": rng.uniform(-0.3, 0.3, scale_size), "w2": rng.standard_normal((5, 16, 1, 1))}
    arrays["s"][4:8], arrays["b"][4:8] = 0.0, 0.0  # the second group writes zeros
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])]
    if concat:
        arrays["wa"], arrays["wb"] = arrays["w"][:2], arrays["w"][2:]
        nodes = [helper.make_node("Conv", ["x", "wa"], ["ca"], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["x", "wb"], ["cb"], pads=[1, 1, 1, 1]),
                 helper.make_node("Concat", ["ca", "cb"], ["c"], axis=1)]
        del arrays["w"]
    nodes += [helper.make_node("GroupNormalization", ["c", "s", "b"], ["g"], num_groups=4),
              helper.make_node("Relu", ["g"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    graph = helper.make_graph(nodes, "groupnorm", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 5, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_group_normalization_loses_whole_groups_exactly() -> None:
    model = _group_normalization(16)
    calib = {"x": np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    result = graphopt.optimize(model, method="snp", keep_variance=1.0, calib=calib, round_to=1)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    norm = next(n for n in result.model.graph.node if n.op_type == "GroupNormalization")
    assert _group_counts(result.model) == [3] and weights[norm.input[1]].shape == (12,)
    assert_equivalent(model, result.model, {"x": calib["x"][:3]}, rtol=1e-4, atol=1e-4)


def test_a_group_spanning_channels_pruned_apart_blocks_with_the_reason() -> None:
    groups = inspect_model(_group_normalization(16, concat=True), groups=True)["groups"]
    reasons = [g["reason"] for g in groups if g["size"] in (2, 14)]
    assert reasons and all("normalises together spans channels pruned independently" in r for r in reasons)


def test_coupled_runs_take_their_least_common_multiple_and_a_cut_through_a_run_blocks() -> None:
    table = AtomTable()
    a, b = table.new(12), table.new(12)
    table.set_granule(a, 2)
    table.set_granule(b, 3)
    table.union(a, b)
    assert table.granule[table.find(a)] == 6 and table.find(a) not in table.blocked
    table.refine(a, [6])  # at a run boundary: both halves keep their runs
    halves = table.children[a]
    assert [table.granule[table.find(h)] for h in halves] == [6, 6] and not table.blocked
    table.refine(halves[0], [4])  # inside a run
    assert "splits a run of 6" in table.blocked[table.find(table.children[halves[0]][0])]
    odd = table.new(10)
    table.set_granule(odd, 4)
    assert "do not fit 10 channels" in table.blocked[table.find(odd)]


def test_the_inspect_listing_says_groups_go_in_whole_runs(planted, tmp_path: Path, capsys) -> None:
    from graphopt.cli import main

    path = tmp_path / "gn.onnx"
    onnx.save(planted("legacy", 17), str(path))
    assert main(["inspect", str(path), "--groups"]) == 0
    assert "48 channels (in whole runs of 4), prunable" in capsys.readouterr().out


def test_a_group_norm_whose_inside_is_a_graph_output_keeps_it(planted) -> None:
    """The tensors between the reshapes (per-group, not per-channel) carry no channel state: where one is also
    a graph output, the pattern is not taken and the output keeps its shape."""
    model = onnx.ModelProto()
    model.CopyFrom(planted("legacy", 17))
    norm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    model.graph.output.append(helper.make_tensor_value_info(norm.output[0], onnx.TensorProto.FLOAT, None))
    result = graphopt.optimize(model, method="magnitude", target_macs=0.5, calib=_calibration(8, 3))
    feeds = _calibration(3, 2)
    from tests.conftest import run_ort

    before, after = run_ort(model, feeds), run_ort(result.model, feeds)
    assert after[norm.output[0]].shape == before[norm.output[0]].shape
    assert result.report["macs_ratio"] < 1.0  # the other GroupNorms' groups still go

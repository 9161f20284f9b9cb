"""Grouped convolutions (groups g > 1, not depthwise): every group keeps the same channel count.

The channel unit of a grouped Conv's input is one channel of every group (the weight's axis 1 is shared by
the groups), and its output is one atom of C_out/g channels repeated g times. Checked here: the groups the
analysis forms, valid and interface-preserving results for magnitude, random and snp, exact removal of a
planted zero unit (magnitude) and of a planted duplicate output unit (snp, reconstructed into the next Conv),
and SNP's reconstruction into the grouped Conv itself, one fit per group.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.inspect import channel_groups
from tests.conftest import init, run_ort, tiny, weights

GROUPS = 2
DATA = {"x": np.random.default_rng(0).standard_normal((32, 4, 8, 8)).astype(np.float32)}


def chain(wa: np.ndarray | None = None, ba: np.ndarray | None = None, wg: np.ndarray | None = None,
          bg: np.ndarray | None = None) -> onnx.ModelProto:
    """x -> Conv a (4 -> 8) -> Relu -> Conv g (8 -> 8, 3x3, 2 groups) -> Relu -> Conv c (8 -> 4) -> y."""
    values = {"wa": weights(8, 4, 1, 1) if wa is None else wa, "ba": weights(8, seed=1) if ba is None else ba,
              "wg": weights(8, 4, 3, 3, seed=2) if wg is None else wg, "bg": weights(8, seed=3) if bg is None else bg,
              "wc": weights(4, 8, 1, 1, seed=4)}
    return tiny("[a] a = Conv (x, wa, ba)\nr = Relu (a)\n"
                f"[g] g = Conv <group = {GROUPS}, pads = [1, 1, 1, 1]> (r, wg, bg)\ns = Relu (g)\n[c] y = Conv (s, wc)",
                inputs="float[N, 4, 8, 8] x", outputs="float[N, 4, 8, 8] y",
                inits=", ".join(init(name, value) for name, value in values.items()))


def dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def pruned(original: onnx.ModelProto, method: str, target: float,
           data: dict[str, np.ndarray]) -> tuple[graphopt.OptimizeResult, dict[str, list[int]]]:
    """`method` at `target` with exact counts; the result passes onnx's full check; its initializers' dims."""
    result = graphopt.optimize(original, method=method, calib=data, target_macs=target, round_to=1)
    onnx.checker.check_model(result.model, full_check=True)
    return result, dims(result.model)


def test_the_input_unit_is_one_channel_of_every_group_and_the_output_repeats_per_group() -> None:
    groups = [g for g in channel_groups(chain(), {"x": (1, 4, 8, 8)}) if g["prunable"]]
    # a: 8 channels as 4 units (one channel of each group); g: 4 outputs per group, the same 4 in both groups
    assert sorted((g["size"], tuple(g["members"])) for g in groups) == [
        (4, ("a:param", "a:producer", "g:grouped")), (4, ("c:consumer", "g:param", "g:producer"))]


@pytest.mark.parametrize("method", ["magnitude", "random", "snp"])
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_each_method_keeps_the_groups_equal_and_the_model_valid(method: str, target: float) -> None:
    result, shapes = pruned(chain(), method, target, DATA)
    assert shapes["wg"][1] * GROUPS == shapes["wa"][0] and shapes["wg"][0] % GROUPS == 0
    assert shapes["wc"][1] == shapes["wg"][0] and shapes["ba"] == [shapes["wa"][0]]
    assert result.report["macs_ratio"] <= target * 1.02 and result.report["macs_ratio"] < 1.0
    assert run_ort(result.model, {"x": DATA["x"][:3]})["y"].shape == (3, 4, 8, 8)


def test_a_planted_zero_unit_goes_first_and_the_outputs_stay_exact() -> None:
    """Channels 1 and 5 of Conv a (unit 1: channel 1 of each group) are zero after the Relu: magnitude removes that
    unit first, and removing it changes nothing."""
    wa, ba = weights(8, 4, 1, 1), np.abs(weights(8, seed=1))
    wa[[1, 5]], ba[[1, 5]] = 0.0, 0.0
    original = chain(wa=wa, ba=ba)
    result = graphopt.optimize(original, method="magnitude", target_macs=0.8, round_to=1)  # one unit of a: 0.773
    assert dims(result.model)["wa"][0] == 6 and dims(result.model)["wg"] == [8, 3, 3, 3]
    feed = {"x": DATA["x"][:4]}
    np.testing.assert_allclose(run_ort(result.model, feed)["y"], run_ort(original, feed)["y"], rtol=1e-5, atol=1e-5)


def test_snp_removes_a_duplicated_output_unit_exactly() -> None:
    """Output unit 3 of the grouped Conv copies unit 0 in both groups: SNP removes one of them and folds it into
    Conv c, so the outputs do not change."""
    wg, bg = weights(8, 4, 3, 3, seed=2), weights(8, seed=3)
    for group in range(GROUPS):
        wg[group * 4 + 3], bg[group * 4 + 3] = wg[group * 4], bg[group * 4]
    original = chain(wg=wg, bg=bg)
    result = graphopt.optimize(original, method="snp", calib=DATA, target_macs=0.8, round_to=1)
    assert dims(result.model)["wg"][0] == 6 and dims(result.model)["wc"] == [4, 6, 1, 1]
    feed = {"x": DATA["x"][:4]}
    expected = run_ort(original, feed)["y"]
    error = np.linalg.norm(run_ort(result.model, feed)["y"] - expected) / np.linalg.norm(expected)
    assert error < 1e-4


def test_a_channel_shuffle_before_the_grouped_conv_couples_whole_units_and_stays_exact() -> None:
    """Reshape [2, 4] -> Transpose -> Reshape (ShuffleNet's shuffle) before the grouped Conv: channel 2k + i of
    the shuffled tensor is channel 4i + k of Conv a, so Conv a's units are {0, 2, 4, 6} and {1, 3, 5, 7}. The
    zero unit goes first and the outputs do not change."""
    wa, ba = weights(8, 4, 1, 1), np.abs(weights(8, seed=1))
    wa[[1, 3, 5, 7]], ba[[1, 3, 5, 7]] = 0.0, 0.0
    values = {"wa": wa, "ba": ba, "wg": weights(8, 4, 3, 3, seed=2), "bg": weights(8, seed=3),
              "wc": weights(4, 8, 1, 1, seed=4), "split": np.array([0, 2, 4, 8, 8]), "merge": np.array([0, 8, 8, 8])}
    model = tiny("[a] a = Conv (x, wa, ba)\nr = Relu (a)\n[s1] p = Reshape (r, split)\n"
                 "[t] q = Transpose <perm = [0, 2, 1, 3, 4]> (p)\n[s2] u = Reshape (q, merge)\n"
                 f"[g] g = Conv <group = {GROUPS}, pads = [1, 1, 1, 1]> (u, wg, bg)\ns = Relu (g)\n[c] y = Conv (s, wc)",
                 inputs="float[N, 4, 8, 8] x", outputs="float[N, 4, 8, 8] y",
                 inits=", ".join(init(name, value, "int64" if name in ("split", "merge") else "float")
                                 for name, value in values.items()))
    result = graphopt.optimize(model, method="magnitude", target_macs=0.6, round_to=1)  # one unit of a: 0.545
    assert dims(result.model)["wa"][0] == 4 and dims(result.model)["wg"] == [8, 2, 3, 3]
    onnx.checker.check_model(result.model, full_check=True)
    feed = {"x": DATA["x"][:4]}
    np.testing.assert_allclose(run_ort(result.model, feed)["y"], run_ort(model, feed)["y"], rtol=1e-5, atol=1e-5)


def _scaled_copies() -> onnx.ModelProto:
    """Conv a's channel 3 is 0.05 x channel 0 (group 0) and channel 7 is 0.05 x channel 5 (group 1): unit 3
    (channel 3 of each group) is a multiple of a different unit in each group, and carries the least variance."""
    wa, ba = weights(8, 4, 1, 1), weights(8, seed=1)
    for copy, source in ((3, 0), (7, 5)):
        wa[copy], ba[copy] = 0.05 * wa[source], 0.05 * ba[source]
    return chain(wa=wa, ba=ba)


@pytest.mark.parametrize("options", [{}, {"criterion": "variance", "reconstruct_target": "self"}],
                         ids=["defaults", "one-shot"])
def test_snp_reconstructs_a_group_read_by_a_grouped_conv_group_by_group(options) -> None:
    """Each group of the grouped Conv gets its own fit on its own block of the input: removing unit 3 is exact,
    though no single map of the kept units reproduces it in both groups."""
    original = _scaled_copies()
    feed = {"x": DATA["x"][:4]}
    expected = run_ort(original, feed)["y"]
    errors = {}
    for reconstruct in (True, False):
        result = graphopt.optimize(original, method="snp", calib=DATA, target_macs=0.8, round_to=1,
                                   reconstruct=reconstruct, **(options if reconstruct else {}))
        assert dims(result.model)["wa"][0] == 6 and dims(result.model)["wg"] == [8, 3, 3, 3]
        onnx.checker.check_model(result.model, full_check=True)
        errors[reconstruct] = np.linalg.norm(run_ort(result.model, feed)["y"] - expected) / np.linalg.norm(expected)
    assert errors[True] < 1e-4 < 1e-3 < errors[False]


def test_snp_prunes_the_group_only_a_grouped_conv_reads() -> None:
    result = graphopt.optimize(chain(), method="snp", calib=DATA, target_macs=0.7, round_to=1)
    assert dims(result.model)["wa"][0] < 8 and dims(result.model)["wg"][1] == dims(result.model)["wa"][0] // GROUPS
    assert result.report["passes"][-1]["stats"]["consumers_reconstructed"] >= 1
    onnx.checker.check_model(result.model, full_check=True)

"""Depthwise ConvTranspose (group = C, weight [C, 1, k, k]): channel c in writes channel c out, so its input and
output are one channel group, as through a depthwise Conv. Checked here: the group the analysis forms, valid
and interface-preserving results for magnitude, random and snp with the group attribute following the kept
count, exact removal of a planted zero channel (magnitude) and of a planted duplicate (snp, reconstructed into
the next Conv). A ConvTranspose with other groups still blocks its channels, with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.inspect import channel_groups
from tests.conftest import init, run_ort, tiny, weights
from tests.passes.channels.test_grouped_conv import dims, pruned

DATA = {"x": np.random.default_rng(0).standard_normal((32, 4, 8, 8)).astype(np.float32)}


def chain(wa: np.ndarray | None = None, ba: np.ndarray | None = None, wd: np.ndarray | None = None,
          bd: np.ndarray | None = None, groups: int = 8) -> onnx.ModelProto:
    """x -> Conv a (4 -> 8) -> Relu -> ConvTranspose d (8 -> 8, 2x2, stride 2, `groups`) -> Relu -> Conv c
    (8 -> 4) -> y [N, 4, 16, 16]."""
    values = {"wa": weights(8, 4, 1, 1) if wa is None else wa, "ba": weights(8, seed=1) if ba is None else ba,
              "wd": weights(8, 8 // groups, 2, 2, seed=2) if wd is None else wd,
              "bd": weights(8, seed=3) if bd is None else bd, "wc": weights(4, 8, 1, 1, seed=4)}
    return tiny(f"[a] a = Conv (x, wa, ba)\nr = Relu (a)\n"
                f"[d] d = ConvTranspose <group = {groups}, strides = [2, 2]> (r, wd, bd)\ns = Relu (d)\n"
                "[c] y = Conv (s, wc)",
                inputs="float[N, 4, 8, 8] x", outputs="float[N, 4, 16, 16] y",
                inits=", ".join(init(name, value) for name, value in values.items()))


def group_of(model: onnx.ModelProto) -> int:
    node = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    return next(a.i for a in node.attribute if a.name == "group")


def test_input_and_output_of_a_depthwise_conv_transpose_are_one_group() -> None:
    groups = [g for g in channel_groups(chain(), {"x": (1, 4, 8, 8)}) if g["prunable"]]
    assert [(g["size"], tuple(g["members"])) for g in groups] == [
        (8, ("a:param", "a:producer", "c:consumer", "d:group", "d:param"))]


def test_other_groups_still_block_with_the_reason() -> None:
    found = channel_groups(chain(groups=2), {"x": (1, 4, 8, 8)})
    assert not any(g["prunable"] for g in found if "a:producer" in g["members"])
    assert any("other than depthwise" in (g.get("reason") or "") for g in found)


@pytest.mark.parametrize("method", ["magnitude", "random", "snp"])
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_each_method_keeps_the_group_attribute_equal_to_the_kept_channels(method: str, target: float) -> None:
    result, shapes = pruned(chain(), method, target, DATA)
    kept = shapes["wa"][0]
    assert kept < 8 and shapes["wd"] == [kept, 1, 2, 2] and shapes["bd"] == [kept] and group_of(result.model) == kept
    assert shapes["wc"] == [4, kept, 1, 1]
    assert result.report["macs_ratio"] <= target * 1.02
    assert run_ort(result.model, {"x": DATA["x"][:3]})["y"].shape == (3, 4, 16, 16)


def test_a_planted_zero_channel_goes_first_and_the_outputs_stay_exact() -> None:
    wa, ba, bd = weights(8, 4, 1, 1), np.abs(weights(8, seed=1)), weights(8, seed=3)
    wa[5], ba[5], bd[5] = 0.0, 0.0, 0.0
    original = chain(wa=wa, ba=ba, bd=bd)
    result = graphopt.optimize(original, method="magnitude", target_macs=0.9, round_to=1)
    assert dims(result.model)["wa"][0] == 7 and group_of(result.model) == 7
    feed = {"x": DATA["x"][:4]}
    np.testing.assert_allclose(run_ort(result.model, feed)["y"], run_ort(original, feed)["y"], rtol=1e-5, atol=1e-5)


def test_snp_removes_a_duplicated_channel_exactly() -> None:
    """Channel 6 repeats channel 2 through Conv a and the ConvTranspose: SNP removes one of them and folds it into
    Conv c, so the outputs do not change."""
    wa, ba = weights(8, 4, 1, 1), weights(8, seed=1)
    wd, bd = weights(8, 1, 2, 2, seed=2), weights(8, seed=3)
    wa[6], ba[6], wd[6], bd[6] = wa[2], ba[2], wd[2], bd[2]
    original = chain(wa=wa, ba=ba, wd=wd, bd=bd)
    result = graphopt.optimize(original, method="snp", calib=DATA, target_macs=0.9, round_to=1)
    assert dims(result.model)["wa"][0] == 7 and dims(result.model)["wc"] == [4, 7, 1, 1]
    feed = {"x": DATA["x"][:4]}
    want = run_ort(original, feed)["y"]
    got = run_ort(result.model, feed)["y"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4

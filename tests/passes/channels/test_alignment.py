"""--round-to: the multiple each group's kept channel count is rounded to (auto: the provider's block)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.analysis.state import Group
from graphopt.errors import OptionError
from graphopt.passes.channels import alignment
from graphopt.passes.channels.budget import choose_counts, minimum_counts
from graphopt.passes.snp.plan import Ordering, counts, fill
from tests.conftest import init, tiny, weights


def _group(root: int, size: int) -> Group:
    return Group(root=root, size=size, sites=[], blocked=None)


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("AUTO", "auto"), ("1", 1), ("8", 8), (" 16 ", 16)])
def test_round_to_parses_auto_or_a_positive_integer(text: str, value: object) -> None:
    assert alignment.parse_round_to(text) == value


@pytest.mark.parametrize("text", ["0", "-8", "eight", "8.5", ""])
def test_round_to_refuses_anything_else(text: str) -> None:
    with pytest.raises(OptionError, match="--round-to"):
        alignment.parse_round_to(text)


@pytest.mark.parametrize("flags, block", [({"avx512f", "avx2", "fma"}, 16), ({"avx2", "fma"}, 8),
                                          ({"sse4_2"}, 4), ({"asimd", "fp"}, 4)])
def test_cpu_block_follows_the_instruction_set(monkeypatch: pytest.MonkeyPatch, flags: set[str], block: int) -> None:
    monkeypatch.setattr(alignment, "_cpu_flags", lambda: flags)
    alignment.cpu_block.cache_clear()
    try:
        assert alignment.cpu_block() == block
        assert alignment.provider_block("cuda") == alignment.CUDA_BLOCK
    finally:
        alignment.cpu_block.cache_clear()


def test_auto_gives_the_block_to_groups_of_one_block_and_four_to_smaller_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alignment, "cpu_block", lambda: 16)
    groups = [_group(0, 512), _group(1, 31), _group(2, 16), _group(3, 15), _group(4, 10), _group(5, 3)]
    assert alignment.group_multiples("auto", groups) == {0: 16, 1: 16, 2: 16, 3: 4, 4: 4, 5: 3}
    assert alignment.group_multiples("auto", groups, device="cuda") == {0: 8, 1: 8, 2: 8, 3: 8, 4: 8, 5: 3}
    assert alignment.group_multiples(8, groups) == {root: 8 for root in range(6)}
    assert alignment.pass_multiples(None, groups, None) == {root: 1 for root in range(6)}


def _linear_mac_model(sizes: dict[int, int]):
    """MACs proportional to the kept channels of each group (a sum of independent layers)."""

    class Linear:
        total = float(sum(sizes.values()))

        def macs(self, kept: dict[int, int]) -> float:
            return float(sum(kept.values()))

        cost = macs

        def ratio(self, kept: dict[int, int]) -> float:
            return self.macs(kept) / self.total

    return Linear()


def test_budget_rounds_each_group_to_its_own_multiple_and_stays_within_the_target() -> None:
    rng = np.random.default_rng(0)
    sizes = {0: 64, 1: 48, 2: 12}
    scores = {root: rng.random(size) for root, size in sizes.items()}
    multiples = {0: 16, 1: 8, 2: 4}
    model = _linear_mac_model(sizes)
    for target in (0.9, 0.7, 0.5, 0.3):
        kept = choose_counts(scores, model, target, multiples)  # type: ignore[arg-type]
        assert model.ratio(kept) <= target + 1e-12
        for root, count in kept.items():
            assert count % multiples[root] == 0 or count == sizes[root], (target, root, count)
        # one more block anywhere would break the budget (the leftover was spent)
        assert all(model.ratio({**kept, root: kept[root] + multiples[root]}) > target
                   for root in kept if kept[root] < sizes[root])
    assert minimum_counts(scores, multiples) == {0: 16, 1: 8, 2: 4}


def test_rounded_groups_give_up_the_block_with_the_least_importance_in_all() -> None:
    """Blocks go in order of their channels' mean score, not of their best channel: group 0's lowest block
    (0.1, 0.9) takes less than group 1's (0.6, 0.7) although its best channel is the higher one."""
    scores = {0: np.array([0.1, 0.9, 1.5, 1.5]), 1: np.array([0.6, 0.7, 1.35, 1.35])}  # both of mean 1
    model = _linear_mac_model({0: 4, 1: 4})
    assert choose_counts(scores, model, 0.75, 2) == {0: 2, 1: 4}  # type: ignore[arg-type]
    assert choose_counts(scores, model, 0.75, 1) == {0: 3, 1: 3}  # type: ignore[arg-type]  # exact: 0.1 and 0.6


def test_snp_plan_rounds_each_group_to_its_own_multiple() -> None:
    sizes = {0: 64, 1: 24}
    orderings = {root: Ordering(np.arange(size), np.full(size, 1.0 / size)) for root, size in sizes.items()}
    multiples = {0: 16, 1: 4}
    assert counts(orderings, 0.5, multiples) == {0: 32, 1: 12}
    assert counts(orderings, 0.51, multiples) == {0: 48, 1: 16}
    model = _linear_mac_model(sizes)
    filled = fill({0: 16, 1: 4}, orderings, model, 0.6, multiples)  # type: ignore[arg-type]
    assert all(filled[root] % multiples[root] == 0 for root in filled)
    assert model.ratio(filled) <= 0.6 and model.ratio({**filled, 1: filled[1] + 4}) > 0.6


def _two_convs() -> onnx.ModelProto:
    inits = ", ".join([init("w1", weights(64, 8, 3, 3, seed=1)), init("b1", weights(64, seed=2)),
                       init("w2", weights(48, 64, 3, 3, seed=3)), init("b2", weights(48, seed=4)),
                       init("w3", weights(4, 48, 1, 1, seed=5))])
    body = """
        h1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (h1)
        h2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
        r2 = Relu (h2)
        y = Conv (r2, w3)
    """
    return tiny(body, inputs="float[N, 8, 8, 8] x", inits=inits)


@pytest.mark.parametrize("method", ["magnitude", "random", "snp"])
def test_auto_rounding_keeps_every_group_on_a_multiple_and_reaches_the_target(monkeypatch: pytest.MonkeyPatch,
                                                                               method: str) -> None:
    """Two groups (64 and 48 channels) on 16-channel blocks miss 0.6 of the MACs by more than 2%: auto relaxes
    to the coarsest multiple that reaches it (the report says which), a forced 16 is kept as given."""
    monkeypatch.setattr(alignment, "cpu_block", lambda: 16)
    model = _two_convs()
    calib = {"x": np.random.default_rng(0).standard_normal((64, 8, 8, 8)).astype(np.float32)}
    for rounding in ("auto", 16):
        result = graphopt.optimize(model, method=method, target_macs=0.6, round_to=rounding,
                                   calib=calib if method == "snp" else None)
        stored = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
        produced = sorted(stored[n.input[1]].shape[0] for n in result.model.graph.node if n.op_type == "Conv")
        stats = result.report["passes"][-1]["stats"]
        assert produced[0] == 4  # the graph output's producer is not pruned
        assert all(width % stats["channel_multiple_max"] == 0 for width in produced[1:]), produced
        assert result.report["options"]["round_to"] == rounding
        assert stats["rounding_relaxed"] is (rounding == "auto")
        if rounding == "auto":
            assert 0.6 * (1 - alignment.TARGET_TOLERANCE) <= result.report["macs_ratio"] <= 0.6
            for coarser in (16, 8, 4, 2):  # each coarser multiple, forced, misses the target
                if coarser > stats["channel_multiple_max"]:
                    forced = graphopt.optimize(model, method=method, target_macs=0.6, round_to=coarser,
                                               calib=calib if method == "snp" else None)
                    assert forced.report["macs_ratio"] < 0.6 * (1 - alignment.TARGET_TOLERANCE), coarser
        else:
            assert stats["channel_multiple_max"] == 16 and result.report["macs_ratio"] < 0.6 * 0.95


def test_finer_multiples_cap_each_group_down_to_exact_counts() -> None:
    steps = list(alignment.finer_multiples({1: 16, 2: 4}))
    assert steps == [{1: 16, 2: 4}, {1: 8, 2: 4}, {1: 4, 2: 4}, {1: 2, 2: 2}, {1: 1, 2: 1}]
    assert list(alignment.finer_multiples({1: 1})) == [{1: 1}]


def test_groups_under_two_blocks_relax_to_four_before_every_group_is_capped() -> None:
    """A group whose only cut is to one block is the first to leave it when the target is missed."""
    steps = list(alignment.finer_multiples({1: 16, 2: 16, 3: 3}, sizes={1: 512, 2: 24, 3: 3}))
    assert steps[:4] == [{1: 16, 2: 16, 3: 3}, {1: 16, 2: 4, 3: 3}, {1: 8, 2: 4, 3: 3}, {1: 4, 2: 4, 3: 3}]
    assert steps[-1] == {1: 1, 2: 1, 3: 1}
    assert list(alignment.finer_multiples({1: 16}, sizes={1: 32}))[1] == {1: 8}  # two blocks: no early step
    tried: list[dict[int, int]] = []
    solution, step = alignment.coarsest_meeting("auto", {1: 16, 2: 16}, lambda s: tried.append(s) or s[2],
                                                lambda s: {16: 0.8, 4: 0.7}.get(s, 0.6), 0.7, sizes={1: 512, 2: 24})
    assert step == {1: 16, 2: 4} and len(tried) == 2


def test_auto_rounding_relaxes_only_as_far_as_the_target_needs() -> None:
    """A fake budget whose reachable ratio is the multiple's fraction of a step: coarse steps undershoot."""
    reached = {16: 0.5, 8: 0.6, 4: 0.69, 2: 0.7, 1: 0.7}
    tried: list[int] = []

    def solve(step: dict[int, int]) -> int:
        tried.append(step[1])
        return step[1]

    solution, step = alignment.coarsest_meeting("auto", {1: 16}, solve, lambda s: reached[s], 0.7)
    assert solution == 4 and step == {1: 4} and tried == [16, 8, 4]  # 0.69 is within 2% of 0.7
    tried.clear()
    solution, step = alignment.coarsest_meeting(16, {1: 16}, solve, lambda s: reached[s], 0.7)
    assert solution == 16 and tried == [16]  # a forced multiple is kept as given
    tried.clear()
    solution, _ = alignment.coarsest_meeting("auto", {1: 16}, solve, lambda s: {16: 0.3, 8: 0.5}.get(s, 0.4), 0.9)
    assert solution == 8 and tried == [16, 8, 4, 2, 1]  # none reaches: the closest



def test_optimize_says_when_auto_rounding_left_the_blocks(tmp_path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed digits sample reaches 0.7 of its MACs only off 16-channel blocks: the summary says so."""
    from pathlib import Path

    from graphopt import cli

    monkeypatch.setattr(alignment, "cpu_block", lambda: 16)
    samples = Path(__file__).resolve().parents[3] / "samples"
    argv = ["optimize", str(samples / "digits_cnn.onnx"), "-o", str(tmp_path / "out.onnx"), "--method", "snp",
            "--target-macs", "0.7", "--calib", str(samples / "digits_calib.npz")]
    assert cli.main([*argv, "--round-to", "auto"]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: to reach the target")]
    assert len(note) == 1 and "multiples of 2 instead of the execution provider's blocks" in note[0]
    assert cli.main([*argv[:3], str(tmp_path / "exact.onnx"), *argv[4:], "--round-to", "1"]) == 0
    assert "note: to reach the target" not in capsys.readouterr().out

"""`--target-latency` prices attention heads by a probe of their own (graphopt.passes.heads.latency): the unpruned
model timed with every head block cut to half its units. Every timing here is faked; the copies the probes time
are real, and each is run in onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest

import graphopt
from graphopt.calibration.session import make_session
from graphopt.evaluate import random_feed
from graphopt.ir.shapes import resolve_input_shapes
from tests.passes.heads.test_grouped_attention import TOKENS, _data, _model, _weights

WHOLE_MS, CHANNELS_MS = 10.0, 8.0  # the original's time, and the channel probe's (groups at half width)


def _widths(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The FFN weights' shapes."""
    return {init.name: tuple(init.dims) for init in model.graph.initializer if init.name[:2] in ("w1", "w2")}


def _attention_heads(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(num_heads, kv_num_heads) of every GroupQueryAttention."""
    found = [{a.name: a.i for a in node.attribute} for node in model.graph.node
             if node.op_type == "GroupQueryAttention"]
    return [(attrs["num_heads"], attrs["kv_num_heads"]) for attrs in found]


def _fake_timings(monkeypatch: pytest.MonkeyPatch, heads_ms: float, heads_p10: float | None = None,
                  joint_ms: float | None = None) -> list[onnx.ModelProto]:
    """Layer tables, the whole model and the written result timed by formula; each probe's copy run once in
    onnxruntime, the first (the channel groups' probe) timed at `CHANNELS_MS`, the next (the heads') at
    `heads_ms` with per-round p10 `heads_p10`, the last (both) at `joint_ms`, by default where the two
    savings add. Returns the copies the probes timed."""
    joint_ms = CHANNELS_MS + heads_ms - WHOLE_MS if joint_ms is None else joint_ms
    from graphopt import latency_target
    from graphopt.calibration import latency as tables
    from graphopt.passes.channels import latency

    timed: list[onnx.ModelProto] = []

    def paired(reference, candidate, shapes, where):
        make_session(candidate).run(None, random_feed(candidate, shapes))
        timed.append(candidate)
        ms = (CHANNELS_MS, heads_ms, joint_ms)[len(timed) - 1]
        p10 = heads_p10 if heads_p10 is not None and len(timed) == 2 else WHOLE_MS / ms
        return {"speedup": WHOLE_MS / ms, "speedup_p10": p10, "speedup_p90": WHOLE_MS / ms}

    def written(original, optimized, batch, **_):
        return {"speedup": 1 / 0.7, "speedup_p10": 1.4, "speedup_p90": 1.5, "batch": batch, "reference_ms": 1.0,
                "candidate_ms": 0.7}

    monkeypatch.setattr(tables, "layer_timer", lambda where: lambda spec, cin, cout: 1e-4 * cin * cout)
    monkeypatch.setattr(latency, "model_latency", lambda model, shapes, where: WHOLE_MS)
    monkeypatch.setattr(latency, "paired_latency", paired)
    monkeypatch.setattr(latency_target, "compare_latency", written)
    return timed


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def _snp_stats(model: onnx.ModelProto, calib: Any, **options: Any) -> dict[str, Any]:
    result = graphopt.optimize(model, method="snp", calib=calib, target_latency=0.7, bench_batch=2, threads=1,
                               round_to=1, **options)
    return next(entry["stats"] for entry in result.report["passes"] if entry["pass"] == "snp")


def test_heads_are_priced_by_the_time_the_model_saves_with_half_of_them(cache_home: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two blocks of three key/value heads (two query heads each): the probe's copy keeps two units of each, runs,
    and the price of a head MAC follows the time it saved: 1 ms saved against 4 ms is a quarter of the price."""
    model, calib = _model(_weights(2, kv_heads=3)), _data(96, TOKENS, seed=3)
    found = {}
    for heads_ms in (9.0, 6.0):
        timed = _fake_timings(monkeypatch, heads_ms)
        found[heads_ms] = _snp_stats(model, calib)
        # the channel groups at half width, the heads at half, then both (the FFN cut as in the first)
        assert [_attention_heads(copy) for copy in timed] == [[(6, 3), (6, 3)], [(4, 2), (4, 2)], [(4, 2), (4, 2)]]
        assert _widths(timed[2]) == _widths(timed[0]) != _widths(timed[1]) == _widths(model)
        assert found[heads_ms]["latency_heads_probe_ms"] == pytest.approx(heads_ms)
        assert found[heads_ms]["latency_joint_additive_ms"] == pytest.approx(CHANNELS_MS + heads_ms - WHOLE_MS)
    cheap, dear = found[9.0]["latency_head_cost_scale"], found[6.0]["latency_head_cost_scale"]
    assert cheap == pytest.approx(dear / 4.0)
    # every plan is predicted faster when heads save more, so the budget keeps at least as much for 0.7
    assert all(stats["predicted_latency_ratio"] <= 0.7 + 1e-9 for stats in found.values())
    assert found[6.0]["retained_variance_cut"] >= found[9.0]["retained_variance_cut"]
    assert found[6.0]["estimated_macs_ratio"] >= found[9.0]["estimated_macs_ratio"]


def test_cuts_whose_savings_overlap_are_predicted_slower_and_the_budget_keeps_less(
        cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both probes together 1 ms slower than their savings add (7 and 8 of 10 ms alone, 6 together): every plan
    that cuts both is predicted slower, so the same latency target keeps less."""
    model, calib = _model(_weights(2, kv_heads=3)), _data(96, TOKENS, seed=3)
    found = {}
    for joint_ms in (5.0, 6.0):
        _fake_timings(monkeypatch, 7.0, joint_ms=joint_ms)
        found[joint_ms] = _snp_stats(model, calib)
        assert found[joint_ms]["latency_joint_probe_ms"] == pytest.approx(joint_ms)
    assert all(stats["predicted_latency_ratio"] <= 0.7 + 1e-9 for stats in found.values())
    assert found[6.0]["retained_variance_cut"] < found[5.0]["retained_variance_cut"]


def test_the_joint_prediction_passes_through_all_four_timings() -> None:
    """WithJoint is bilinear in the channel and head savings: exact at the original, at each probe and at both."""
    from graphopt.passes.heads.latency import WithJoint
    from graphopt.passes.heads.plan import WithHeads
    from tests.passes.channels.test_latency_budget import _fake_model

    base = _fake_model()  # 20 ms; groups 0 and 1 of 32 channels
    probe = {0: 16, 1: 16}
    channel_saving = base.total - base.cost(probe)
    heads = WithHeads(base, {-1: 1.5}, {-1: 4})  # a block of 4 heads, 1.5 ms each
    joint = WithJoint(heads, channel_saving, head_saving=3.0, interaction=0.8)  # the probe: 2 of 4 heads
    full = {0: 32, 1: 32, -1: 4}
    assert joint.cost(full) == pytest.approx(20.0)
    assert joint.cost({**full, **probe}) == pytest.approx(base.cost(probe))
    assert joint.cost({**full, -1: 2}) == pytest.approx(17.0)
    assert joint.cost({**probe, -1: 2}) == pytest.approx(20.0 - channel_saving - 3.0 + 0.8)
    # halfway to both probes, a quarter of the interaction
    half = {0: 24, 1: 24}
    x = (20.0 - base.cost(half)) / channel_saving
    assert joint.cost({**half, -1: 3}) == pytest.approx(base.cost(half) - 1.5 + 0.8 * x * 0.5)


def test_a_head_probe_within_noise_leaves_heads_at_the_mean_time_per_mac(cache_home: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = _model(_weights(2, kv_heads=3)), _data(96, TOKENS, seed=3)
    _fake_timings(monkeypatch, 6.0, heads_p10=0.97)
    stats = _snp_stats(model, calib)
    assert not {"latency_heads_probe_ms", "latency_head_cost_scale", "latency_joint_probe_ms"} & set(stats)
    assert stats["latency_probe_ms"] == pytest.approx(CHANNELS_MS)  # the channel probe stands


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["transformer", "post_norm_transformer", "sectioned_transformer",
                                  "grouped_query_decoder"])
def test_the_head_probe_cuts_every_zoo_attention(name: str, exporter: str, cache_home: Path,
                                                 monkeypatch: pytest.MonkeyPatch, zoo_path) -> None:
    """On the torch zoo's attention from both exporters the head probe's copy is built, runs in onnxruntime, and
    prices the heads."""
    model = onnx.load(str(zoo_path(name, exporter, 17, False)))
    shapes = resolve_input_shapes(model)
    calib = random_feed(model, shapes, batch=64)
    timed = _fake_timings(monkeypatch, 7.0)
    stats = _snp_stats(model, calib)
    assert stats["latency_heads_probe_ms"] == pytest.approx(7.0) and stats["latency_head_cost_scale"] > 0
    assert len(timed) == 3 and "latency_joint_probe_ms" in stats and stats["head_blocks"] >= 1


def test_the_head_probe_cuts_a_fused_attention(cache_home: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """onnxruntime's fused com.microsoft Attention (packed QKV, `num_heads`): the probes' copies run, the heads'
    copy has half the heads of each layer, and the joint copy also the channel probe's FFN."""
    from tests.passes.heads.test_heads import HEADS, LAYERS, _build, _fused
    from tests.passes.heads.test_heads import _data as _token_data

    model = _fused(_build(), tmp_path)
    timed = _fake_timings(monkeypatch, 7.0)
    stats = _snp_stats(model, _token_data(128, 8, seed=4))

    def heads(copy: onnx.ModelProto) -> list[int]:
        return [a.i for node in copy.graph.node if node.op_type == "Attention" for a in node.attribute
                if a.name == "num_heads"]

    assert [heads(copy) for copy in timed] == [[HEADS] * LAYERS, [HEADS - HEADS // 2] * LAYERS,
                                               [HEADS - HEADS // 2] * LAYERS]
    assert stats["latency_heads_probe_ms"] == pytest.approx(7.0) and "latency_joint_probe_ms" in stats

"""What attention heads cost in time, for `--target-latency` (graphopt.passes.channels.latency).

A head's MACs (its columns of the q/k/v projections, its rows of the output projection, its share of the
per-head MatMuls) are not what its time follows: the softmax, the scaling and masking ops and the head
layout (Reshape/Transpose of every q, k, v and context tensor) also work per head, and none of them counts a
MAC. So the unpruned model is timed once more with every head block cut to half its units (a copy cut as
pruning cuts it, without reconstruction: the values do not matter to its time), interleaved against the
original, and the time saved per head MAC removed prices every head of every block: a unit of block b costs
macs_per_head_b x (T - T_heads) / sum_b removed_b x macs_per_head_b milliseconds. Where the probe cannot be
built or is not clearly faster, heads are charged at the model's mean time per MAC.

Where the channel groups were probed too (their copy at half width), the heads are cut on that copy as well
and timed: the four timings (T, channels at half, heads at half, both) fix a bilinear prediction,
    L = C(k) - H(k) + c x y,   x = (T - C(k)) / (T - C(probe)),  y = H(k) / H(probe),
with C the channel model's prediction, H the heads' saving, and c the measured departure of both cuts
together from the sum of each alone (positive where the savings overlap: the same layout ops and memory
traffic saved twice). |c| is at most the smaller saving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.passes.base import PassContext
from graphopt.passes.channels.budget import CostModel
from graphopt.passes.channels.latency import LatencyModel
from graphopt.passes.heads.plan import WithHeads
from graphopt.passes.heads.prune import cut_heads
from graphopt.passes.heads.select import HeadPlan, head_blocks

log = logging.getLogger(__name__)

# the measured price of a head MAC is kept within these multiples of the model's mean time per MAC: a probe
# of a model whose heads are a sliver of its time divides a difference of two noisy timings by little
MIN_SCALE, MAX_SCALE = 0.25, 4.0


@dataclass
class WithJoint:
    """Heads over a latency model, with the measured interaction of channel and head cuts (module docstring)."""

    inner: WithHeads
    channel_saving: float  # ms the channel model predicts saved at its probe
    head_saving: float     # ms the heads' price saves at their probe
    interaction: float     # ms: c

    def __post_init__(self) -> None:
        self.total = self.inner.total

    def cost(self, counts: dict[int, int]) -> float:
        channels = self.inner.base.cost(self.inner.channels(counts))
        saved = self.inner.saved(counts)
        x = (self.total - channels) / self.channel_saving
        return max(channels - saved + self.interaction * x * saved / self.head_saving, 0.0)


def priced_heads(ctx: PassContext, plan: HeadPlan, per_node: dict[str, int], mac_total: float,
                 base: LatencyModel, shapes: dict[str, tuple[int, ...]]) -> tuple[CostModel, dict[str, float]]:
    """`base` with `plan`'s head blocks priced by their probes (module docstring), and the report's entries:
    `latency_heads_probe_ms`, `latency_head_cost_scale` (the price of a head MAC over the model's mean ms per
    MAC), `latency_joint_probe_ms` and `latency_joint_additive_ms` (what the sum of both probes' savings
    predicts for it). Without a usable probe, heads cost the mean time per MAC and nothing is reported."""
    timing = base.timing
    kept = {root: plan.blocks[root].units - plan.blocks[root].units // 2 for root in plan.orderings}
    removed = sum((plan.blocks[root].units - count) * plan.blocks[root].macs_per_head(per_node)
                  for root, count in kept.items())
    if timing is None or removed <= 0 or mac_total <= 0 or timing.ms <= 0:
        return plan.cost_model(base, per_node, mac_total), {}
    probe_ms = timing.probe(lambda: _cut_copy(timing.model, ctx, plan, kept, shapes), "the heads at half")
    if probe_ms is None:
        log.info("heads are charged at the model's mean time per MAC")
        return plan.cost_model(base, per_node, mac_total), {}
    mean = timing.ms / mac_total
    measured = (timing.ms - probe_ms) / removed / mean
    scale = min(max(measured, MIN_SCALE), MAX_SCALE)
    log.info("latency probe: %.3f ms with the heads at half (%.3f ms whole); a head MAC costs %.2f times the "
             "model's mean (%.2f charged)", probe_ms, timing.ms, measured, scale)
    model = plan.cost_model(base, per_node, mac_total, scale * mean)
    info = {"latency_heads_probe_ms": probe_ms, "latency_head_cost_scale": scale}
    if base.probe is None or not isinstance(model, WithHeads):
        return model, info
    counts, cut_channels = base.probe
    channel_saving, head_saving = timing.ms - base.cost(counts), scale * mean * removed
    if channel_saving <= 0:
        return model, info
    joint_ms = timing.probe(lambda: _cut_copy(cut_channels(timing.model), ctx, plan, kept, shapes),
                            "the groups and heads at half")
    if joint_ms is None:
        return model, info
    additive = timing.ms - channel_saving - head_saving
    bound = min(channel_saving, head_saving)
    interaction = min(max(joint_ms - additive, -bound), bound)
    log.info("latency probe: %.3f ms with both at half, where their savings add to %.3f ms", joint_ms, additive)
    return (WithJoint(model, channel_saving, head_saving, interaction),
            {**info, "latency_joint_probe_ms": joint_ms, "latency_joint_additive_ms": additive})


def _cut_copy(model: onnx.ModelProto, ctx: PassContext, plan: HeadPlan, kept: dict[int, int],
              shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """`model` with block `root` of `plan` cut to its `kept[root]` most important units, found again by name
    in a copy of the graph (no reconstruction)."""
    trial = ir.import_graph(model)
    found = {block.name: block for block, reason in head_blocks(trial, shapes) if reason is None}
    for root, count in kept.items():
        block = found.get(plan.blocks[root].name)
        if block is None or block.units != plan.blocks[root].units:
            raise GraphoptError(f"the heads of {plan.blocks[root].name} were not found again in a copy of the graph")
        cut_heads(trial, block, plan.kept_heads(root, count), {}, shapes, reconstruct=False)
    ir.cleanup(trial)
    return ir.export_model(trial, ctx.template, infer=False)

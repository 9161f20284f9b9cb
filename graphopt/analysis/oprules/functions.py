"""Rules for graphopt's function ops (graphopt.ops): TSRA and weightless RMSNorm.

- RMSNorm (graphopt domain) normalises by the sum of squares over its `axis` (attribute, default 1;
  negative counts from the end) divided by its `channels` attribute, which pruning leaves alone.
  When the tracked channels lie on the normalised axis (axis 1 of NCHW / [N, C], or the last axis of
  token-major [N, T, C]) the channel state passes through unchanged and nothing is coupled: removing
  identically-zero channels is exact (the sum of squares and the divisor are unchanged); removing
  others changes the norm slightly. Channels on any other axis block their group: conservative (such
  a norm acts on each channel separately and could pass them; no model needs it yet).
- TSRA (graphopt domain) splits its `axis` (attribute, default 1, as RMSNorm's) at `split` into U and V.
  With the tracked channels on that axis it cuts their atoms at `split` (like a Split), so each
  subspace is its own group; the output lays U then V end to end on the same axis, as the input did,
  and a "count" site keeps the `split` attribute equal to the number of kept U channels, so U stays
  the first `split` channels after pruning (removing identically-zero channels of either subspace
  leaves s_U, s_V and so every gain unchanged: exact).
A node of either name in another domain, with a Flatten factor, or with channels off its normalised
axis blocks its input.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.registry import equivariant, register
from graphopt.analysis.state import Analysis
from graphopt.ops.functions import DOMAIN


def normalised_axis(node: gs.Node, rank: int | None) -> int | None:
    """The non-negative axis a graphopt.RMSNorm or graphopt.TSRA normalises (attribute `axis`, default
    1), or None if the rank is needed but unknown or the axis is out of range."""
    axis = int(node.attrs.get("axis", 1))
    if axis >= 0:
        return axis if rank is None or axis < rank else None
    return None if rank is None or axis < -rank else axis + rank


def _graphopt_input(node: gs.Node, a: Analysis, axis: int | None) -> ChannelState | None:
    state = a.state(node.inputs[0])
    if state is None:
        return None
    if node.domain != DOMAIN or axis is None or state.axis != axis or state.factor != 1:
        a.block(state, f"{node.name} ({node.op}): not the graphopt op, or channels off its normalised axis")
        return None
    return state


def rms_norm_rule(node: gs.Node, a: Analysis) -> None:
    state = _graphopt_input(node, a, normalised_axis(node, a.rank(node.inputs[0])))
    if state is not None:
        a.set_state(node.outputs[0], state)


def tsra_rule(node: gs.Node, a: Analysis) -> None:
    state = _graphopt_input(node, a, normalised_axis(node, a.rank(node.inputs[0])))
    if state is None:
        return
    split, total = int(node.attrs.get("split", 0)), a.size(state)
    if not 0 < split < total:
        a.block(state, f"{node.name} (TSRA): split {split} outside (0, {total})")
        return
    first = a.atoms.slice(state.atoms, 0, split)
    second = a.atoms.slice(state.atoms, split, total)
    a.site("count", node, ChannelState(state.axis, first), role="split")
    a.set_state(node.outputs[0], ChannelState(state.axis, first + second))


def norm_rotation(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
    """graphopt.RMSNorm (any Q) and graphopt.TSRA (Q block-diagonal over its split) commute with
    rotations of the axis they normalise, and with no rotation of another."""
    normalised = normalised_axis(node, None if tensor.shape is None else len(tensor.shape))
    if normalised is None:
        return f"{node.op} axis {node.attrs.get('axis', 1)} with unknown or smaller rank"
    if normalised != axis:
        return f"{node.op} over axis {normalised}, not the chain's channel axis {axis}: not equivariant"
    return axis


register("RMSNorm", domain=DOMAIN, channels=rms_norm_rule, rotation=equivariant(norm_rotation))
register("TSRA", domain=DOMAIN, channels=tsra_rule, rotation=equivariant(norm_rotation))

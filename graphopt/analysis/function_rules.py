"""Channel rules for graphopt's function ops (graphopt.ops): TSRA and weightless RMSNorm.

- RMSNorm (graphopt domain) normalises by the sum of squares over axis 1 divided by its `channels`
  attribute, which pruning leaves alone: the channel state passes through unchanged and nothing is
  coupled (removing identically-zero channels is exact; removing others changes the norm slightly).
- TSRA cuts its input atoms at `split` into U and V (like a Split), so each subspace is its own group;
  the output lays U then V end to end, as the input did, and a "count" site keeps the `split`
  attribute equal to the number of kept U channels.
A node of either name in another domain, or with channels off axis 1, blocks its input.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.analysis.channels import ChannelState
from graphopt.analysis.groups import Analysis
from graphopt.ops.functions import DOMAIN


def _graphopt_input(node: gs.Node, a: Analysis) -> ChannelState | None:
    state = a.state(node.inputs[0])
    if state is None:
        return None
    if node.domain != DOMAIN or state.axis != 1 or state.factor != 1:
        a.block(state, f"{node.name} ({node.op}): not the graphopt op, or channels off axis 1")
        return None
    return state


def rms_norm_rule(node: gs.Node, a: Analysis) -> None:
    state = _graphopt_input(node, a)
    if state is not None:
        a.set_state(node.outputs[0], state)


def tsra_rule(node: gs.Node, a: Analysis) -> None:
    state = _graphopt_input(node, a)
    if state is None:
        return
    split, total = int(node.attrs.get("split", 0)), a.size(state)
    if not 0 < split < total:
        a.block(state, f"{node.name} (TSRA): split {split} outside (0, {total})")
        return
    first = a.atoms.slice(state.atoms, 0, split)
    second = a.atoms.slice(state.atoms, split, total)
    a.site("count", node, ChannelState(1, first), role="split")
    a.set_state(node.outputs[0], ChannelState(1, first + second))

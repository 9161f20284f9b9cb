"""Rules for graphopt's own functions (domain `graphopt`), as their standard-op bodies compute them.

graphopt.RMSNorm (graphopt.ops.rms_norm): y = x / sqrt(Σ_axis x² / channels + eps), the divisor the
`channels` attribute, not the run-time size of the axis (axis 1 by default).
graphopt.TSRA (graphopt.ops.tsra): with U the first `split` channels on the axis and V the rest,
r = |U| / (sqrt(|U|² + |V|²) + eps), y = [σ(α_u (r − β_u)) U, σ(α_v (r − β_v)) V].
Both are differentiable, so `--repair` trains through networks that change-of-basis pruning rewrote.
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.ops.functions import DOMAIN
from graphopt.ops.rms_norm import DEFAULT_AXIS as RMS_AXIS
from graphopt.ops.tsra import DEFAULT_AXIS as TSRA_AXIS, DEFAULTS
from graphopt.torch.interpreter.registry import Call, rule


@rule("RMSNorm", domain=DOMAIN)
def rms_norm(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axis = int(call.attr("axis", RMS_AXIS))
    channels, eps = float(call.attr("channels")), float(call.attr("eps"))
    return x / torch.sqrt((x * x).sum(dim=axis, keepdim=True) / channels + eps)


@rule("TSRA", domain=DOMAIN)
def tsra(call: Call, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axis = int(call.attr("axis", TSRA_AXIS))
    split = int(call.attr("split"))
    p = {key: float(call.attr(key, default)) for key, default in DEFAULTS.items()}
    u, v = x.narrow(axis, 0, split), x.narrow(axis, split, x.shape[axis] - split)
    su2, sv2 = (u * u).sum(dim=axis, keepdim=True), (v * v).sum(dim=axis, keepdim=True)
    r = torch.sqrt(su2) / (torch.sqrt(su2 + sv2) + p["eps"])
    gate_u = torch.sigmoid(p["alpha_u"] * (r - p["beta_u"]))
    gate_v = torch.sigmoid(p["alpha_v"] * (r - p["beta_v"]))
    return torch.cat([gate_u * u, gate_v * v], dim=axis)

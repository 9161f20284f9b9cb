"""Torch modules for TSRA networks: `TSRA` and weightless `RMSNorm`, over axis 1 by default (channels
of NCHW / [N, C]) or `dim=-1` (the last axis of token-major [N, T, C] activations).

Both are written in plain tensor ops, so either torch exporter writes them as standard ONNX ops;
`graphopt --method cob` recognises those decomposed forms (graphopt.passes.channels.function_patterns) and turns
them into the model-local functions graphopt.TSRA and graphopt.RMSNorm (graphopt.ops). The formulas
are those of graphopt.ops.tsra and graphopt.ops.rms_norm.
"""

from __future__ import annotations

import torch
from torch import nn


class TSRA(nn.Module):
    """Two-subspace radial activation on axis `dim` (1 by default; -1 for token-major [N, T, C]):
    U = the first `split` channels along `dim`, V = the rest."""

    def __init__(self, split: int, alpha_u: float = 5.0, alpha_v: float = 5.0, beta_u: float = 0.5,
                 beta_v: float = 0.7, eps: float = 1e-6, dim: int = 1) -> None:
        super().__init__()
        self.split, self.eps, self.dim = int(split), float(eps), int(dim)
        self.alpha_u, self.alpha_v, self.beta_u, self.beta_v = float(alpha_u), float(alpha_v), float(beta_u), float(beta_v)

    def _part(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """x[..., part, ...] on `dim` as a static slice (exporters write one Slice; no Shape ops)."""
        if self.dim >= 0:
            return x[(slice(None),) * self.dim + (part,)]
        return x[(Ellipsis, part) + (slice(None),) * (-self.dim - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._part(x, slice(None, self.split)), self._part(x, slice(self.split, None))
        su2 = (u * u).sum(dim=self.dim, keepdim=True)
        sv2 = (v * v).sum(dim=self.dim, keepdim=True)
        r = torch.sqrt(su2) / (torch.sqrt(su2 + sv2) + self.eps)
        gate_u = torch.sigmoid(self.alpha_u * (r - self.beta_u))
        gate_v = torch.sigmoid(self.alpha_v * (r - self.beta_v))
        return torch.cat([gate_u * u, gate_v * v], dim=self.dim)

    def extra_repr(self) -> str:
        return f"split={self.split}, dim={self.dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean_c x² + eps) over axis `dim` (1: channels of NCHW / [N, C]; -1: the last axis of
    token-major [N, T, C]), without learned weights."""

    def __init__(self, eps: float = 1e-6, dim: int = 1) -> None:
        super().__init__()
        self.eps, self.dim = float(eps), int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=self.dim, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"

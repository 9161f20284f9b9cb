"""Small torch modules with unfused BatchNormalization, exported by the `torch_export` fixture.

BatchNorm statistics and affine parameters are randomised, so a missing or wrong fold changes the
output. Each builder seeds its own generator and returns the module in eval mode with an example.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _randomize(model: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
    return model.eval()


class ConvStack(nn.Module):
    """Conv -> BN -> ReLU, grouped Conv (bias) -> BN, grouped ConvTranspose -> BN, Dropout, Identity."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.same = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv(x)))
        x = self.bn2(self.grouped(x))
        return self.same(self.drop(self.bn3(self.up(x))))


class LinearStack(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear (no bias) -> BatchNorm1d -> Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5, bias=False)
        self.bn2 = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x))))))


def _build(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = factory()
    return _randomize(model, generator), torch.randn(shape, generator=generator)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "conv_stack": lambda: _build(ConvStack, (2, 3, 8, 8)),
    "linear_stack": lambda: _build(LinearStack, (2, 16)),
}

"""ImageNet-sized architectures for the zoo benchmark, written from their papers (random init, eval mode).

Each builder returns a torch module shaped like the published network at 224x224 (layer counts, widths,
kernel sizes, groups, normalisations and activations), so the benchmark exercises the graph structures
and the sizes real users bring: ResNet-50 bottlenecks, MobileNetV3-Small's SE blocks with hard-swish,
EfficientNet-B0's MBConv with SiLU and SE, SqueezeNet 1.1's fire modules, RegNetX-400MF's grouped
convolutions, VGG11-BN's 25088-feature classifier, DenseNet-121's pre-activation dense blocks and
ConvNeXt-Tiny's depthwise 7x7 convolutions with channels-last LayerNorm, MLPs and layer scale.
Weights are random, so accuracy means nothing here; BatchNorm statistics are randomised so folding them
is not the identity.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

IMAGE = (3, 224, 224)


def _cbn(cin: int, cout: int, kernel: int = 3, stride: int | tuple[int, int] = 1, groups: int = 1,
         act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act is not None else []))


def _head(channels: int, classes: int = 1000) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]


class _Residual(nn.Module):
    """body(x) + shortcut(x), then an optional activation."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut or nn.Identity(), act or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def resnet50() -> nn.Module:
    layers: list[nn.Module] = [_cbn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    width = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            step = stride if index == 0 else 1
            body = nn.Sequential(_cbn(width, mid, 1), _cbn(mid, mid, 3, step), _cbn(mid, mid * 4, 1, act=None))
            shortcut = _cbn(width, mid * 4, 1, step, act=None) if index == 0 else None
            layers.append(_Residual(body, shortcut, nn.ReLU()))
            width = mid * 4
    return nn.Sequential(*layers, *_head(width))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, act: Callable[[], nn.Module], gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeezed, 1), act(),
                                  nn.Conv2d(squeezed, channels, 1), gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _divisible(value: float, by: int = 8) -> int:
    return max(by, int(value + by / 2) // by * by)


def _inverted(cin: int, hidden: int, cout: int, kernel: int, stride: int, act: Callable[[], nn.Module],
              excite: nn.Module | None = None) -> nn.Module:
    """MobileNet block: 1x1 expand (unless hidden == cin), depthwise, optional SE, linear 1x1 projection."""
    parts: list[nn.Module] = [] if hidden == cin else [_cbn(cin, hidden, 1, act=act)]
    parts += [_cbn(hidden, hidden, kernel, stride, groups=hidden, act=act), *([excite] if excite else []),
              _cbn(hidden, cout, 1, act=None)]
    body = nn.Sequential(*parts)
    return _Residual(body) if stride == 1 and cin == cout else body


def mobilenet_v3_small() -> nn.Module:
    # (kernel, expanded, out, squeeze-excite, hard-swish, stride)
    config = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
              (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
              (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
              (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))
    layers: list[nn.Module] = [_cbn(3, 16, 3, 2, act=nn.Hardswish)]
    width = 16
    for kernel, expanded, out, se, hard, stride in config:
        act = nn.Hardswish if hard else nn.ReLU
        excite = _SqueezeExcite(expanded, _divisible(expanded / 4), nn.ReLU, nn.Hardsigmoid) if se else None
        layers.append(_inverted(width, expanded, out, kernel, stride, act, excite))
        width = out
    layers += [_cbn(width, 576, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(576, 1024),
               nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, 1000)]
    return nn.Sequential(*layers)


def efficientnet_b0() -> nn.Module:
    # (expansion, kernel, stride, out, repeats)
    stages = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
    layers: list[nn.Module] = [_cbn(3, 32, 3, 2, act=nn.SiLU)]
    width = 32
    for expansion, kernel, stride, out, repeats in stages:
        for index in range(repeats):
            excite = _SqueezeExcite(width * expansion, max(1, width // 4), nn.SiLU, nn.Sigmoid)
            layers.append(_inverted(width, width * expansion, out, kernel, stride if index == 0 else 1, nn.SiLU,
                                    excite))
            width = out
    return nn.Sequential(*layers, _cbn(width, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(1280, 1000))


class _Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return torch.cat([self.expand1(squeezed), self.expand3(squeezed)], 1)


def squeezenet1_1() -> nn.Module:
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), _Fire(64, 16, 64), _Fire(128, 16, 64), pool(),
                         _Fire(128, 32, 128), _Fire(256, 32, 128), pool(), _Fire(256, 48, 192), _Fire(384, 48, 192),
                         _Fire(384, 64, 256), _Fire(512, 64, 256), nn.Dropout(0.5), nn.Conv2d(512, 1000, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def regnetx_400mf() -> nn.Module:
    layers: list[nn.Module] = [_cbn(3, 32, 3, 2)]
    width, group_width = 32, 16
    for out, depth in ((32, 1), (64, 2), (160, 7), (400, 12)):
        for index in range(depth):
            stride = 2 if index == 0 else 1
            body = nn.Sequential(_cbn(width, out, 1), _cbn(out, out, 3, stride, groups=out // group_width),
                                 _cbn(out, out, 1, act=None))
            shortcut = _cbn(width, out, 1, stride, act=None) if index == 0 else None
            layers.append(_Residual(body, shortcut, nn.ReLU()))
            width = out
    return nn.Sequential(*layers, *_head(width))


def vgg11_bn() -> nn.Module:
    layers: list[nn.Module] = []
    width = 3
    for entry in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if entry == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, int(entry), 3, padding=1), nn.BatchNorm2d(int(entry)), nn.ReLU()]
            width = int(entry)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(512 * 49, 4096), nn.ReLU(),
                         nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 32, bottleneck: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bottleneck * growth, 1, bias=False),
                                  nn.BatchNorm2d(bottleneck * growth), nn.ReLU(),
                                  nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def densenet121() -> nn.Module:
    layers: list[nn.Module] = [_cbn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    width = 64
    for index, blocks in enumerate((6, 12, 24, 16)):
        for _ in range(blocks):
            layers.append(_DenseLayer(width))
            width += 32
        if index < 3:
            layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False), nn.AvgPool2d(2)]
            width //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(width), nn.ReLU(), *_head(width))


class _ChannelsLast(nn.Module):
    """Applies `inner` with channels on the last axis (NCHW -> NHWC -> NCHW)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.mlp = _ChannelsLast(nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                               nn.Linear(4 * dim, dim)))
        self.scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6) + torch.rand(dim, 1, 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.mlp(self.depthwise(x))


def convnext_tiny() -> nn.Module:
    dims = (96, 192, 384, 768)
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), _ChannelsLast(nn.LayerNorm(dims[0], eps=1e-6))]
    for index, (dim, depth) in enumerate(zip(dims, (3, 3, 9, 3))):
        if index:
            layers += [_ChannelsLast(nn.LayerNorm(dims[index - 1], eps=1e-6)), nn.Conv2d(dims[index - 1], dim, 2, 2)]
        layers += [_ConvNeXtBlock(dim) for _ in range(depth)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), _ChannelsLast(nn.LayerNorm(dims[-1], eps=1e-6)),
                         nn.Flatten(), nn.Linear(dims[-1], 1000))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet50": resnet50, "mobilenet_v3_small": mobilenet_v3_small, "efficientnet_b0": efficientnet_b0,
    "squeezenet1_1": squeezenet1_1, "regnetx_400mf": regnetx_400mf, "vgg11_bn": vgg11_bn,
    "densenet121": densenet121, "convnext_tiny": convnext_tiny,
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The architecture in eval mode with randomised BatchNorm statistics, and a batch-1 example input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHITECTURES[name]()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.data.uniform_(0.5, 1.5, generator=generator)
                module.bias.data.uniform_(-0.2, 0.2, generator=generator)
    return model.eval(), torch.randn(1, *IMAGE, generator=generator)

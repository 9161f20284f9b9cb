"""Small, deterministic torch models covering the structures channel pruning must handle.

Every entry of ``ZOO`` builds a randomly initialised model in ``eval()`` mode together with an
example input of batch size 2. Builds are reproducible: each one seeds its own RNG stream and
leaves the global torch RNG untouched. BatchNorm running statistics and affine parameters (and
LayerNorm and GroupNorm affine parameters) are randomised so that an unfused or wrongly folded normalisation
changes the output. Models are tiny (8-64 channels, 8-32 pixels) so a CPU forward takes
milliseconds; they are for structural tests, not for accuracy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ModelBuilder = Callable[[], tuple[nn.Module, torch.Tensor]]

_SEED = 20240601
_EXAMPLE_BATCH = 2


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> optional activation, with 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _classifier(channels: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        self.shortcut = (_conv_bn(cin, cout, 1, stride, act=None)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce -> 3x3 -> 1x1 expand, residual add (a grouped 3x3 with `groups` > 1,
    as in ResNeXt and RegNet)."""

    def __init__(self, cin: int, mid: int, cout: int, groups: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, mid, 1), _conv_bn(mid, mid, 3, groups=groups),
                                  _conv_bn(mid, cout, 1, act=None))
        self.shortcut = _conv_bn(cin, cout, 1, act=None) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            _conv_bn(cin, hidden, 1, act=nn.ReLU6),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            _conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_residual else self.body(x)


class SqueezeExcitation(nn.Module):
    """Channel gate: global pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> multiply."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(self.pool(x)))))
        return x * gate


class DenseBlock(nn.Module):
    """Each layer's output is concatenated onto its input along channels."""

    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_conv_bn(cin + i * growth, growth) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class InceptionBlock(nn.Module):
    """Parallel 1x1, 1x1->3x3 and maxpool->1x1 branches concatenated along channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = _conv_bn(cin, 8, 1)
        self.branch3x3 = nn.Sequential(_conv_bn(cin, 8, 1), _conv_bn(8, 12, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch_pool(x)], dim=1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups via reshape -> transpose -> reshape (as in ShuffleNet)."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: split channels, transform one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(_conv_bn(half, half, 1), _conv_bn(half, half, 3, groups=half, act=None),
                                    _conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passthrough, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([passthrough, self.branch(transformed)], dim=1), 2)


class UNet(nn.Module):
    """Two-level UNet: one ConvTranspose upsampling, one nearest Upsample, skip concatenations."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = _conv_bn(3, 8), _conv_bn(8, 16)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _conv_bn(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = _conv_bn(32, 16)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = _conv_bn(24, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        x = self.bottleneck(self.pool(skip2))
        x = self.dec2(torch.cat([self.up2(x), skip2], dim=1))
        x = self.dec1(torch.cat([self.up1(x), skip1], dim=1))
        return self.head(x)


class DepthwiseUpsampler(nn.Module):
    """A learned 2x upsampling by a depthwise ConvTranspose (one group per channel, as light segmentation and
    text-detection decoders use) with a bias and a ReLU, between two Conv-BN-ReLU layers and a 1x1 head (no
    BatchNorm after it: the legacy exporter folds BatchNorm into convolutions only)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = _conv_bn(3, 16)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2, groups=16)
        self.dec = _conv_bn(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec(torch.relu(self.up(self.enc(x)))))


class YoloBottleneck(nn.Module):
    """Two 3x3 Conv-BN-SiLU layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = _conv_bn(channels, channels, act=nn.SiLU)
        self.cv2 = _conv_bn(channels, channels, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8 C2f: 1x1 conv, split in halves, bottleneck chain on one, concat all, 1x1 conv."""

    def __init__(self, cin: int, cout: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.cv1 = _conv_bn(cin, 2 * hidden, 1, act=nn.SiLU)
        self.blocks = nn.ModuleList(YoloBottleneck(hidden) for _ in range(blocks))
        self.cv2 = _conv_bn((2 + blocks) * hidden, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).split((self.hidden, self.hidden), dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """YOLO spatial pyramid pooling (fast): three chained 5x5 max pools, concat of four."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        hidden = cin // 2
        self.cv1 = _conv_bn(cin, hidden, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = _conv_bn(4 * hidden, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [self.cv1(x)]
        for _ in range(3):
            pooled.append(self.pool(pooled[-1]))
        return self.cv2(torch.cat(pooled, dim=1))


def _attend(x: torch.Tensor, projections, heads: int, head_dim: int) -> torch.Tensor:
    """Scaled dot-product self-attention over `x` ([batch, seq, d]) of its query, key and value projections,
    each split into `heads` heads of `head_dim`, merged back."""
    batch, seq, d_model = x.shape
    query, key, value = (p.reshape(p.shape[0], p.shape[1], heads, head_dim).transpose(1, 2) for p in projections)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(head_dim)
    context = torch.matmul(scores.softmax(dim=-1), value)
    return context.transpose(1, 2).reshape(batch, seq, d_model)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block with hand-written multi-head self-attention."""

    def __init__(self, d_model: int = 32, heads: int = 4, d_ff: int = 64) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_attend(x, (proj(x) for proj in (self.q, self.k, self.v)), self.heads, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PostNormBlock(nn.Module):
    """BERT-style post-norm encoder block: one packed q/k/v projection chunked in three, LN(x + attention(x)),
    then LN(x + FFN(x))."""

    def __init__(self, d_model: int = 32, heads: int = 4, d_ff: int = 64) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.out(_attend(x, self.qkv(x).chunk(3, dim=-1), self.heads, self.head_dim)))
        return self.norm2(x + self.ffn(x))


class SectionedBlock(PostNormBlock):
    """ViT-style pre-norm block with timm's attention: one q/k/v projection reshaped to [batch, seq, 3, heads,
    head_dim], permuted and indexed into query, key and value (the layers of PostNormBlock)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(qkv[0], qkv[1].transpose(-2, -1)) / math.sqrt(self.head_dim)
        context = torch.matmul(scores.softmax(dim=-1), qkv[2]).transpose(1, 2).reshape(batch, seq, d_model)
        x = x + self.out(context)
        return x + self.ffn(self.norm2(x))


class GroupedQueryBlock(nn.Module):
    """Llama-style pre-norm decoder block without biases: RMS norm with a gain, 6 query heads over 2 key/value
    heads (each repeated for its 3 query heads by expand + reshape), causal mask, SwiGLU FFN."""

    def __init__(self, d_model: int = 48, heads: int = 6, kv_heads: int = 2, d_ff: int = 96) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.gain1, self.gain2 = nn.Parameter(torch.ones(d_model)), nn.Parameter(torch.ones(d_model))
        self.q, self.o = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, d_model, bias=False)
        self.k, self.v = (nn.Linear(d_model, kv_heads * self.head_dim, bias=False) for _ in range(2))
        self.gate, self.up = (nn.Linear(d_model, d_ff, bias=False) for _ in range(2))
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.register_buffer("causal", torch.full((64, 64), -1e4).triu(1), persistent=False)  # sliced per length

    @staticmethod
    def _norm(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = h.shape
        q = self.q(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k, v = (p(h).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        group = self.heads // self.kv_heads
        k, v = (t[:, :, None].expand(batch, self.kv_heads, group, seq, self.head_dim)
                .reshape(batch, self.heads, seq, self.head_dim) for t in (k, v))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim) + self.causal[:seq, :seq]
        return self.o(torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch, seq, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self._norm(x, self.gain1))
        h = self._norm(x, self.gain2)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def _grouped_query_decoder() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 48, bias=False), GroupedQueryBlock(), nn.Linear(48, 10, bias=False))


def _resnet_basic() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 16), BasicBlock(16, 16), BasicBlock(16, 32, stride=2), _classifier(32))


def _resnet_bottleneck() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 16), Bottleneck(16, 8, 32), Bottleneck(32, 8, 32), _classifier(32))


def _resnext() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 16), Bottleneck(16, 32, 32, groups=4), Bottleneck(32, 32, 32, groups=4),
                         _classifier(32))


def _mobilenetv2() -> nn.Module:
    return nn.Sequential(
        _conv_bn(3, 16, act=nn.ReLU6), InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 2),
        InvertedResidual(24, 24, 1, 2), _conv_bn(24, 32, 1, act=nn.ReLU6), _classifier(32),
    )


def _se_hardswish() -> nn.Module:
    return nn.Sequential(
        _conv_bn(3, 16, act=nn.Hardswish), SqueezeExcitation(16, 8),
        _conv_bn(16, 32, 3, 2, act=nn.Hardswish), SqueezeExcitation(32, 8), _classifier(32),
    )


def _densenet() -> nn.Module:
    transition = nn.Sequential(_conv_bn(16 + 3 * 8, 24, 1), nn.AvgPool2d(2))
    return nn.Sequential(_conv_bn(3, 16), DenseBlock(16, 8, 3), transition, _classifier(24))


def _inception() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 16), InceptionBlock(16), _conv_bn(28, 32, 1), _classifier(32))


def _shufflenet() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 16), ShuffleUnit(16), ShuffleUnit(16), _conv_bn(16, 32, 1),
                         _classifier(32))


def _yolo_c2f() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 16, 3, 2, act=nn.SiLU), C2f(16, 32, 8, 2), SPPF(32, 32),
                         nn.Conv2d(32, 8, 1))


def _conv_flatten_gemm() -> nn.Module:
    return nn.Sequential(
        _conv_bn(3, 8), nn.MaxPool2d(2), _conv_bn(8, 16), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def _transformer() -> nn.Module:
    return nn.Sequential(EncoderBlock(), nn.LayerNorm(32), nn.Linear(32, 10))


def _sectioned_transformer() -> nn.Module:
    return nn.Sequential(SectionedBlock(), SectionedBlock(), nn.LayerNorm(32), nn.Linear(32, 10))


def _post_norm_transformer() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), PostNormBlock(), PostNormBlock(), nn.Linear(32, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _bias_free_tokens() -> nn.Module:
    """Per-token layers without biases, as Llama-style projections are: bare MatMuls on [N, T, C]."""
    return nn.Sequential(nn.Linear(32, 64, bias=False), nn.ReLU(), nn.Linear(64, 48, bias=False), nn.GELU(),
                         nn.Linear(48, 10, bias=False))


class TorchEncoder(nn.Module):
    """torch's own nn.TransformerEncoder (post-norm layers over nn.MultiheadAttention, batch first): its
    exports fold the heads into the batch axis ([seq, batch x heads, head_dim]) between the projections."""

    def __init__(self, d_model: int = 32, heads: int = 4, d_ff: int = 64, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class RecurrentRecognizer(nn.Module):
    """CRNN text-recogniser layout: two Conv-BN-ReLU stages pool a [1, 16, W] line image to [32, 4, W/2], whose
    columns (32 channels x 4 rows) a bidirectional LSTM reads in order, then a GRU and a per-column Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(1, 16), nn.MaxPool2d(2), _conv_bn(16, 32), nn.MaxPool2d((2, 1)))
        self.lstm = nn.LSTM(32 * 4, 24, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(48, 16, batch_first=True)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        batch, channels, rows, columns = features.shape
        sequence = features.reshape(batch, channels * rows, columns).permute(0, 2, 1)
        return self.head(self.gru(self.lstm(sequence)[0])[0])


class GroupNormResBlock(nn.Module):
    """A diffusion-UNet-style residual block: GroupNorm, SiLU and a 3x3 convolution, twice, added to its input
    (both exporters write each GroupNorm as Reshape to [N, groups, -1], InstanceNormalization, Reshape back)."""

    def __init__(self, channels: int = 48, groups: int = 12) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


def _groupnorm_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), GroupNormResBlock(48, 12), nn.GroupNorm(12, 48), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _uniform(like: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator) * (high - low) + low


def randomize_norm_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Draw BatchNorm running mean in [-0.5, 0.5) and variance in [0.5, 2), and norm affine terms
    (BatchNorm, LayerNorm and GroupNorm) with scale in [0.5, 1.5) and shift in [-0.3, 0.3)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BATCHNORMS):
                module.running_mean.copy_(_uniform(module.running_mean, -0.5, 0.5, generator))
                module.running_var.copy_(_uniform(module.running_var, 0.5, 2.0, generator))
            if isinstance(module, (*_BATCHNORMS, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(_uniform(module.weight, 0.5, 1.5, generator))
                module.bias.copy_(_uniform(module.bias, -0.3, 0.3, generator))


def _build(factory: Callable[[], nn.Module], input_shape: tuple[int, ...]
           ) -> tuple[nn.Module, torch.Tensor]:
    """Build ``factory()`` under a private seeded RNG stream; return it in eval mode with an example input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = factory()
        generator = torch.Generator().manual_seed(_SEED)
        randomize_norm_parameters(model, generator)
        example = torch.randn((_EXAMPLE_BATCH, *input_shape), generator=generator)
    return model.eval(), example


_IMAGE_16 = (3, 16, 16)
_ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet_basic": (_resnet_basic, _IMAGE_16),
    "resnet_bottleneck": (_resnet_bottleneck, _IMAGE_16),
    "mobilenetv2": (_mobilenetv2, _IMAGE_16),
    "se_hardswish": (_se_hardswish, _IMAGE_16),
    "densenet": (_densenet, _IMAGE_16),
    "inception": (_inception, _IMAGE_16),
    "shufflenet": (_shufflenet, _IMAGE_16),
    "unet": (UNet, _IMAGE_16),
    "yolo_c2f": (_yolo_c2f, (3, 32, 32)),
    "conv_flatten_gemm": (_conv_flatten_gemm, _IMAGE_16),
    "transformer": (_transformer, (8, 32)),
    "post_norm_transformer": (_post_norm_transformer, (8, 32)),
    "sectioned_transformer": (_sectioned_transformer, (8, 32)),
    "mlp": (_mlp, (64,)),
    "bias_free_tokens": (_bias_free_tokens, (8, 32)),
    "resnext": (_resnext, _IMAGE_16),
    "depthwise_upsample": (DepthwiseUpsampler, _IMAGE_16),
    "grouped_query_decoder": (_grouped_query_decoder, (8, 32)),
    "recurrent_recognizer": (RecurrentRecognizer, (1, 16, 24)),
    "torch_encoder": (TorchEncoder, (8, 32)),
    "groupnorm_resnet": (_groupnorm_resnet, _IMAGE_16),
}

ZOO: dict[str, ModelBuilder] = {
    name: functools.partial(_build, factory, input_shape)
    for name, (factory, input_shape) in _ARCHITECTURES.items()
}


def zoo_names() -> list[str]:
    """Names of all zoo architectures, in registry order."""
    return list(ZOO)

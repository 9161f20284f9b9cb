"""Small architectures in the forms users bring from torch, for the zoo benchmark's `wild` set (random init).

Each is the kind of model a new user exports as it is written in torch, with the modules it uses: GRU taggers,
ConvNeXt blocks (depthwise 7x7, channels-last LayerNorm through permutes, layer scale), MLP-Mixer token mixing
(Linear over the tokens between transposes), ESPCN super-resolution (PixelShuffle), a dilated TCN, GroupNorm
with SiLU and reflect padding, InstanceNorm, an EfficientNet-style MBConv with SE, torch's own
nn.TransformerEncoder (pre-norm) and nn.MultiheadAttention, a Conformer convolution module (GLU, depthwise
Conv1d, BatchNorm1d), a convolution applied twice (shared weights), a language model whose output layer is the
embedding table (tied weights), an FPN with two outputs, a LayerNorm over channels written out by hand, PReLU
with BatchNorm1d after max pooling, weight-normalised Conv1d, a causal decoder on F.scaled_dot_product_attention,
and PixelUnshuffle/PixelShuffle around a residual. Weights are random: only the structure matters here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GRUTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gru, self.out = nn.Linear(16, 48), nn.GRU(48, 32, batch_first=True), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(torch.relu(self.inp(x)))[0])


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1, self.pw2 = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class PatchBackbone(nn.Module):
    """A 4x4 patch stem to 32 channels, two blocks, a LayerNorm and a 10-way head (forward: the subclass's)."""

    def __init__(self, block: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.stem, self.blocks = nn.Conv2d(3, 32, 4, stride=4), nn.Sequential(block(), block())
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 10)


class ConvNeXt(PatchBackbone):
    def __init__(self) -> None:
        super().__init__(ConvNeXtBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int = 16, channels: int = 32) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.token1, self.token2 = nn.Linear(tokens, 32), nn.Linear(32, tokens)
        self.channel1, self.channel2 = nn.Linear(channels, 64), nn.Linear(64, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token2(F.gelu(self.token1(self.norm1(x).transpose(1, 2)))).transpose(1, 2)
        return x + self.channel2(F.gelu(self.channel1(self.norm2(x))))


class Mixer(PatchBackbone):
    def __init__(self) -> None:
        super().__init__(MixerBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x).flatten(2).transpose(1, 2))).mean(1))


class ESPCN(nn.Module):
    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 16, 3, padding=1)
        self.c3, self.shuffle = nn.Conv2d(16, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))


class TCNBlock(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.c1, self.c2 = (nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c2(torch.relu(self.c1(x))))


class TCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Conv1d(8, 32, 1), nn.Conv1d(32, 4, 1)
        self.blocks = nn.Sequential(TCNBlock(32, 1), TCNBlock(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.g1, self.g2 = nn.GroupNorm(8, 32), nn.GroupNorm(8, 32)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c3 = nn.Conv2d(32, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.g1(self.c1(x)))
        return self.c3(self.up(h + F.silu(self.g2(self.c2(h)))))


class InstanceNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 3, 1)
        self.n1, self.n2 = nn.InstanceNorm2d(16, affine=True), nn.InstanceNorm2d(16, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.f1, self.f2 = nn.Conv2d(channels, channels // ratio, 1), nn.Conv2d(channels // ratio, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.f2(F.silu(self.f1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    def __init__(self, channels: int, expand: int = 4, kernel: int = 5, stride: int = 1) -> None:
        super().__init__()
        wide = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(wide, wide, kernel, stride, kernel // 2, groups=wide, bias=False),
                                nn.BatchNorm2d(wide), nn.SiLU())
        self.se = SqueezeExcite(wide)
        self.project = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class EfficientNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16), MBConv(16, stride=2), MBConv(16))
        self.head, self.fc = nn.Sequential(nn.Conv2d(16, 64, 1), nn.SiLU()), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class PreNormEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class MultiheadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attention = nn.Linear(16, 32), nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm, self.out = nn.LayerNorm(32), nn.Linear(32, 4)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0])
        return self.out(h + self.ffn(h))


class ConformerConvolution(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.norm, self.pw1 = nn.LayerNorm(channels), nn.Conv1d(channels, 2 * channels, 1)
        self.dw = nn.Conv1d(channels, channels, 7, padding=3, groups=channels)
        self.bn, self.pw2 = nn.BatchNorm1d(channels), nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, T, C]
        y = F.glu(self.pw1(self.norm(x).transpose(1, 2)), dim=1)
        return x + self.pw2(F.silu(self.bn(self.dw(y)))).transpose(1, 2)


class Conformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.conv, self.norm, self.out = nn.Linear(20, 32), ConformerConvolution(), nn.LayerNorm(32), \
            nn.Linear(32, 6)
        self.ffn = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.norm(self.conv(h + 0.5 * self.ffn(h))))


class SharedConvolution(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.shared = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        pooled = F.avg_pool2d(h, 3, 1, 1)
        return self.out(torch.cat([torch.relu(self.shared(h)), torch.relu(self.shared(pooled))], 1))


class TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.norm = nn.Embedding(40, 32), nn.LayerNorm(32)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        return self.norm(h + self.ffn(h)) @ self.embedding.weight.T


class FeaturePyramid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.lateral1, self.lateral2 = nn.Conv2d(16, 24, 1), nn.Conv2d(32, 24, 1)
        self.head1, self.head2 = nn.Conv2d(24, 5, 3, padding=1), nn.Conv2d(24, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        p2 = self.lateral2(b)
        p1 = self.lateral1(a) + F.interpolate(p2, scale_factor=2.0, mode="nearest")
        return self.head1(p1), self.head2(p2)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of [N, C, H, W], written out as reductions (ConvNeXt's channels-first form)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.rand(channels) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - mean) / torch.sqrt(variance + 1e-6) + self.bias[:, None, None]


class ChannelNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.norm = nn.Conv2d(3, 24, 3, padding=1), ChannelNorm(24)
        self.c2, self.c3 = nn.Conv2d(24, 24, 1), nn.Conv2d(24, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.gelu(self.c2(self.norm(self.c1(x)))))


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.a1, self.a2, self.bn, self.fc = nn.PReLU(16), nn.PReLU(), nn.BatchNorm1d(16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a2(self.c2(self.a1(self.c1(x))))
        return self.fc(self.bn(F.adaptive_max_pool2d(h, 1).flatten(1)))


class WeightNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        norm = nn.utils.parametrizations.weight_norm
        self.c1 = norm(nn.Conv1d(4, 32, 3, padding=1))
        self.c2 = norm(nn.Conv1d(32, 32, 3, padding=2, dilation=2))
        self.out = nn.Conv1d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.leaky_relu(self.c2(F.leaky_relu(self.c1(x), 0.2)), 0.2))


class CausalDecoder(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.embedding, self.qkv, self.o = nn.Embedding(50, width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.lm = nn.Linear(width, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, tokens = ids.shape
        x = self.embedding(ids)
        q, k, v = (z.view(batch, tokens, self.heads, -1).transpose(1, 2)
                   for z in self.qkv(self.norm1(x)).split(self.width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).contiguous().view(batch, tokens, self.width))
        return self.lm(x + self.ffn(self.norm2(x)))


class PixelUnshuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(2), nn.PixelShuffle(2)
        self.c1, self.c2, self.c3 = nn.Conv2d(12, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), \
            nn.Conv2d(32, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shuffle(self.c3(F.relu(self.c2(F.relu(self.c1(self.unshuffle(x)))))))


_IMAGE = (3, 16, 16)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {  # (builder, shape, token ids)
    "gru_tagger": (GRUTagger, (10, 16), False),
    "convnext_blocks": (ConvNeXt, (3, 32, 32), False),
    "mixer": (Mixer, _IMAGE, False),
    "espcn": (ESPCN, _IMAGE, False),
    "tcn": (TCN, (8, 32), False),
    "groupnorm_net": (GroupNormNet, _IMAGE, False),
    "instancenorm_net": (InstanceNormNet, _IMAGE, False),
    "efficientnet_like": (EfficientNetLike, (3, 32, 32), False),
    "prenorm_torch_encoder": (PreNormEncoder, (8, 32), False),
    "multihead_model": (MultiheadModel, (8, 16), False),
    "conformer_conv": (Conformer, (12, 20), False),
    "shared_convolution": (SharedConvolution, _IMAGE, False),
    "tied_language_model": (TiedLanguageModel, (10,), True),
    "feature_pyramid": (FeaturePyramid, (3, 32, 32), False),
    "channel_norm_net": (ChannelNormNet, _IMAGE, False),
    "prelu_net": (PReLUNet, _IMAGE, False),
    "weight_norm_net": (WeightNormNet, (4, 32), False),
    "causal_decoder": (CausalDecoder, (10,), True),
    "pixel_unshuffle_net": (PixelUnshuffleNet, _IMAGE, False),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The architecture `name` in eval mode with an example input of batch 2 (token ids for the language models)."""
    factory, shape, ids = ARCHITECTURES[name]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory().eval()
    example = torch.randint(0, 40, (2, *shape), generator=generator) if ids else \
        torch.randn((2, *shape), generator=generator)
    return model, example

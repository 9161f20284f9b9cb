"""Measured speed of pruned models: does removing MACs buy time in onnxruntime?

Nine architectures built here in torch with realistic widths (random weights, which do not change speed;
BatchNorm statistics measured on random samples, so that outputs depend on inputs), exported with
graphopt.torch.export (legacy exporter by default), are pruned by every method x MAC target x channel
rounding, and each result is timed against its original side by side (graphopt.evaluate.compare_latency:
interleaved rounds, full graph optimisation, the same threads and inputs) at batch 1 and batch 8. Per run:
MAC ratio, speedup (median, p10, p90 of the per-round ratios) per batch, efficiency = speedup x MAC ratio
(1.0: time fell exactly as MACs did), fidelity on held-out samples (not the calibration ones: cosine, rel_l2,
top-1 agreement over the last axis), the time `optimize` took (calibration included), and a loud flag when
the result is slower than the original.
Per architecture: the original's latency, an A/A control (the original timed against itself the same way:
the noise floor of the machine and settings; a spread far from 1.00 means the machine was not quiet, and the
results of that architecture are not to be trusted), how much its output depends on its input (fidelity
means little where it hardly does), and the time to optimize against plain inference (full optimisation)
over the calibration samples. Results: a Markdown table on stdout, bench/results/speed.json (with the machine).

Sizes of the default run (chosen to keep it near 20 minutes on a 2-core machine):
- resnet50: bottlenecks 3-4-6-3, widths 64-2048, input 3x160x160;
- mobilenet_v2 (width 1.0), mobilenet_v3_small, efficientnet_b0: the published layer tables, input 3x224x224;
- text_recogniser: depthwise-separable conv stages (PP-LCNet-like, HardSwish) on 3x32x320 down to 80 time
  steps, a 1x1 neck to 256, two pre-norm transformer blocks (8 heads, MLP 512), a linear CTC-style head (97);
- unet_groupnorm: a diffusion-UNet-style network of GroupNorm(32) residual blocks at 128 and 256 channels on
  3x64x64 (its channels go in whole GroupNorm groups);
- crnn_bilstm: the classic CRNN, VGG-style conv stages (64-512 channels) on 3x32x160 down to 40 time steps,
  two bidirectional LSTM layers of 256 hidden units, a linear CTC-style head (97);
- vit_s16: dim 384, 6 heads, MLP 1536, fused qkv, 224x224 patches 16: 6 of ViT-S's 12 layers;
- bert_base: hidden 768, 12 heads, FFN 3072, post-norm, sequence 128, int64 input_ids + attention_mask:
  4 of BERT-base's 12 layers (exported with torch.onnx directly: export_onnx takes one input).

    python bench/speed.py                                  # full run, legacy exporter
    python bench/speed.py --exporters legacy,dynamo        # both exporters
    python bench/speed.py --quick                          # smoke run: tiny widths, one arch per kind
    python bench/speed.py --archs vit_s16,bert_base --roundings auto --targets none --latency-kinds vit,encoder \
        --latency-targets 0.7,0.6                           # --target-latency alone, on the transformers

Defaults: 64 calibration samples (read by snp; magnitude reads none), 16 held-out samples, 12 rounds per
comparison, each round about 100 ms of the original (--round-ms), onnxruntime's default threads (--threads).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

import graphopt
from graphopt.calibration.session import make_session
from graphopt.calibration.shapes import count_cost
from graphopt.evaluate import bench, compare_latency, verify
from graphopt.ir.shapes import resolve_input_shapes
from graphopt.passes import METHODS
from graphopt.passes.channels.alignment import parse_round_to
from graphopt.torch.export import EXPORTERS, export_onnx
from graphopt.torch.zoo import GroupNormResBlock, randomize_norm_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SNP_EARLIER, machine  # noqa: E402
from zoo_architectures import _cbn, _divisible, _inverted, _Residual, _SqueezeExcite  # noqa: E402  (shared blocks)

RESULTS = Path(__file__).resolve().parent / "results"
VIT_LAYERS = 6  # of ViT-S's 12: keeps the default run near 20 minutes on 2 cores
BERT_LAYERS = 4  # of BERT-base's 12, likewise
Sampler = Callable[[int, int], dict[str, np.ndarray]]  # (count, seed) -> inputs


# ----------------------------------------------------------------------------------------------- modules
def _classifier(width: int, classes: int = 1000) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]


def _w(channels: int, tiny: bool) -> int:
    """A width, divided by 4 in tiny builds."""
    return _divisible(channels / 4) if tiny else channels


def resnet50(tiny: bool) -> nn.Module:
    layers: list[nn.Module] = [_cbn(3, _w(64, tiny), 7, 2), nn.MaxPool2d(3, 2, 1)]
    width = _w(64, tiny)
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        mid = _w(mid, tiny)
        for index in range(1 if tiny else blocks):
            step = stride if index == 0 else 1
            body = nn.Sequential(_cbn(width, mid, 1), _cbn(mid, mid, 3, step), _cbn(mid, mid * 4, 1, act=None))
            shortcut = _cbn(width, mid * 4, 1, step, act=None) if index == 0 else None
            layers.append(_Residual(body, shortcut, nn.ReLU()))
            width = mid * 4
    return nn.Sequential(*layers, *_classifier(width))


def mobilenet_v2(tiny: bool) -> nn.Module:
    layers: list[nn.Module] = [_cbn(3, _w(32, tiny), 3, 2, act=nn.ReLU6)]
    width = _w(32, tiny)
    for expansion, out, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for index in range(1 if tiny else repeats):
            layers.append(_inverted(width, width * expansion, _w(out, tiny), 3, stride if index == 0 else 1,
                                    nn.ReLU6))
            width = _w(out, tiny)
    return nn.Sequential(*layers, _cbn(width, _w(1280, tiny), 1, act=nn.ReLU6), *_classifier(_w(1280, tiny)))


def mobilenet_v3_small(tiny: bool) -> nn.Module:
    # (kernel, expanded, out, squeeze-excite, hard-swish, stride)
    table = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
             (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
             (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
             (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))
    layers: list[nn.Module] = [_cbn(3, 16, 3, 2, act=nn.Hardswish)]
    width = 16
    for kernel, expanded, out, se, hard, stride in table:
        expanded, out = _w(expanded, tiny), _w(out, tiny)
        act = nn.Hardswish if hard else nn.ReLU
        excite = _SqueezeExcite(expanded, _divisible(expanded / 4), nn.ReLU, nn.Hardsigmoid) if se else None
        layers.append(_inverted(width, expanded, out, kernel, stride, act, excite))
        width = out
    last = _w(576, tiny)
    return nn.Sequential(*layers, _cbn(width, last, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(last, _w(1024, tiny)), nn.Hardswish(), nn.Linear(_w(1024, tiny), 1000))


def efficientnet_b0(tiny: bool) -> nn.Module:
    # (expansion, kernel, stride, out, repeats)
    stages = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
    layers: list[nn.Module] = [_cbn(3, _w(32, tiny), 3, 2, act=nn.SiLU)]
    width = _w(32, tiny)
    for expansion, kernel, stride, out, repeats in stages:
        for index in range(1 if tiny else repeats):
            excite = _SqueezeExcite(width * expansion, max(1, width // 4), nn.SiLU, nn.Sigmoid)
            layers.append(_inverted(width, width * expansion, _w(out, tiny), kernel, stride if index == 0 else 1,
                                    nn.SiLU, excite))
            width = _w(out, tiny)
    return nn.Sequential(*layers, _cbn(width, _w(1280, tiny), 1, act=nn.SiLU), *_classifier(_w(1280, tiny)))


class _Attention(nn.Module):
    """Multi-head self-attention, qkv fused in one Linear (timm's ViT) or three (BERT); optional additive bias."""

    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.qkv = nn.Linear(dim, 3 * dim) if fused else nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        if self.fused:
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            query, key, value = qkv[0], qkv[1], qkv[2]
        else:
            query, key, value = (p(x).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
                                 for p in self.qkv)
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        context = torch.matmul(scores.softmax(dim=-1), value).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(context)


class _Block(nn.Module):
    """Transformer block: pre-norm (ViT, SVTR) or post-norm (BERT), GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int, fused: bool, pre_norm: bool) -> None:
        super().__init__()
        self.attention, self.pre_norm = _Attention(dim, heads, fused), pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.norm1(x), bias)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attention(x, bias))
        return self.norm2(x + self.mlp(x))


class TextRecogniser(nn.Module):
    """CRNN/SVTR-like: depthwise-separable conv stages to a 1-pixel-high map, a transformer mixer over the
    width (time steps), a per-step linear head (CTC logits)."""

    def __init__(self, tiny: bool, classes: int = 97) -> None:
        super().__init__()
        width = _w(32, tiny)
        layers: list[nn.Module] = [_cbn(3, width, 3, 2, act=nn.Hardswish)]
        for out, stride in ((64, 1), (128, 2), (128, 1), (256, (2, 1)), (256, 1), (512, (2, 1)), (512, 1),
                            (512, 1)):
            layers += [_cbn(width, width, 3, stride, groups=width, act=nn.Hardswish),
                       _cbn(width, _w(out, tiny), 1, act=nn.Hardswish)]
            width = _w(out, tiny)
        dim = _w(256, tiny)
        self.convs = nn.Sequential(*layers, nn.AvgPool2d((2, 1)), _cbn(width, dim, 1, act=nn.Hardswish))
        self.mixer = nn.Sequential(*(_Block(dim, 8 if not tiny else 4, 2 * dim, False, True) for _ in range(2)))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.convs(x).flatten(2).transpose(1, 2)
        return self.head(self.mixer(steps))


class BiLSTMRecogniser(nn.Module):
    """CRNN (Shi et al.): VGG-style conv stages on a 3x32x160 line image down to a 1-pixel-high map of 40 steps,
    two bidirectional LSTM layers (256 hidden units each way) over the steps, a per-step linear head (CTC
    logits). The LSTMs hold about an eighth of the MACs and run step by step."""

    def __init__(self, tiny: bool, classes: int = 97) -> None:
        super().__init__()
        c = [_w(n, tiny) for n in (64, 128, 256, 512)]
        self.convs = nn.Sequential(_cbn(3, c[0]), nn.MaxPool2d(2), _cbn(c[0], c[1]), nn.MaxPool2d(2),
                                   _cbn(c[1], c[2]), _cbn(c[2], c[2]), nn.MaxPool2d((2, 1)),
                                   _cbn(c[2], c[3]), _cbn(c[3], c[3]), nn.MaxPool2d((2, 1)), nn.AvgPool2d((2, 1)))
        hidden = _w(256, tiny)
        self.rnn = nn.LSTM(c[3], hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.convs(x).flatten(2).transpose(1, 2)
        return self.head(self.rnn(steps)[0])


class GroupNormUNet(nn.Module):
    """A diffusion-UNet-style network: GroupNorm(32) residual blocks at 128 and 256 channels, a strided
    convolution down, a transposed one up with a skip connection, GroupNorm, SiLU and a 3x3 output convolution."""

    def __init__(self, tiny: bool) -> None:
        super().__init__()
        low, high = (64, 128) if tiny else (128, 256)
        self.inp, self.block1 = nn.Conv2d(3, low, 3, padding=1), GroupNormResBlock(low, 32)
        self.down, self.block2 = nn.Conv2d(low, high, 3, 2, 1), GroupNormResBlock(high, 32)
        self.up, self.block3 = nn.ConvTranspose2d(high, low, 2, 2), GroupNormResBlock(low, 32)
        self.out = nn.Sequential(nn.GroupNorm(32, low), nn.SiLU(), nn.Conv2d(low, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.block1(self.inp(x))
        return self.out(self.block3(self.up(self.block2(self.down(skip))) + skip))


class VisionTransformer(nn.Module):
    def __init__(self, image: int, dim: int, depth: int, heads: int, patch: int = 16, classes: int = 1000) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads, 4 * dim, True, True) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens)[:, 0]))


class BertEncoder(nn.Module):
    """BERT-like: word + position embeddings, LayerNorm, post-norm blocks with an additive padding mask; the
    last hidden states are the output."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, ffn: int, sequence: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(1, sequence, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(_Block(dim, heads, ffn, False, False) for _ in range(depth))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.words(input_ids) + self.positions)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x


# ----------------------------------------------------------------------------------------- architectures
def _images(shape: tuple[int, ...]) -> Sampler:
    return lambda count, seed: {"input": np.random.default_rng(seed).standard_normal((count, *shape),
                                                                                     dtype=np.float32)}


def _tokens(vocab: int, sequence: int) -> Sampler:
    """Token ids and a padding mask: every sample keeps a random length between half and all of `sequence`."""
    def sample(count: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(sequence // 2, sequence + 1, size=count)
        mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": rng.integers(5, vocab, size=(count, sequence), dtype=np.int64) * mask,
                "attention_mask": mask}
    return sample


Builder = Callable[[bool], tuple[nn.Module, Sampler]]  # tiny -> model, its input sampler


@dataclass(frozen=True)
class Arch:
    kind: str  # --quick runs the first architecture of each kind
    build: Builder
    size: str  # what the default (not tiny) build is
    note: str = ""


def _cnn(factory: Callable[[bool], nn.Module], full: int, tiny_size: int) -> Builder:
    return lambda tiny: (factory(tiny), _images((3, tiny_size, tiny_size) if tiny else (3, full, full)))


def _vit(tiny: bool) -> tuple[nn.Module, Sampler]:
    if tiny:
        return VisionTransformer(64, 96, 2, 4), _images((3, 64, 64))
    return VisionTransformer(224, 384, VIT_LAYERS, 6), _images((3, 224, 224))


def _bert(tiny: bool) -> tuple[nn.Module, Sampler]:
    if tiny:
        return BertEncoder(1000, 64, 2, 4, 256, 32), _tokens(1000, 32)
    return BertEncoder(30522, 768, BERT_LAYERS, 12, 3072, 128), _tokens(30522, 128)


ARCHS: dict[str, Arch] = {
    "resnet50": Arch("cnn", _cnn(resnet50, 160, 64), "widths 64-2048, 3x160x160"),
    "mobilenet_v3_small": Arch("mobile", _cnn(mobilenet_v3_small, 224, 64), "3x224x224"),
    "mobilenet_v2": Arch("mobile", _cnn(mobilenet_v2, 224, 64), "width 1.0, 3x224x224"),
    "efficientnet_b0": Arch("mobile", _cnn(efficientnet_b0, 224, 64), "3x224x224"),
    "text_recogniser": Arch("ocr", lambda tiny: (TextRecogniser(tiny), _images((3, 32, 128 if tiny else 320))),
                            "3x32x320, 80 steps, mixer dim 256"),
    "unet_groupnorm": Arch("unet", _cnn(GroupNormUNet, 64, 32),
                           "GroupNorm(32) blocks of 128 and 256 channels, 3x64x64"),
    "crnn_bilstm": Arch("rnn", lambda tiny: (BiLSTMRecogniser(tiny), _images((3, 32, 64 if tiny else 160))),
                        "3x32x160, 40 steps, two BiLSTM layers of 256"),
    "vit_s16": Arch("vit", _vit, "dim 384, 6 heads, MLP 1536, 224x224",
                    f"{VIT_LAYERS} of ViT-S's 12 layers"),
    "bert_base": Arch("encoder", _bert, "hidden 768, 12 heads, FFN 3072, sequence 128",
                      f"{BERT_LAYERS} of BERT-base's 12 layers"),
}


# ------------------------------------------------------------------------------------------------ export
def _seeded(arch: Arch, tiny: bool) -> tuple[nn.Module, Sampler]:
    """The architecture under a fixed seed, in eval mode. Norm affine terms are randomised, then BatchNorm
    running statistics are measured on random samples, as a trained network's match its data: with random
    running statistics the deep CNNs' outputs hardly depend on their input, which would make the fidelity
    columns meaningless, and folding BatchNorm is still not the identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module, sampler = arch.build(tiny)
        randomize_norm_parameters(module, torch.Generator().manual_seed(0))
    batchnorms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if batchnorms:
        for norm in batchnorms:
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batches seen
        module.train()
        with torch.no_grad():
            module(*(torch.from_numpy(value) for value in sampler(16, 3).values()))
    return module.eval(), sampler


def export(module: nn.Module, example: dict[str, np.ndarray], exporter: str, folder: Path) -> onnx.ModelProto:
    """A model of one input through graphopt.torch.export.export_onnx; several inputs (BERT) through torch.onnx
    directly with the same conventions: dynamic batch axis, output named 'output', BatchNorm folded."""
    tensors = {name: torch.from_numpy(value) for name, value in example.items()}
    path = folder / f"model_{exporter}.onnx"
    if list(tensors) == ["input"]:
        return onnx.load(export_onnx(module, tensors["input"], path, exporter=exporter))
    names, args = list(tensors), tuple(tensors.values())
    if exporter == "legacy":
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter is the point here
            torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17, input_names=names,
                              output_names=["output"], do_constant_folding=True,
                              dynamic_axes={name: {0: "batch"} for name in [*names, "output"]})
        return onnx.load_from_string(buffer.getvalue())
    program = torch.onnx.export(module, args, dynamo=True, opset_version=18, input_names=names,
                                output_names=["output"], dynamic_shapes=tuple({0: "batch"} for _ in names),
                                optimize=True, verbose=False)
    return program.model_proto


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Setting:
    targets: list[float]
    roundings: list[str]
    methods: list[str]
    batches: list[int]
    rounds: int
    threads: int
    round_ms: float
    latency_targets: list[float]
    device: str = "cpu"
    latency_kinds: tuple[str, ...] = ("cnn", "mobile")


def inference_seconds(model: onnx.ModelProto, data: dict[str, np.ndarray], threads: int, batch: int = 32,
                      device: str = "cpu") -> float:
    """Plain inference over `data` (full optimisation, `batch` samples a run), session creation included."""
    start = time.perf_counter()
    session = make_session(model, optimize=True, threads=threads, device=device)
    count = len(next(iter(data.values())))
    for first in range(0, count, batch):
        session.run(None, {name: value[first:first + batch] for name, value in data.items()})
    return time.perf_counter() - start


def reference(model: onnx.ModelProto, calib: dict[str, np.ndarray], heldout: dict[str, np.ndarray],
              setting: Setting) -> dict[str, Any]:
    """What every run of one model is measured against: MACs and parameters; the original's latency per batch
    and the inferences a round of compare_latency times so that it lasts about `round_ms` (1 to 20); an A/A
    control, the original timed against itself exactly as the results will be (its speedup spread is the
    noise floor of this machine and these settings: a wide one means the machine was not quiet); plain
    inference over the calibration samples; and how much the output depends on the input on the held-out
    samples, ||y - mean over samples of y|| / ||y|| (near 0, cosine and rel_l2 would say little)."""
    cost = count_cost(model, resolve_input_shapes(model))
    latency = {batch: bench(model, data=heldout, batch=batch, repeat=3, warmup=1, threads=setting.threads,
                            device=setting.device)["median_ms"]
               for batch in setting.batches}
    runs = {batch: min(20, max(1, round(setting.round_ms / ms))) for batch, ms in latency.items()}
    control = {f"batch_{batch}": compare_latency(model, model, data=heldout, batch=batch, rounds=setting.rounds,
                                                 runs=runs[batch], threads=setting.threads, device=setting.device)
               for batch in setting.batches}
    outputs = make_session(model, device=setting.device).run(None, heldout)[0].astype(np.float64)
    return {"macs": cost.macs, "params": cost.params, "latency_ms": latency, "runs_per_round": runs,
            "control": control, "inference_calib_s": inference_seconds(model, calib, setting.threads,
                                                                        device=setting.device),
            "output_variation": float(np.linalg.norm(outputs - outputs.mean(axis=0)) / np.linalg.norm(outputs))}


def run_one(model: onnx.ModelProto, calib: dict[str, np.ndarray], heldout: dict[str, np.ndarray], method: str,
            target: float, rounding: str, setting: Setting, runs: dict[int, int],
            latency: bool = False) -> dict[str, Any]:
    """Optimize (to a MAC target, or with `latency` to a fraction of the measured latency at the second
    batch), then fidelity on held-out samples and speed against the original at every batch."""
    record: dict[str, Any] = {"method": method, "target": target, "round_to": rounding,
                              "budget": "target_latency" if latency else "target_macs"}
    start = time.perf_counter()
    budget = ({"target_latency": target, "bench_batch": max(setting.batches)} if latency
              else {"target_macs": target})
    try:
        result = graphopt.optimize(model, method=method, round_to=rounding, **budget,
                                   calib=calib if METHODS[method].needs_data else None, threads=setting.threads,
                                   device=setting.device, **(SNP_EARLIER if "snp" in method.split(",") else {}))
    except Exception as error:  # a method that fails on an architecture is a result to report, not a crash
        traceback.print_exc()
        return {**record, "error": f"{type(error).__name__}: {error}"}
    record["optimize_s"] = time.perf_counter() - start
    report = result.report
    record.update(macs_ratio=report["macs_ratio"], params_ratio=report["params_after"] / report["params_before"],
                  target_reached=report["target_reached"])
    if latency:
        record["latency_target"] = report.get("latency_target")
        # the latency model of the written solve: what share of the time its layer tables follow, and the probe
        record["latency_model"] = {key: value for entry in report["passes"] for key, value in entry["stats"].items()
                                   if key.startswith(("latency_share", "latency_probe", "latency_ms", "latency_head",
                                                      "latency_joint"))}
    fidelity = verify(model, result.model, heldout, batch_size=32, device=setting.device).first
    record["fidelity"] = {key: fidelity[key] for key in ("cosine", "rel_l2", "top1_agreement")}
    record["latency"] = {}
    for batch in setting.batches:
        timing = compare_latency(model, result.model, data=heldout, batch=batch, rounds=setting.rounds,
                                 runs=runs[batch], threads=setting.threads, device=setting.device)
        timing["efficiency"] = timing["speedup"] * record["macs_ratio"]
        record["latency"][f"batch_{batch}"] = timing
    record["slower"] = [b for b in setting.batches if record["latency"][f"batch_{b}"]["speedup"] < 1.0]
    return record


def _progress(record: dict[str, Any]) -> str:
    budget = " latency" if record.get("budget") == "target_latency" else ""
    head = f"  {record['method']:>9} target {record['target']:.2f}{budget} round {record['round_to']:>4}: "
    if "error" in record:
        return head + f"ERROR {record['error']}"
    speed = ", ".join(f"b{t['batch']} {t['speedup']:.2f}x (eff {t['efficiency']:.2f})"
                      for t in record["latency"].values())
    line = (head + f"MACs {record['macs_ratio']:.3f}, {speed}, cosine {record['fidelity']['cosine']:.4f}, "
            f"optimize {record['optimize_s']:.1f}s")
    return line + (f"   !!! SLOWER THAN THE ORIGINAL at batch {record['slower']}" if record["slower"] else "")


def run_architecture(name: str, exporter: str, setting: Setting, tiny: bool, samples: tuple[int, int],
                     folder: Path) -> dict[str, Any]:
    """Every method x target x rounding on one architecture from one exporter."""
    started, arch = time.perf_counter(), ARCHS[name]
    module, sampler = _seeded(arch, tiny)
    calib, heldout = sampler(samples[0], 1), sampler(samples[1], 2)
    model = export(module, sampler(1, 0), exporter, folder)
    entry: dict[str, Any] = {"arch": name, "exporter": exporter, "kind": arch.kind,
                             "size": "tiny (--quick)" if tiny else arch.size, "note": "" if tiny else arch.note,
                             "build_export_s": time.perf_counter() - started,
                             "inputs": {k: list(v.shape[1:]) for k, v in heldout.items()},
                             "calib_samples": samples[0], "heldout_samples": samples[1]}
    entry.update(reference(model, calib, heldout, setting))
    print(f"{name} [{exporter}] {entry['size']}: {entry['macs'] / 1e9:.3f} GMACs, {entry['params'] / 1e6:.2f} M "
          "params, " + ", ".join(f"batch {b} {ms:.1f} ms" for b, ms in entry["latency_ms"].items())
          + f"; inference over {samples[0]} calibration samples {entry['inference_calib_s']:.2f}s; input-dependent "
          f"output {entry['output_variation']:.2f}; A/A control "
          + ", ".join(f"b{t['batch']} {_speed_cell(t)}" for t in entry["control"].values()), flush=True)
    entry["runs"] = []
    for method in setting.methods:
        for target in setting.targets:
            for rounding in setting.roundings:
                record = run_one(model, calib, heldout, method, target, rounding, setting, entry["runs_per_round"])
                print(_progress(record), flush=True, file=sys.stderr if record.get("slower") else sys.stdout)
                entry["runs"].append(record)
        for target in setting.latency_targets if arch.kind in setting.latency_kinds else []:
            record = run_one(model, calib, heldout, method, target, "auto", setting, entry["runs_per_round"],
                             latency=True)
            print(_progress(record), flush=True, file=sys.stderr if record.get("slower") else sys.stdout)
            entry["runs"].append(record)
    entry["wall_s"] = time.perf_counter() - started
    return entry


# ------------------------------------------------------------------------------------------------ tables
def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _speed_cell(timing: dict[str, Any]) -> str:
    return f"{timing['speedup']:.2f} ({timing['speedup_p10']:.2f}-{timing['speedup_p90']:.2f})"


def _run_row(entry: dict[str, Any], record: dict[str, Any], batches: list[int]) -> list[str]:
    budget = " latency" if record.get("budget") == "target_latency" else ""
    head = [entry["arch"], entry["exporter"], record["method"], f"{record['target']:.2f}{budget}", record["round_to"]]
    if "error" in record:
        return head + ["error: " + record["error"][:80]] + [""] * (2 * len(batches) + 5)
    timings = [record["latency"][f"batch_{b}"] for b in batches]
    flags = [f"**SLOWER b{b}**" for b in record["slower"]]
    flags += ["target missed"] if record["target_reached"] is False else []
    return head + [f"{record['macs_ratio']:.3f}", *(_speed_cell(t) for t in timings),
                   *(f"{t['efficiency']:.2f}" for t in timings), f"{record['fidelity']['cosine']:.4f}",
                   f"{record['fidelity']['rel_l2']:.3f}", _top1(record["fidelity"]["top1_agreement"]),
                   f"{record['optimize_s']:.1f}", ", ".join(flags)]


def _top1(agreement: float | None) -> str:
    return "-" if agreement is None else f"{agreement:.3f}"


def runs_table(entries: list[dict[str, Any]], batches: list[int]) -> str:
    headers = ["arch", "exporter", "method", "target", "round", "MACs",
               *(f"speedup b{b} (p10-p90)" for b in batches), *(f"eff b{b}" for b in batches),
               "cosine", "rel_l2", "top-1 agree", "optimize s", "flags"]
    return _markdown(headers, [_run_row(e, r, batches) for e in entries for r in e["runs"]])


def _optimize_time(entry: dict[str, Any], method: str) -> str:
    """The median time `method` took to optimize, and its multiple of plain inference over the calibration set."""
    times = [r["optimize_s"] for r in entry["runs"] if r["method"] == method and "optimize_s" in r]
    if not times:
        return "-"
    median = statistics.median(times)
    return f"{median:.1f} ({median / entry['inference_calib_s']:.0f}x)"


def architecture_table(entries: list[dict[str, Any]], methods: list[str]) -> str:
    """Per architecture: size, the original's latency, and optimize time against plain inference."""
    rows = []
    for entry in entries:
        medians = [_optimize_time(entry, method) for method in methods]
        rows.append([entry["arch"], entry["exporter"], entry["size"] + (f"; {entry['note']}" if entry["note"] else ""),
                     f"{entry['macs'] / 1e9:.3f}", f"{entry['params'] / 1e6:.2f}",
                     " / ".join(f"{ms:.1f}" for ms in entry["latency_ms"].values()),
                     " / ".join(_speed_cell(t) for t in entry["control"].values()),
                     f"{entry['output_variation']:.2f}", f"{entry['inference_calib_s']:.2f}", *medians,
                     f"{entry['wall_s'] / 60:.1f}"])
    headers = ["arch", "exporter", "size", "GMACs", "M params", "original ms (batches)",
               "A/A control (batches)", "input-dependent output",
               "inference over calib s", *(f"optimize {m} s (x inference)" for m in methods), "bench min"]
    return _markdown(headers, rows)


# -------------------------------------------------------------------------------------------------- main
def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=_list, default=None, help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--methods", type=_list, default=["magnitude", "snp"])
    parser.add_argument("--targets", type=_list, default=None,
                        help="MAC fractions (default 0.7,0.5; none: only the --latency-targets runs)")
    parser.add_argument("--roundings", type=_list, default=["1", "auto"], help="--round-to values (1: exact counts)")
    parser.add_argument("--exporters", type=_list, default=["legacy"], help="legacy, dynamo or both")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison (default 12)")
    parser.add_argument("--round-ms", type=float, default=100.0,
                        help="inferences per round chosen so that a round of the original lasts about this long")
    parser.add_argument("--batch", type=int, default=8, help="the batch timed besides batch 1")
    parser.add_argument("--latency-targets", type=lambda text: [float(t) for t in _list(text)], default=[0.6],
                        help="--target-latency runs (round auto) on --latency-kinds, as fractions of the latency at "
                             "--batch "
                             "(default 0.6; empty to skip)")
    parser.add_argument("--latency-kinds", type=_list, default=["cnn", "mobile"],
                        help="the kinds of architecture --latency-targets runs on (default cnn,mobile; also "
                             + ", ".join(sorted({a.kind for a in ARCHS.values()} - {"cnn", "mobile"})) + ")")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where calibration, fidelity and timings run (cuda: onnxruntime-gpu's CUDA provider)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration samples (default 64)")
    parser.add_argument("--heldout-samples", type=int, default=None, help="held-out samples (default 16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny widths and inputs, one architecture "
                        "per kind, target 0.5, 3 rounds, 16 calibration samples")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default bench/results/speed.json; speed_quick.json with --quick)")
    args = parser.parse_args(argv)
    unknown = [name for name in (args.archs or []) if name not in ARCHS]
    unknown += [name for name in args.methods if name not in METHODS]
    unknown += [name for name in args.exporters if name not in EXPORTERS]
    unknown += [kind for kind in args.latency_kinds if kind not in {a.kind for a in ARCHS.values()}]
    if unknown:
        parser.error(f"unknown architecture, method or exporter: {', '.join(unknown)}")
    try:
        args.roundings = [str(parse_round_to(value)) for value in args.roundings]
        none = args.targets == ["none"]  # latency targets only
        args.targets = [] if none else [float(t) for t in args.targets] if args.targets else None
    except (graphopt.GraphoptError, ValueError) as error:
        parser.error(str(error))
    if args.targets and not all(0.0 < t <= 1.0 for t in args.targets):
        parser.error("--targets must be MAC fractions in (0, 1]")
    return args


def _defaults(args: argparse.Namespace) -> None:
    """Fill what --quick changes: architectures, targets, rounds, sample counts, output file."""
    quick = args.quick
    if args.archs is None:
        kinds: dict[str, str] = {}
        for name, arch in ARCHS.items():
            kinds.setdefault(arch.kind, name)
        args.archs = list(kinds.values()) if quick else list(ARCHS)
    args.targets = args.targets if args.targets is not None else [0.5] if quick else [0.7, 0.5]
    args.rounds = args.rounds or (3 if quick else 12)
    args.calib_samples = args.calib_samples or (16 if quick else 64)
    args.heldout_samples = max(args.heldout_samples or (8 if quick else 16), args.batch)
    args.output = args.output or RESULTS / ("speed_quick.json" if quick else "speed.json")


def write_results(args: argparse.Namespace, info: dict[str, Any], entries: list[dict[str, Any]],
                  total: float) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"machine": info, "command": sys.argv, "settings": settings,
                                       "total_s": total, "architectures": entries}, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _defaults(args)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    setting = Setting(args.targets, args.roundings, args.methods, sorted({1, args.batch}), args.rounds,
                      args.threads, args.round_ms, args.latency_targets, args.device, tuple(args.latency_kinds))
    started, entries, total = time.perf_counter(), [], 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in args.archs:
            for exporter in args.exporters:
                entries.append(run_architecture(name, exporter, setting, args.quick,
                                                (args.calib_samples, args.heldout_samples), Path(folder)))
                total = time.perf_counter() - started
                write_results(args, info, entries, total)  # after every architecture: a late failure loses little
    print("\n" + runs_table(entries, setting.batches) + "\n\n" + architecture_table(entries, setting.methods))
    slower = [f"{e['arch']} [{e['exporter']}] {r['method']} {r['target']} round {r['round_to']} at batch {r['slower']}"
              for e in entries for r in e["runs"] if r.get("slower")]
    if slower:
        print("\n!!! slower than the original:\n  " + "\n  ".join(slower), file=sys.stderr)
    print(f"\n{len(entries)} architecture runs in {total / 60:.1f} min; results in {args.output}")


if __name__ == "__main__":
    main()

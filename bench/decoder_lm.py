"""The decoder's language-modelling task for the transformer benchmark: character-level next-character
prediction on the sentences of bench/text_data.py, trained here and cached, with perplexity on held-out text.

The sentences are split once (seeded) into a training part and a held-out part; each part is one stream of
characters, sentences separated by newlines. Training draws seeded random windows of `sequence` + 1
characters from the training stream (AdamW, linear warm-up then cosine decay, gradient clipping at 1.0);
calibration windows for pruning come from the training stream too, and perplexity is measured on
consecutive windows of the held-out stream: exp of the mean cross-entropy over every predicted character
(natural log), the same windows for the original and the pruned model.

Trained weights are cached as `CACHE/decoder-<key>.pt` (a state dict and what the training measured); the
key hashes everything the weights depend on (architecture, steps, batch, learning rate, seed, the text, the
source of this module and of text_models.py, torch's version), so a change retrains and a rerun skips training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from text_data import CharVocabulary, english_sentences, split, windows
from text_models import Decoder, DecoderConfig

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"  # gitignored


@dataclass(frozen=True)
class Training:
    steps: int = 1000
    batch: int = 16
    sequence: int = 128
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class Corpus:
    vocabulary: CharVocabulary
    train: np.ndarray  # character ids
    heldout: np.ndarray
    digest: str  # of both texts


def corpus(heldout_sentences: int = 1500, seed: int = 1) -> Corpus:
    """The training and held-out character streams (disjoint sentences)."""
    heldout, train = split(english_sentences(), [heldout_sentences, -1], seed)
    train_text, heldout_text = "\n".join(train), "\n".join(heldout)
    digest = hashlib.sha256((train_text + "\0" + heldout_text).encode()).hexdigest()[:16]
    vocabulary = CharVocabulary()
    return Corpus(vocabulary, vocabulary.encode(train_text), vocabulary.encode(heldout_text), digest)


def _key(config: DecoderConfig, training: Training, text: Corpus) -> str:
    code = hashlib.sha256(b"".join((HERE / name).read_bytes() for name in ("text_models.py", "decoder_lm.py")))
    fields = {"config": dataclasses.asdict(config), "training": dataclasses.asdict(training), "text": text.digest,
              "code": code.hexdigest()[:16], "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _schedule(step: int, training: Training) -> float:
    if step < training.warmup:
        return (step + 1) / training.warmup
    progress = (step - training.warmup) / max(1, training.steps - training.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(module: Decoder, text: Corpus, training: Training) -> dict[str, Any]:
    """Train in place; returns the seconds it took and the mean loss of the last 50 steps."""
    batches = windows(text.train, training.sequence, training.steps * training.batch, training.seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=training.lr, weight_decay=training.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, training))
    start, losses = time.perf_counter(), []
    module.train()
    for step in range(training.steps):
        chunk = torch.from_numpy(batches[step * training.batch:(step + 1) * training.batch])
        logits = module(chunk[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == training.steps - 1:
            log.info("decoder step %d/%d: loss %.3f", step, training.steps, losses[-1])
    module.eval()
    return {"train_s": time.perf_counter() - start, "final_train_loss": float(np.mean(losses[-50:]))}


def trained_decoder(config: DecoderConfig, training: Training, text: Corpus,
                    cache: Path = CACHE) -> tuple[Decoder, dict[str, Any]]:
    """The decoder trained on `text`, from the cache when it holds these exact settings."""
    path = cache / f"decoder-{_key(config, training, text)}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        module = Decoder(config)
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            module.load_state_dict(saved["state"])
            return module.eval(), {**json.loads(saved["info"]), "cached": str(path)}
        info = train(module, text, training)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state": module.state_dict(), "info": json.dumps(info)}, path)
    return module, {**info, "cached": None}


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of next-token logits [N, T, V] against targets [N, T], in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    chosen = np.take_along_axis(log_probs, targets[..., None], axis=-1)
    return float(np.exp(-chosen.mean()))

"""Train a small CNN on scikit-learn's bundled 8x8 digits and write the committed sample files.

Writes next to this script:
  digits_cnn.onnx          legacy exporter, opset 17, BatchNormalization kept unfused, input "input"
                           [batch, 1, 8, 8] float32 in [0, 1], output "output" logits [batch, 10]
  digits_calib.npz         {"input": 256 training images}, the calibration-data contract
                           (one array per graph input, keyed by input name)
  digits_eval.npz          {"input": held-out test images}
  digits_eval_labels.npy   int64 labels of the test images

Fully offline and seeded: ``python samples/make_digits_sample.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from graphopt.torch.export import export_onnx

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
CALIBRATION_SIZE = 256
SAMPLES_DIR = Path(__file__).resolve().parent


def build_model() -> nn.Sequential:
    """Conv-BN-ReLU x2, maxpool, Conv-BN-ReLU, global average pool, two-layer classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def load_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 [N, 1, 8, 8] scaled to [0, 1]; stratified 80/20 train/test split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=SEED)


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> None:
    inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(inputs), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
        schedule.step()
    model.eval()


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(["output"], {"input": images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def annotate(path: Path) -> None:
    """Attach a doc string and metadata that tools are expected to carry through optimisation."""
    model = onnx.load(path)
    model.doc_string = "Small CNN classifying 8x8 handwritten digits (scikit-learn digits), BN unfused."
    classes = ",".join(str(digit) for digit in range(10))
    onnx.helper.set_model_props(model, {"dataset": "sklearn digits", "classes": classes})
    onnx.save(model, path)


def main() -> None:
    torch.manual_seed(SEED)
    train_images, test_images, train_labels, test_labels = load_splits()
    model = build_model()
    started = time.perf_counter()
    train(model, train_images, train_labels)
    print(f"trained {EPOCHS} epochs on {len(train_images)} images in {time.perf_counter() - started:.1f} s")
    with torch.no_grad():
        torch_accuracy = float((model(torch.from_numpy(test_images)).argmax(1).numpy() == test_labels).mean())

    model_path = export_onnx(model, torch.from_numpy(train_images[:2]), SAMPLES_DIR / "digits_cnn.onnx",
                             exporter="legacy", opset=17, fold_bn=False)
    annotate(model_path)
    calibration = np.random.default_rng(SEED).permutation(len(train_images))[:CALIBRATION_SIZE]
    np.savez(SAMPLES_DIR / "digits_calib.npz", input=train_images[calibration])
    np.savez(SAMPLES_DIR / "digits_eval.npz", input=test_images)
    np.save(SAMPLES_DIR / "digits_eval_labels.npy", test_labels)

    print(f"test accuracy on {len(test_images)} held-out images: torch {torch_accuracy:.4f}, "
          f"onnxruntime {onnx_accuracy(model_path, test_images, test_labels):.4f}")
    print(f"wrote {model_path} ({model_path.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()

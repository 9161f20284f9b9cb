"""A YOLO-style detector trained here on rendered shapes, pruned without retraining.

Model: a small YOLOv8-like detector written in torch (no torchvision): Conv+BatchNorm+SiLU stem and
downsampling convs, C2f blocks (a 1x1 conv split in two halves, bottlenecks chained on the second half, all
halves concatenated into a 1x1 conv; residual bottlenecks in the backbone), SPPF (three chained 5x5 max pools,
concatenated), a PAN neck (nearest upsampling + concat top-down, strided conv + concat bottom-up) and a
decoupled anchor-free head at strides 8, 16, 32 (a box branch of REG_MAX bins per box side and a class branch
per level). The exported graph decodes as ultralytics' export does: DFL (softmax over the bins, expectation by
a fixed 1x1 conv with arange weights), distances to centre/size boxes around constant anchor points times the
strides, sigmoid class scores; output [N, 4 + 3, anchors] (boxes cx, cy, w, h in pixels, then the scores) on
[N, 3, 128, 128] inputs in [0, 1] (torch.onnx.export, dynamo=False, opset 17, dynamic batch).

Data: scenes rendered here in numpy (seeded): a textured background (a random colour, smooth colour blobs,
pixel noise) with 1-6 objects of 3 classes (filled rectangle, filled ellipse, triangle with its apex on one of
the four sides), 10-60 px per side, random colours kept apart from the background's, overlapping partly
(at most 35% of the smaller box covered). Training draws --steps batches of fresh scenes from one stream
(seed 0); calibration scenes (--calib, default 256, seed 1) and held-out test scenes (--test, default 200,
seed 2) are separate draws, and every score is on the test scenes.

Training: centre sampling at the stride matching the object (longest side < 20 px: 8, < 40 px: 16, else 32):
the anchors within one stride of the box centre and inside the box (the nearest always), an anchor claimed
twice going to the smaller box; class targets are the IoU of the anchor's predicted box with its box,
normalised to 1 at the box's best anchor (task-aligned, lite); BCE class loss, CIoU and DFL box losses
(weights 0.5, 7.5, 1.5 as ultralytics), AdamW with warm-up and cosine decay, --threads torch threads.
The exported ONNX is cached in bench/.cache/ (gitignored) under a key of the settings and of the model,
data and training code; --retrain ignores the cache.

Metric: post-NMS detections (best class per anchor, score >= --conf 0.25, class-aware NMS at IoU 0.45, at
most 100 per image) matched greedily by descending score to reference boxes of the same class at IoU >= 0.5;
precision, recall and F1 summed over the test scenes. The goal metric is F1 against the ORIGINAL model's
detections ("F1 vs original"); F1 against the rendered ground truth is reported for the original and every
pruned model, and rel_l2 = ||pruned - original|| / ||original|| of the raw output tensor and of its score
channels alone (the whole tensor's norm is dominated by the box coordinates in pixels).

Methods (rows of METHODS, each `graphopt.optimize` at --targets of the MACs, default --round-to auto, no
retraining): magnitude (L1); snp-earlier (bench.common.SNP_EARLIER: --criterion variance
--reconstruct-target self); snp (today's defaults with data: the output ordering and the error-correcting
refit to the original); snp-sensitivity (snp with --budget-by sensitivity: the probes weigh the relative
error of the whole output, dominated by the box coordinates in pixels); snp-sensitivity-scores (the same with
`--metric detector:score_error`, the relative squared error of the score channels, which the probes then
weigh; `--metric detector:f1_vs_reference --probe-key f1` makes them weigh this benchmark's F1 instead).
Speed: each result against the original in one run (graphopt.evaluate.compare_latency: interleaved rounds,
onnxruntime CPU with full optimisation, --ort-threads threads) at batch 1 and --bench-batch (default 8) on test scenes; speedup is the
median per-round ratio with its p10-p90 spread, efficiency = speedup x MAC ratio.

    python bench/detector.py                 # train + every method at 0.7, 0.5: about 7 minutes on 2 cores,
                                             # 6 of them training (about 1 minute once bench/.cache/ holds the model)
    python bench/detector.py --methods snp --targets 0.7
    python bench/detector.py --quick         # short training, small sets, one target (a smoke run; nothing written)
    python bench/detector.py --methods snp,snp-round16 --targets 0.5 --save OUT --out OUT/detector.json
                                             # rows not run by default (EXTRA), the models written for
                                             # bench/op_profile.py and `graphopt bench A B`

Two spinning torch threads slow down about twentyfold while another process holds one of two cores: on a busy
machine train with --threads 1 (a different cache entry; about 0.26 s a step against 0.17 s).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import graphopt
from common import (SNP_EARLIER, add_speed, add_thread_arguments, methods_and_targets, optimized_row, rotation,
                    start_run)

log = logging.getLogger("detector")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"  # gitignored
SIZE = 128
CLASSES = ("rectangle", "ellipse", "triangle")
STRIDES = (8, 16, 32)
REG_MAX = 8  # DFL bins per box side: distances up to 7 strides
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    "snp-earlier": {"method": "snp", **SNP_EARLIER},
    "snp": {"method": "snp"},
    "snp-sensitivity": {"method": "snp", "budget_by": "sensitivity"},
    "snp-sensitivity-scores": {"method": "snp", "budget_by": "sensitivity", "metric": "detector:score_error"},
}
# rows run only when --methods names them: the probes weighing F1 itself (32 probe samples, then all 256
# calibration scenes) and today's defaults with every group in whole 16-channel blocks
EXTRA: dict[str, dict[str, Any]] = {
    "snp-sensitivity-f1": {"method": "snp", "budget_by": "sensitivity", "metric": "detector:f1_vs_reference",
                           "probe_key": "f1"},
    "snp-sensitivity-f1-256": {"method": "snp", "budget_by": "sensitivity", "metric": "detector:f1_vs_reference",
                               "probe_key": "f1", "probe_samples": 256},
    "snp-round16": {"method": "snp", "round_to": 16},
}
ALL = {**METHODS, **EXTRA}
CONF, NMS_IOU = 0.25, 0.45  # detection score threshold and class-aware NMS IoU (--conf, --nms-iou)
TARGETS = (0.7, 0.5)
MODEL = "yolo-shapes"  # the model column of the table


# ---------------------------------------------------------------- data

def _smooth(rng: np.random.Generator, cells: int, scale: float) -> np.ndarray:
    """[SIZE, SIZE, 3] bilinear upsampling of a cells x cells grid of N(0, scale) colours."""
    grid = rng.normal(0.0, scale, (cells, cells, 3)).astype(np.float32)
    axis = np.linspace(0, cells - 1, SIZE)
    low = np.minimum(axis.astype(int), cells - 2)
    weights = np.zeros((SIZE, cells), np.float32)  # each output row mixes two grid rows
    weights[np.arange(SIZE), low] = 1 - (axis - low)
    weights[np.arange(SIZE), low + 1] = axis - low
    return np.einsum("yi,ijc,xj->yxc", weights, grid, weights, optimize=True)


def _mask(kind: int, box: np.ndarray, rng: np.random.Generator) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixel window of `box` (x1, y1, x2, y2) and the boolean mask there of a shape whose tight bounding box
    is `box`: pixel centres inside the rectangle, the ellipse or the triangle."""
    x1, y1, x2, y2 = box
    window = (slice(int(y1), min(int(np.ceil(y2)), SIZE)), slice(int(x1), min(int(np.ceil(x2)), SIZE)))
    ys, xs = np.mgrid[window] + 0.5
    if kind == 0:
        return window, (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    if kind == 1:
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        return window, ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    # triangle: the base on one side of the box, the apex somewhere on the opposite side
    side, apex = int(rng.integers(4)), rng.uniform(0.1, 0.9)
    u = (xs - x1) / (x2 - x1) if side < 2 else (ys - y1) / (y2 - y1)  # along the base
    v = (ys - y1) / (y2 - y1) if side < 2 else (xs - x1) / (x2 - x1)  # from the apex towards the base
    v = v if side % 2 == 0 else 1.0 - v
    return window, (v >= 0) & (v <= 1) & (u >= apex * (1 - v)) & (u <= apex + (1 - apex) * v)


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One [3, SIZE, SIZE] image in [0, 1], its boxes [k, 4] (x1, y1, x2, y2 in pixels) and classes [k]."""
    background = rng.uniform(0.15, 0.85, 3)
    image = (background + _smooth(rng, int(rng.integers(3, 9)), rng.uniform(0.03, 0.12))).astype(np.float32)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(30):
            width = rng.uniform(10, 60)
            height = float(np.clip(width * np.exp(rng.uniform(-0.7, 0.7)), 10, 60))
            x1, y1 = rng.uniform(0, SIZE - width), rng.uniform(0, SIZE - height)
            box = np.array([x1, y1, x1 + width, y1 + height])
            if all(_covered(box, other) <= 0.35 for other in boxes):
                break
        else:
            continue
        colour = rng.uniform(0, 1, 3)
        while np.linalg.norm(colour - background) < 0.35:
            colour = rng.uniform(0, 1, 3)
        kind = int(rng.integers(len(CLASSES)))
        window, inside = _mask(kind, box, rng)
        image[window][inside] = colour
        boxes.append(box)
        labels.append(kind)
    image += rng.standard_normal(image.shape, np.float32) * np.float32(rng.uniform(0.01, 0.06))
    return (np.ascontiguousarray(np.clip(image, 0, 1).transpose(2, 0, 1)), np.array(boxes, np.float32),
            np.array(labels, np.int64))


def _covered(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two boxes over the smaller one's area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def scenes(count: int, seed: int | np.random.Generator) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    drawn = [scene(rng) for _ in range(count)]
    return np.stack([d[0] for d in drawn]), [(d[1], d[2]) for d in drawn]


# ---------------------------------------------------------------- model

class Conv(nn.Sequential):
    def __init__(self, inputs: int, outputs: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(outputs), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(channels, channels, 3), Conv(channels, channels, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, inputs: int, outputs: int, blocks: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.hidden = outputs // 2
        self.cv1 = Conv(inputs, 2 * self.hidden)
        self.cv2 = Conv((2 + blocks) * self.hidden, outputs)
        self.m = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        parts.extend(block(parts[-1]) for block in self.m)
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(inputs, inputs // 2), Conv(inputs // 2 * 4, outputs)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.cv1(x)]
        parts.extend(self.pool(parts[-1]) for _ in range(3))
        return self.cv2(torch.cat(parts, 1))


def anchor_points() -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres in grid units [A, 2] (x, y) and their strides [A], level by level, row-major."""
    points, strides = [], []
    for stride in STRIDES:
        cells = SIZE // stride
        ys, xs = torch.meshgrid(torch.arange(cells) + 0.5, torch.arange(cells) + 0.5, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], 1))
        strides.append(torch.full((cells * cells,), float(stride)))
    return torch.cat(points), torch.cat(strides)


class Detector(nn.Module):
    """YOLOv8-like: backbone widths `w` (stride 2, 4, 8, 16, 32), PAN neck, decoupled DFL head."""

    def __init__(self, w: tuple[int, ...] = (16, 32, 48, 64, 96), classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.classes = classes
        self.stem = nn.Sequential(Conv(3, w[0], 3, 2), Conv(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True))
        self.down3 = nn.Sequential(Conv(w[1], w[2], 3, 2), C2f(w[2], w[2], 2, True))
        self.down4 = nn.Sequential(Conv(w[2], w[3], 3, 2), C2f(w[3], w[3], 2, True))
        self.down5 = nn.Sequential(Conv(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))
        self.top4, self.top3 = C2f(w[4] + w[3], w[3]), C2f(w[3] + w[2], w[2])
        self.bottom_conv4, self.bottom4 = Conv(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3])
        self.bottom_conv5, self.bottom5 = Conv(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4])
        box, score = max(16, w[2] // 4, REG_MAX * 4), max(w[2], classes)
        levels = (w[2], w[3], w[4])
        self.box = nn.ModuleList(nn.Sequential(Conv(c, box, 3), Conv(box, box, 3), nn.Conv2d(box, 4 * REG_MAX, 1))
                                 for c in levels)
        self.score = nn.ModuleList(nn.Sequential(Conv(c, score, 3), Conv(score, score, 3), nn.Conv2d(score, classes, 1))
                                   for c in levels)
        for head in self.score:  # a low prior for the rare positives, as ultralytics initialises it
            nn.init.constant_(head[-1].bias, math.log(5 / len(CLASSES) / (SIZE / 8) ** 2))
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
        points, strides = anchor_points()
        self.register_buffer("points", points.T.unsqueeze(0), persistent=False)  # [1, 2, A]
        self.register_buffer("strides", strides.view(1, 1, -1), persistent=False)  # [1, 1, A]

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box bin logits [N, 4 * REG_MAX, A] and class logits [N, classes, A]."""
        p3 = self.down3(self.stem(x))
        p4 = self.down4(p3)
        p5 = self.down5(p4)
        up = nn.functional.interpolate
        t4 = self.top4(torch.cat([up(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.top3(torch.cat([up(t4, scale_factor=2.0, mode="nearest"), p3], 1))
        n4 = self.bottom4(torch.cat([self.bottom_conv4(n3), t4], 1))
        n5 = self.bottom5(torch.cat([self.bottom_conv5(n4), p5], 1))
        levels = (n3, n4, n5)
        boxes = torch.cat([head(f).flatten(2) for head, f in zip(self.box, levels)], 2)
        scores = torch.cat([head(f).flatten(2) for head, f in zip(self.score, levels)], 2)
        return boxes, scores

    def distances(self, boxes: torch.Tensor) -> torch.Tensor:
        """DFL: the expected bin per box side, [N, 4, A] (left, top, right, bottom in strides)."""
        bins = boxes.view(-1, 4, REG_MAX, boxes.shape[-1]).transpose(2, 1).softmax(1)
        return self.dfl(bins).view(-1, 4, boxes.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, scores = self.raw(x)
        left_top, right_bottom = self.distances(boxes).chunk(2, 1)
        first, last = self.points - left_top, self.points + right_bottom
        xywh = torch.cat([(first + last) / 2, last - first], 1) * self.strides
        return torch.cat([xywh, scores.sigmoid()], 1)


# ---------------------------------------------------------------- training

def _iou(a: torch.Tensor, b: torch.Tensor, complete: bool = False) -> torch.Tensor:
    """IoU (or CIoU) of boxes x1, y1, x2, y2 broadcast over leading dims (last dim 4)."""
    w1, h1 = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    w2, h2 = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    inter = ((torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(0)
             * (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(0))
    iou = inter / (w1 * h1 + w2 * h2 - inter + 1e-7)
    if not complete:
        return iou
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    centre = ((a[..., 0] + a[..., 2] - b[..., 0] - b[..., 2]) ** 2
              + (a[..., 1] + a[..., 3] - b[..., 1] - b[..., 3]) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan(w2 / (h2 + 1e-7)) - torch.atan(w1 / (h1 + 1e-7))) ** 2
    alpha = (v / (v - iou + 1 + 1e-7)).detach()
    return iou - (centre / (cw ** 2 + ch ** 2 + 1e-7) + v * alpha)


def assign(truth: list[tuple[np.ndarray, np.ndarray]], points: torch.Tensor, strides: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre sampling at the object's stride. Returns the assigned box [B, A, 4] (pixels), its class [B, A],
    its index among the image's boxes [B, A] and the positive mask [B, A]; an anchor claimed by two boxes goes
    to the smaller one."""
    count, anchors = len(truth), points.shape[0]
    most = max(1, max(len(b) for b, _ in truth))
    boxes, labels = torch.zeros(count, most, 4), torch.zeros(count, most, dtype=torch.long)
    valid = torch.zeros(count, most, dtype=torch.bool)
    for i, (b, c) in enumerate(truth):
        boxes[i, :len(b)], labels[i, :len(b)], valid[i, :len(b)] = torch.from_numpy(b), torch.from_numpy(c), True
    side = torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
    level = torch.where(side < 20, 8.0, torch.where(side < 40, 16.0, 32.0))  # [B, M]
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, M, 2]
    pixel = (points * strides[:, None])  # [A, 2]
    offset = (pixel[None, None] - centre[:, :, None]).abs()  # [B, M, A, 2]
    half = ((boxes[..., 2:] - boxes[..., :2]) / 2)[:, :, None]
    same = strides[None, None] == level[..., None]
    near = same & (offset < torch.minimum(half, level[..., None, None].expand_as(half))).all(-1)
    distance = torch.where(same, offset.square().sum(-1), torch.inf)
    nearest = torch.zeros_like(near).scatter_(2, distance.argmin(2, keepdim=True), True)
    positive = (near | nearest) & valid[..., None]  # [B, M, A]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    owner = torch.where(positive, area[..., None], torch.inf).argmin(1)  # [B, A]
    mask = positive.any(1)
    return (torch.gather(boxes, 1, owner[..., None].expand(count, anchors, 4)),
            torch.gather(labels, 1, owner), owner, mask)


def detection_loss(model: Detector, x: torch.Tensor, truth: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    raw_boxes, raw_scores = model.raw(x)
    points, strides = model.points[0].T, model.strides[0, 0]  # [A, 2], [A]
    target_box, target_class, owner, mask = assign(truth, points, strides)
    distances = model.distances(raw_boxes).transpose(1, 2)  # [B, A, 4] in strides
    predicted = torch.cat([points - distances[..., :2], points + distances[..., 2:]], -1) * strides[:, None]
    iou = _iou(predicted.detach(), target_box).clamp(0) * mask
    best = torch.zeros(iou.shape[0], int(owner.max()) + 1).scatter_reduce(1, owner, iou, "amax")
    quality = torch.where(mask, iou / best.gather(1, owner).clamp(min=1e-6), 0)  # 1 at each box's best anchor
    scores = torch.zeros_like(raw_scores.transpose(1, 2))
    scores.scatter_(2, target_class[..., None], quality[..., None])
    positives = mask.sum().clamp(min=1)
    cls = nn.functional.binary_cross_entropy_with_logits(raw_scores.transpose(1, 2), scores, reduction="sum")
    if not mask.any():
        return 0.5 * cls / positives
    box = (1 - _iou(predicted[mask], target_box[mask], complete=True)).sum()
    target = torch.cat([points[None] - target_box[..., :2] / strides[:, None],
                        target_box[..., 2:] / strides[:, None] - points[None]], -1)[mask].clamp(0, REG_MAX - 1.01)
    bins = raw_boxes.view(raw_boxes.shape[0], 4, REG_MAX, -1).permute(0, 3, 1, 2)[mask]  # [P, 4, REG_MAX]
    low = target.long()
    high_weight = target - low
    log_prob = bins.log_softmax(-1)
    dfl = -(log_prob.gather(-1, low[..., None])[..., 0] * (1 - high_weight)
            + log_prob.gather(-1, (low + 1)[..., None])[..., 0] * high_weight).mean(-1)
    return (0.5 * cls + 7.5 * box + 1.5 * dfl.sum()) / positives


def train(model: Detector, args: argparse.Namespace) -> dict[str, Any]:
    """--steps batches of --batch fresh scenes (seed 0); AdamW, linear warm-up then cosine decay."""
    start = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    model.to(memory_format=torch.channels_last).train()  # oneDNN's faster layout for training on CPU
    losses = []
    for step in range(args.steps):
        images, truth = scenes(args.batch, rng)
        loss = detection_loss(model, torch.from_numpy(images).contiguous(memory_format=torch.channels_last), truth)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  step {step}/{args.steps}: loss {np.mean(losses[-100:]):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.to(memory_format=torch.contiguous_format).eval()
    return {"train_s": time.perf_counter() - start, "final_loss": float(np.mean(losses[-100:])),
            "train_images": args.steps * args.batch}


def export(model: Detector) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is asked for on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), buffer, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _key(args: argparse.Namespace) -> str:
    code = "".join(inspect.getsource(f) for f in (_smooth, _mask, scene, _covered, scenes, Conv, Bottleneck, C2f,
                                                   SPPF, anchor_points, Detector, _iou, assign, detection_loss,
                                                   train, export))
    settings = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "threads": args.threads,
                "size": SIZE, "classes": CLASSES, "strides": STRIDES, "reg_max": REG_MAX, "torch": torch.__version__}
    return hashlib.sha256((json.dumps(settings, sort_keys=True) + code).encode()).hexdigest()[:16]


def trained_detector(args: argparse.Namespace) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The exported detector, from bench/.cache/ when these exact settings were trained before."""
    path = CACHE / f"detector-{_key(args)}.onnx"
    if path.is_file() and not args.retrain:
        info = json.loads(path.with_suffix(".json").read_text())
        return onnx.load(str(path)), {**info, "cached": str(path)}
    torch.manual_seed(0)
    model = Detector()
    print(f"training the detector ({sum(p.numel() for p in model.parameters())} parameters, {args.steps} steps of "
          f"{args.batch} scenes, {args.threads} torch threads)")
    info = train(model, args)
    exported = export(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    onnx.save(exported, str(path))
    path.with_suffix(".json").write_text(json.dumps(info))
    return exported, {**info, "cached": None}


# ---------------------------------------------------------------- evaluation

def run_model(model: onnx.ModelProto, x: np.ndarray, threads: int, batch: int = 50) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    first, last = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(last - first, 0, None), -1)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], -1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def detections(output: np.ndarray, conf: float, iou: float, most: int = 100
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes x1, y1, x2, y2; scores; classes) after class-aware greedy NMS, by descending score."""
    found = []
    for image in output.astype(np.float64):
        scores, classes = image[4:].max(0), image[4:].argmax(0)
        keep = np.flatnonzero(scores >= conf)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        boxes = np.concatenate([image[:2, keep] - image[2:4, keep] / 2, image[:2, keep] + image[2:4, keep] / 2]).T
        overlap = _pairwise_iou(boxes, boxes) * (classes[keep][:, None] == classes[keep][None])
        chosen: list[int] = []
        suppressed = np.zeros(len(keep), bool)
        for i in range(len(keep)):
            if suppressed[i]:
                continue
            chosen.append(i)
            if len(chosen) == most:
                break
            suppressed |= overlap[i] > iou
        found.append((boxes[chosen], scores[keep][chosen], classes[keep][chosen]))
    return found


def agreement(predicted: list[tuple[np.ndarray, ...]], reference: list[tuple[np.ndarray, ...]],
              threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of `predicted` against `reference` boxes (same class, IoU >= threshold, each
    reference matched at most once, predictions taken by descending score), summed over the images."""
    matched = total_predicted = total_reference = 0
    for (boxes, _scores, classes), (ref_boxes, *_rest, ref_classes) in zip(predicted, reference):
        total_predicted, total_reference = total_predicted + len(boxes), total_reference + len(ref_boxes)
        if not len(boxes) or not len(ref_boxes):
            continue
        overlap = _pairwise_iou(boxes, ref_boxes) * (classes[:, None] == ref_classes[None])
        free = np.ones(len(ref_boxes), bool)
        for row in overlap:  # rows already by descending score
            candidates = np.where(free & (row >= threshold), row, -1.0)
            if candidates.max() >= threshold:
                free[candidates.argmax()] = False
                matched += 1
    precision = matched / max(total_predicted, 1)
    recall = matched / max(total_reference, 1)
    return {"f1": 2 * precision * recall / max(precision + recall, 1e-12), "precision": precision, "recall": recall}


def score_error(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """A graphopt metric (`--metric detector:score_error`): Σ (ŝ − s)² / Σ s² over the score channels."""
    name = next(iter(reference))
    scores, found = reference[name][:, 4:].astype(np.float64), candidate[name][:, 4:].astype(np.float64)
    return {"score_error": float(np.square(found - scores).sum() / max(np.square(scores).sum(), 1e-300))}


def f1_vs_reference(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                    inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """The benchmark's measure as a graphopt metric (`--metric detector:f1_vs_reference`): F1, precision and
    recall of the candidate's detections against the reference's, at the default --conf and --nms-iou."""
    name = next(iter(reference))
    return agreement(detections(candidate[name], CONF, NMS_IOU), detections(reference[name], CONF, NMS_IOU))


def score(output: np.ndarray, context: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    found = detections(output, args.conf, args.nms_iou)
    dense = context["dense_output"]
    vs_original = agreement(found, context["dense_found"])
    vs_truth = agreement(found, context["truth"])
    return {"f1": vs_original["f1"], "precision": vs_original["precision"], "recall": vs_original["recall"],
            "truth": vs_truth, "rel_l2": float(np.linalg.norm(output - dense) / np.linalg.norm(dense)),
            "rel_l2_scores": float(np.linalg.norm(output[:, 4:] - dense[:, 4:]) / np.linalg.norm(dense[:, 4:])),
            "detections": int(sum(len(f[0]) for f in found))}


def run(method: str, target: float, context: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    result, row = optimized_row(method, target, context["model"], {"images": context["calib"]}, args.ort_threads,
                                ALL[method])
    if result is None:
        log.error("%s @ %s failed: %s", method, target, row["error"])
        return row
    if args.save is not None:
        onnx.save(result.model, str(args.save / f"{method}-{target}.onnx"))
    row.update(**score(run_model(result.model, context["test"], args.ort_threads), context, args),
               groups=_groups(result.report))
    return add_speed(row, context["model"], result.model, "images", context["test"], (1, args.bench_batch),
                     args.rounds, args.ort_threads)


def _groups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pruned channel group (the pruning pass's history): its first member, kept / size, and the share of
    the group's variance the kept units carry (SNP's `retained`; None for magnitude)."""
    return [{"group": entry.get("group"), "member": (entry.get("members") or [None])[0], "size": entry.get("size"),
             "kept": entry.get("kept"), "retained": entry.get("retained")}
            for record in report.get("passes", []) for entry in record.get("history", [])]


# ---------------------------------------------------------------- report

def _row_cells(row: dict[str, Any], dense_truth: float, bench_batch: int) -> str:
    if "error" in row:
        return f"| {MODEL} | {row['method']} | {row['target']} | error: {row['error'][:60]} | | | | | | | |"
    b1, bn = row["latency"]["batch_1"], row["latency"][f"batch_{bench_batch}"]
    return (f"| {MODEL} | {row['method']} | {row['target']} | {row['macs_ratio']:.3f} | {row['f1']:.3f} | "
            f"{row['precision']:.3f}/{row['recall']:.3f} | "
            f"{row['truth']['f1']:.3f} ({row['truth']['f1'] - dense_truth:+.3f}) | "
            f"{row['rel_l2']:.3f} / {row['rel_l2_scores']:.3f} | "
            f"{b1['speedup']:.2f}x ({b1['speedup_p10']:.2f}-{b1['speedup_p90']:.2f}) | "
            f"{bn['speedup']:.2f}x ({bn['speedup_p10']:.2f}-{bn['speedup_p90']:.2f}) | "
            f"{b1['efficiency']:.2f} / {bn['efficiency']:.2f} |")


def table(rows: list[dict[str, Any]], dense: dict[str, Any], bench_batch: int) -> str:
    head = ("| model | method | target | MACs | F1 vs original | P/R vs original | F1 vs truth (drop) | "
            f"rel_l2 all / scores | speedup b1 (p10-p90) | speedup b{bench_batch} (p10-p90) | "
            f"efficiency b1 / b{bench_batch} |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    first = (f"| {MODEL} | original | - | 1.000 | 1.000 | 1.000/1.000 | {dense['truth']['f1']:.3f} | 0 / 0 | "
             "1.00x | 1.00x | 1.00 / 1.00 |\n")
    return head + first + "\n".join(_row_cells(r, dense["truth"]["f1"], bench_batch) for r in rows) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(ALL)}")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="also write the original (original.onnx) and every result (METHOD-TARGET.onnx) there")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated MAC fractions")
    parser.add_argument("--calib", type=int, default=256, help="calibration scenes (seed 1)")
    parser.add_argument("--test", type=int, default=200, help="held-out test scenes (seed 2)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="training batch (fresh scenes each step)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    parser.add_argument("--retrain", action="store_true", help="train even when bench/.cache/ holds the model")
    parser.add_argument("--conf", type=float, default=CONF, help="score threshold of a detection")
    parser.add_argument("--nms-iou", type=float, default=NMS_IOU, help="class-aware NMS IoU")
    parser.add_argument("--bench-batch", type=int, default=8, help="the second timing batch")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per batch")
    add_thread_arguments(parser)
    parser.set_defaults(threads=2, ort_threads=2)
    parser.add_argument("--quick", action="store_true", help="300 training steps, 32 calibration and 50 test "
                                                             "scenes, target 0.7, 3 timing rounds; nothing written")
    parser.add_argument("--out", type=Path, default=RESULTS / "detector.json", help="JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.calib, args.test, args.rounds, args.targets = 300, 32, 50, 3, "0.7"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods, targets = methods_and_targets(args.methods, args.targets, ALL)
    info = start_run(args)
    start = time.perf_counter()
    model, training = trained_detector(args)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(args.save / "original.onnx"))
    macs = graphopt.optimize(model, method="none").report["macs_before"]
    origin = f"cached {training['cached']}" if training["cached"] else "trained now"
    print(f"detector: {training['train_s']:.0f} s of training ({origin}), {macs / 1e6:.1f} MMACs per image")
    calib, _ = scenes(args.calib, 1)
    test, truth = scenes(args.test, 2)
    dense_output = run_model(model, test, args.ort_threads)
    dense_found = detections(dense_output, args.conf, args.nms_iou)
    context = {"model": model, "calib": calib, "test": test, "truth": truth, "dense_output": dense_output,
               "dense_found": dense_found}
    dense = {"truth": agreement(dense_found, truth), "detections": int(sum(len(f[0]) for f in dense_found)),
             "objects": int(sum(len(t[0]) for t in truth)), "macs": macs}
    print(f"original vs truth: F1 {dense['truth']['f1']:.3f} (P {dense['truth']['precision']:.3f}, R "
          f"{dense['truth']['recall']:.3f}), {dense['detections']} detections of {dense['objects']} objects in "
          f"{args.test} test scenes")
    rows = []
    for method, target in rotation(methods, targets):
        row = run(method, target, context, args)
        rows.append(row)
        if "error" in row:
            print(f"{method} @ {target}: {row['error']}", flush=True)
            continue
        print(f"{method} @ {target}: MACs {row['macs_ratio']:.3f}, F1 vs original {row['f1']:.3f}, vs truth "
              f"{row['truth']['f1']:.3f}, rel_l2 {row['rel_l2']:.3f}, speedup "
              f"{row['latency']['batch_1']['speedup']:.2f}x, {row['seconds']:.0f} s", flush=True)
    rows.sort(key=lambda r: (-r["target"], methods.index(r["method"])))
    text = table(rows, dense, args.bench_batch)
    total = time.perf_counter() - start
    print("\n" + text + f"\ntotal runtime {total:.0f} s")
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                        "methods": {m: ALL[m] for m in methods}, "training": training, "dense": dense, "rows": rows,
                                        "table": text, "total_seconds": total}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

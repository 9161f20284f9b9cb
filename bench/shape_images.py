"""A small colour image set harder than digits, generated offline: ten shape classes under nuisances.

Each image is S x S RGB (float32 in [0, 1] before noise, channels first): a dark background of a random
colour (each channel in [0, `DARK`]) with a linear gradient, one shape of the image's class drawn
anti-aliased in a random bright colour (each channel in [`BRIGHT`, 1]) at a random position, size and
rotation (within ±`MAX_TURN` degrees, so a plus never becomes an x), `DOTS` small bright distractor dots, and
Gaussian pixel noise of a random level. The class is the shape alone:

    0 disc, 1 ring, 2 square, 3 square outline, 4 triangle, 5 plus, 6 three parallel bars, 7 two discs,
    8 half disc, 9 ellipse

Deterministic for a seed; classes are balanced (sample i has class i mod 10 before shuffling).

    from shape_images import shape_images
    x, y = shape_images(6000, size=24, seed=0)   # x: [6000, 3, 24, 24] float32, y: [6000] int64
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disc", "ring", "square", "square outline", "triangle", "plus", "bars", "two discs", "half disc",
           "ellipse")
MAX_TURN = 20.0  # degrees
# Shapes are brighter than their background: a network of radial activations (TSRA) computes an odd function
# of its input up to biases, which makes classes drawn in either contrast polarity hard for it.
DARK, BRIGHT = 0.4, 0.5
DOTS, DOT_RADIUS = 3, 1.5  # distractors: bright dots of this radius (pixels)


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _distance(label: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels; negative inside) to shape `label` of radius r at the origin."""
    p = np.hypot(u, v)
    if label == 0:
        return p - r
    if label == 1:
        return np.abs(p - 0.72 * r) - 0.24 * r
    if label == 2:
        return _box(u, v, 0.8 * r, 0.8 * r)
    if label == 3:
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.72 * r) - 0.18 * r
    if label == 4:
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.max([np.cos(a) * u + np.sin(a) * v for a in angles], axis=0) - 0.5 * r
    if label == 5:
        return np.minimum(_box(u, v, r, 0.24 * r), _box(u, v, 0.24 * r, r))
    if label == 6:
        return np.min([_box(u - k * 0.66 * r, v, 0.17 * r, r) for k in (-1, 0, 1)], axis=0)
    if label == 7:
        return np.minimum(np.hypot(u - 0.55 * r, v) - 0.42 * r, np.hypot(u + 0.55 * r, v) - 0.42 * r)
    if label == 8:
        return np.maximum(np.hypot(u, v + 0.4 * r) - r, -(v + 0.4 * r))
    return (np.hypot(u / r, v / (0.45 * r)) - 1.0) * 0.45 * r


def _colour(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, 3)


def shape_images(count: int, size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` images [count, 3, size, size] (float32) and their classes [count] (int64)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    grid = np.arange(size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for index, label in enumerate(labels):
        background = _colour(rng, 0.0, DARK)
        foreground = _colour(rng, BRIGHT, 1.0)
        slope = rng.normal(0.0, 0.25, 2) / size
        shade = (xs - size / 2) * slope[0] + (ys - size / 2) * slope[1]
        image = background[:, None, None] + shade[None]
        radius = rng.uniform(0.2, 0.33) * size
        centre = rng.uniform(radius * 0.9, size - radius * 0.9, 2)
        turn = np.deg2rad(rng.uniform(-MAX_TURN, MAX_TURN))
        dx, dy = xs - centre[0], ys - centre[1]
        u, v = np.cos(turn) * dx + np.sin(turn) * dy, -np.sin(turn) * dx + np.cos(turn) * dy
        alpha = np.clip(0.5 - _distance(int(label), u, v, radius), 0.0, 1.0)
        image = image * (1.0 - alpha) + foreground[:, None, None] * alpha
        for _ in range(DOTS):
            dot = rng.uniform(0, size, 2)
            spot = np.clip(DOT_RADIUS - np.hypot(xs - dot[0], ys - dot[1]), 0.0, 1.0)
            image = image * (1.0 - spot) + _colour(rng, BRIGHT, 1.0)[:, None, None] * spot
        image = image + rng.normal(0.0, rng.uniform(0.05, 0.15), image.shape)
        images[index] = image
    return images, labels.astype(np.int64)

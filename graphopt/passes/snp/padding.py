"""The moments of what a zero-padded convolution reads: its input's rows and the padding's zeros.

Calibration measures the mean μ and covariance Σ of a consumer's input over the rows of the tensor.
A Conv with zero padding reads, at each (output position, kernel tap), either a row of its input map
or a padded zero. With w the fraction of those reads that land inside the map (a product over the
spatial axes) and every read weighted alike, the moments of the reads are

    μ' = w μ,    Σ' = w Σ + w (1 − w) μ μᵀ.

Relations without an offset (zero units, copies, linear combinations of other units) hold at the
padded zeros too: they stay exactly redundant in (μ', Σ') and their reconstruction stays exact. A unit
constant at c ≠ 0 on the map is 0 in the padding, so to the consumer it carries the variance
w (1 − w) c²: it is not redundant, and removing it costs the border error its variance measures. The
reconstruction fitted on these moments is the least-squares fit over the consumer's reads, the
constant term included (the consumer's bias adds it at every read, padded or not). w = 1 for every
other consumer, for a Conv without padding, and where the input's spatial size is unknown.
Paired reads (the original model's input x beside the pruned model's y, graphopt.calibration.paired)
land in the padding at the same places, where both are 0: μ'_x = w μ_x, μ'_y = w μ_y and
Σ'_xy = w Σ_xy + w (1 − w) μ_x μ_yᵀ.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.analysis.groups import Analysis, Site
from graphopt.calibration.paired import PairedStats
from graphopt.calibration.stats import TensorStats


def _inside(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> float:
    """The fraction of one spatial axis's (output index, tap) reads that land inside the input."""
    outputs = (size + begin + end - dilation * (kernel - 1) - 1) // stride + 1
    if outputs <= 0:
        return 1.0
    reads = (np.arange(outputs) * stride - begin)[:, None] + np.arange(kernel)[None, :] * dilation
    return float(np.mean((reads >= 0) & (reads < size)))


def _pads(attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
          dilations: list[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, from `pads` or `auto_pad`."""
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        found = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            found.append((small, large) if auto == "SAME_UPPER" else (large, small))
        return found
    pads = [int(p) for p in attrs.get("pads", [])] if auto != "VALID" else []
    if len(pads) != 2 * len(spatial):
        return [(0, 0)] * len(spatial)
    return list(zip(pads[:len(spatial)], pads[len(spatial):]))


def conv_inside_fraction(attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> float:
    """The fraction of a Conv's (output position, tap) reads inside an input map of size `spatial`."""
    strides = [int(s) for s in attrs.get("strides", [1] * len(kernel))]
    dilations = [int(d) for d in attrs.get("dilations", [1] * len(kernel))]
    pads = _pads(attrs, spatial, kernel, strides, dilations)
    return math.prod(_inside(*axis) for axis in zip(spatial, kernel, strides, dilations, *zip(*pads)))


def inside_fraction(analysis: Analysis, site: Site) -> float:
    """The fraction w of a consumer's reads of its input that are rows of the input, not padding."""
    node = site.node
    shape = analysis.shape(node.inputs[0])
    if node.op != "Conv" or shape is None:
        return 1.0
    kernel = tuple(int(k) for k in np.asarray(node.inputs[1].values).shape[2:])
    spatial = tuple(shape[2:])
    if len(spatial) != len(kernel) or not all(isinstance(d, int) and d > 0 for d in spatial):
        return 1.0
    return conv_inside_fraction(node.attrs, spatial, kernel)


def read_moments(stats: TensorStats, inside: float) -> tuple[np.ndarray, np.ndarray]:
    """(Σ', μ') of the reads, for a consumer whose reads land inside its input a fraction `inside`."""
    cov, mean = stats.covariance(), stats.mean
    if inside >= 1.0:
        return cov, mean
    return inside * cov + inside * (1.0 - inside) * np.outer(mean, mean), inside * mean


def paired_read_moments(stats: PairedStats, inside: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(Σ'_xy, Σ'_yy, μ'_x, μ'_y) of paired reads landing inside the input a fraction `inside`."""
    cross, cov, reference_mean, mean = stats.cross_covariance(), stats.covariance(), stats.reference_mean, stats.mean
    if inside >= 1.0:
        return cross, cov, reference_mean, mean
    border = inside * (1.0 - inside)
    return (inside * cross + border * np.outer(reference_mean, mean), inside * cov + border * np.outer(mean, mean),
            inside * reference_mean, inside * mean)

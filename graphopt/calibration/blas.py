"""BLAS kernels behind the statistics: Gram updates of row blocks, and how many BLAS threads to use.

Accumulators keep only the upper triangle of a symmetric C×C matrix (column-major, float64); `symmetric`
makes the full matrix from it.

Chunk Grams (`chunk_gram`) are computed in the precision of the activations: float64 rows go through
dsyrk, float32 (and narrower) rows through ssyrk in blocks of at most FLOAT32_GRAM_ROWS rows, each block's
float32 result added to the float64 accumulator. ssyrk runs 1.8x faster than dsyrk on the 2-core Xeon
(Sapphire Rapids, OpenBLAS) where graphopt is benchmarked, and the Gram updates are most of calibration's
arithmetic. Error: each entry of a block's Gram is a float32 dot product of at most FLOAT32_GRAM_ROWS terms,
so |error| ≤ FLOAT32_GRAM_ROWS · 2⁻²⁴ · Σ|y_i y_j| ≈ 1.2e-4 · Σ|y_i y_j| in the worst case and about
√FLOAT32_GRAM_ROWS · 2⁻²⁴ ≈ 3e-6 of it for rounding errors of random sign (the blocks' errors are
independent, so the relative error does not grow with the number of rows); the rows are centred on the
block's own mean first, so a mean far larger than the spread costs no accuracy. A float32 activation carries
a relative rounding error of 6e-8 of its own, and the statistics are estimates from a sample of the data,
so no method built on them can tell the two apart.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ContextManager

import numpy as np

try:  # imported here, not where it is used: a BLAS library first loaded inside `single_threaded_blas` escapes the
    # limit (threadpoolctl limits the libraries loaded when it is entered), and two accumulation workers each
    # running a threaded syrk on 2 cores took 35% longer (17 s more CPU on ResNet-50 calibration)
    from scipy.linalg import blas as scipy_blas
except ImportError:  # scipy is optional: numpy's matmul computes the same products (the full matrix)
    scipy_blas = None

FLOAT32_GRAM_ROWS = 2048  # rows per float32 block product (bounds the float32 summation length)
LARGE_FACTORISATION = 1024  # features from which dense factorisations get every BLAS thread


def symmetric(upper: np.ndarray) -> np.ndarray:
    """The full matrix from an accumulator whose upper triangle is authoritative."""
    full = np.triu(upper)
    full += np.tril(full.T, -1)
    return full


def syrk_update(square: np.ndarray, chunk: np.ndarray) -> None:
    """square += chunkᵀ chunk on the upper triangle, in place (BLAS syrk: half the work of a matmul); chunk is
    float64."""
    if scipy_blas is None:
        square += chunk.T @ chunk
        return
    scipy_blas.dsyrk(1.0, chunk.T, beta=1.0, c=square, trans=0, lower=0, overwrite_c=1)


def syr2_update(square: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """square += x yᵀ + y xᵀ on the upper triangle, in place (BLAS syr2)."""
    if scipy_blas is None:
        cross = np.outer(x, y)
        square += cross + cross.T
        return
    updated = scipy_blas.dsyr2(1.0, x, y, lower=0, a=square, overwrite_a=1)
    if updated is not square:  # not Fortran-ordered: f2py worked on a copy
        square[...] = updated


def add_shifted(square: np.ndarray, shifted_sum: np.ndarray, count: int, delta: np.ndarray) -> None:
    """Move sums of rows about one shift onto another: with Σ (x − K') = s', Σ (x − K')(x − K')ᵀ in `square`
    and d = K' − K, Σ (x − K)(x − K)ᵀ = S' + s' dᵀ + d s'ᵀ + n' d dᵀ (a rank-2 update; `shifted_sum` is s')."""
    if np.any(delta):
        syr2_update(square, delta, shifted_sum + 0.5 * count * delta)


def chunk_gram(square: np.ndarray, rows: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Add Σ (x − K)(x − K)ᵀ over `rows` (n, C) to the float64 upper-triangle accumulator `square`, K = `shift`
    (float64); returns Σ (x − K). float64 rows go through dsyrk; narrower ones through ssyrk block by block,
    each block centred on its own mean and moved onto K exactly in float64 (`add_shifted`)."""
    if rows.dtype == np.float64:
        centred = rows - shift
        syrk_update(square, centred)
        return centred.sum(axis=0)
    total = np.zeros(rows.shape[1])
    for start in range(0, rows.shape[0], FLOAT32_GRAM_ROWS):
        block = rows[start:start + FLOAT32_GRAM_ROWS]
        count = block.shape[0]
        raw_sum = block.sum(axis=0, dtype=np.float64)
        local = (raw_sum / count).astype(np.float32)
        square += _float32_gram(np.subtract(block, local, dtype=np.float32))
        local64 = local.astype(np.float64)
        block_sum = raw_sum - count * local64  # Σ (x − local), float64 from the exact sum
        add_shifted(square, block_sum, count, local64 - shift)
        total += raw_sum - count * shift
    return total


_buffers = threading.local()
BUFFER_BYTES = 64 << 20  # float32 Gram buffers each thread keeps, one per width, at most


def _float32_gram(centred: np.ndarray) -> np.ndarray:
    """centredᵀ centred in float32 (upper triangle valid, column-major), written into this thread's buffer for
    the width, which the next call overwrites: no C×C allocation per block (syrk never writes the lower
    triangle, so it stays zero). The buffers are dropped when a new width would pass BUFFER_BYTES."""
    if scipy_blas is None:
        return centred.T @ centred
    channels = centred.shape[1]
    held: dict[int, np.ndarray] = getattr(_buffers, "grams", None) or {}
    buffer = held.get(channels)
    if buffer is None:
        if sum(b.nbytes for b in held.values()) + 4 * channels * channels > BUFFER_BYTES:
            held = {}
        buffer = held[channels] = np.zeros((channels, channels), dtype=np.float32, order="F")
        _buffers.grams = held
    return scipy_blas.ssyrk(1.0, centred.T, beta=0.0, c=buffer, trans=0, lower=0, overwrite_c=1)


def blas_for(size: int) -> ContextManager[Any]:
    """BLAS threads for dense factorisations of matrices of `size` features: every thread from
    LARGE_FACTORISATION up (SNP's ordering of a 1024- or 2048-unit group ran 1.2x and 1.3x to 1.7x faster with
    two threads than with one on 2 cores), one thread below, where the work is too small to share."""
    return contextlib.nullcontext() if size >= LARGE_FACTORISATION else single_threaded_blas()


def single_threaded_blas() -> ContextManager[Any]:
    """BLAS limited to one thread while accumulating. OpenBLAS's threaded syrk is slower than its
    single-threaded one on these tall, narrow blocks (measured 1.1x to 40x on 2 cores), so parallelism
    comes from accumulating different tensors on different workers instead."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own threading
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")

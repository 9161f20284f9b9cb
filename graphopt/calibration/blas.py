"""BLAS kernels behind the statistics: Gram updates of row blocks, and how many BLAS threads to use.

Accumulators keep only the upper triangle of a symmetric C×C matrix (column-major, float64); `symmetric`
makes the full matrix from it. `chunk_gram` converts rows to float64 and runs syrk: float32 products
(ssyrk, 1.8x faster here) would leave the Gram a rounding error of about 3e-6 relative, enough to blur the
exactly zero variance of a redundant channel or direction that SNP's and CoB's exact removals detect.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ContextManager

import numpy as np

try:  # imported here, not where it is used: a BLAS library first loaded inside `single_threaded_blas` escapes the
    # limit (threadpoolctl limits the libraries loaded when it is entered), and two accumulation workers would
    # each run a threaded syrk
    from scipy.linalg import blas as scipy_blas
except ImportError:  # scipy is optional: numpy's matmul computes the same products (the full matrix)
    scipy_blas = None

LARGE_FACTORISATION = 1024  # features from which dense factorisations get every BLAS thread


def symmetric(upper: np.ndarray) -> np.ndarray:
    """The full matrix from an accumulator whose upper triangle is authoritative."""
    full = np.triu(upper)
    full += np.tril(full.T, -1)
    return full


_scratch = threading.local()


def syrk_update(square: np.ndarray, chunk: np.ndarray) -> None:
    """square += chunkᵀ chunk on the upper triangle at least, in place; chunk is float64 and square is
    column-major.

    A block with at least as many rows as channels goes to numpy, which computes a matrix times its own
    transpose by BLAS syrk and releases the GIL while it runs, so two accumulation workers multiply in
    parallel (scipy's dsyrk wrapper, as fast on one thread, holds the GIL: two workers took as long as one).
    numpy writes the whole product into a scratch matrix of the calling thread (one per width, reused),
    added as its transpose so that both are read in column order. A thinner block goes to scipy's dsyrk,
    which adds into the upper triangle in place: there the C x C copy and addition would cost more than
    the product."""
    width = square.shape[0]
    if scipy_blas is not None and chunk.shape[0] < width:
        scipy_blas.dsyrk(1.0, chunk.T, beta=1.0, c=square, trans=0, lower=0, overwrite_c=1)
        return
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(width)
    if buffer is None:
        buffer = buffers[width] = np.empty((width, width))
    np.matmul(chunk.T, chunk, out=buffer)
    square += buffer.T  # symmetric: the transpose is the same matrix, read in square's (column) order


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
    """Add Σ (x − K)(x − K)ᵀ over `rows` (n, C, any float dtype) to the float64 upper-triangle accumulator
    `square`, K = `shift` (float64), in float64; returns Σ (x − K)."""
    centred = np.subtract(rows, shift, dtype=np.float64)
    syrk_update(square, centred)
    return centred.sum(axis=0)


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

"""Trailing padding cut from token batches before they run.

Calibration data for a text model is usually padded to one length (128 tokens where sentences average
about 20), and every run over it — statistics, the refit's staged runs, the fidelity check, `--repair`'s
references and training steps — would spend most of its time on padding. Where the model reads an attention
mask (graphopt.calibration.mask) whose sequence axis is dynamic, a batch of rows can run only up to its last
counted position L: every input declared with the mask's sequence symbol is cut to its first L positions.
Token statistics already leave padded rows out, so they lose nothing.

What the model computes at the positions it still runs is unchanged when padding is masked inside it (a
position attends only to counted ones, pooling weighs positions by the mask). That is checked, not assumed:
`plan_trim` runs the model (graph optimisations disabled) on a batch that has padding to cut, whole and cut,
and trims only where every output agrees — along an axis as long as the sequence, on the positions still run —
within TOLERANCE of the output's largest magnitude (the two runs differ by floating-point reassociation
only). A model that pools or normalises over padded positions, or whose outputs change shape any other way,
keeps its batches whole, with the reason. Padding in front of the tokens (left-padded batches) is not cut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import onnx

from graphopt.calibration.mask import MaskChoice
from graphopt.calibration.session import make_session
from graphopt.ir.shapes import declared_symbol, input_specs

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |whole − cut| difference accepted, relative to the output's largest magnitude

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Trim:
    """Cut each feed after its last position the `mask` input counts; `axes`: the sequence axis of every
    input that has one (the mask's included)."""

    mask: MaskChoice
    axes: tuple[tuple[str, int], ...]

    def length(self, feed: Feed) -> int | None:
        """The positions this feed runs (at least 1), None where the feed has no mask of rank 2."""
        values = feed.get(self.mask.name) if self.mask.name is not None else None
        if values is None or np.ndim(values) != 2:
            return None
        counted = np.flatnonzero(self.mask.kept(np.asarray(values)).any(axis=0))
        return int(counted[-1]) + 1 if counted.size else 1

    def apply(self, feed: Feed) -> dict[str, np.ndarray]:
        """`feed` with every sequence axis cut to `length` (the feed itself where nothing is cut)."""
        length = self.length(feed)
        whole = np.shape(feed[self.mask.name])[1] if length is not None else None
        if length is None or length >= whole:
            return dict(feed)
        cut = dict(feed)
        for name, axis in self.axes:  # an input may have the symbol on several axes ([batch, sequence, sequence])
            value = cut.get(name)
            if value is not None and np.ndim(value) > axis and value.shape[axis] == whole:
                cut[name] = value[(slice(None),) * axis + (slice(0, length),)]
        return cut


@dataclass(frozen=True)
class TrimPlan:
    """Whether batches are cut (`trim`), the share of token positions they then run, and why not where not."""

    trim: Trim | None
    positions_run: float | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"trimmed": self.trim is not None}
        if self.trim is not None:
            found.update(inputs=[name for name, _ in self.trim.axes], positions_run=round(self.positions_run or 1.0, 4))
        else:
            found["reason"] = self.reason
        return found


def sequence_axes(model: onnx.ModelProto, mask: str) -> tuple[tuple[str, int], ...] | str:
    """Every input axis declared with the mask's sequence symbol (axis 1 of the mask), or why none can be cut."""
    specs = {spec.name: spec for spec in input_specs(model)}
    shape = specs[mask].shape if mask in specs else ()
    if len(shape) != 2:
        return f"the mask input '{mask}' is not declared [batch, sequence]"
    symbol = declared_symbol(shape[1]) if isinstance(shape[1], str) else None
    if symbol is None:
        return f"the mask input's sequence axis is {'fixed' if isinstance(shape[1], int) else 'unnamed'}"
    return tuple((spec.name, axis) for spec in specs.values() for axis, dim in enumerate(spec.shape)
                 if isinstance(dim, str) and declared_symbol(dim) == symbol)


def plan_trim(model: onnx.ModelProto, mask: MaskChoice, feeds: Iterable[Feed], device: str = "cpu") -> TrimPlan:
    """Whether `feeds` (every batch of the data, whole) may run cut (see the module docstring)."""
    if mask.name is None:
        return TrimPlan(None, reason="no attention mask")
    axes = sequence_axes(model, mask.name)
    if isinstance(axes, str):
        return TrimPlan(None, reason=axes)
    trim = Trim(mask, axes)
    run = total = 0
    example: Feed | None = None
    for feed in feeds:
        length = trim.length(feed)
        if length is None:
            return TrimPlan(None, reason=f"a feed has no [batch, sequence] '{mask.name}'")
        rows, whole = np.shape(feed[mask.name])
        run, total = run + rows * length, total + rows * whole
        if example is None and length < whole:
            example = feed
    if example is None:
        return TrimPlan(None, reason="no batch ends in padding")
    disagreement = _disagreement(model, trim, example, device)
    if disagreement:
        log.info("padding is not cut from calibration batches: %s", disagreement)
        return TrimPlan(None, reason=disagreement)
    log.info("calibration batches cut after their last counted position: %.1f%% of the token positions run",
             100.0 * run / total)
    return TrimPlan(trim, run / total)


def _disagreement(model: onnx.ModelProto, trim: Trim, feed: Feed, device: str) -> str:
    """Why the model's outputs on `feed` cut differ from those on `feed` whole ('' where they agree)."""
    session = make_session(model, device=device)
    accepted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    cut = trim.apply(feed)
    whole_out = session.run(names, {k: v for k, v in feed.items() if k in accepted})
    cut_out = session.run(names, {k: v for k, v in cut.items() if k in accepted})
    length, full = trim.length(feed), np.shape(feed[trim.mask.name])[1]
    for name, whole, part in zip(names, whole_out, cut_out):
        why = _compare(np.asarray(whole), np.asarray(part), length or full, full)
        if why:
            return f"output '{name}' {why} when the padding after the last counted position is cut"
    return ""


def _compare(whole: np.ndarray, part: np.ndarray, length: int, full: int) -> str:
    if whole.shape != part.shape:
        differ = [axis for axis, (a, b) in enumerate(zip(whole.shape, part.shape)) if a != b]
        cut_along = differ[0] if whole.ndim == part.ndim and len(differ) == 1 else None
        if cut_along is None or (whole.shape[cut_along], part.shape[cut_along]) != (full, length):
            return f"changes shape ({list(whole.shape)} to {list(part.shape)})"
        whole = np.take(whole, np.arange(length), axis=cut_along)
    if whole.dtype.kind not in "fc":
        return "" if np.array_equal(whole, part) else "changes"
    if not whole.size:
        return ""
    scale = float(np.nanmax(np.abs(whole))) if np.isfinite(whole).any() else 0.0
    worst = float(np.nanmax(np.abs(whole.astype(np.float64) - part.astype(np.float64))))
    return "" if worst <= TOLERANCE * scale else f"changes by {worst:.3g} (largest magnitude {scale:.3g})"

"""The properties every optimisation keeps on a random graph, and the three method checks.

`compare` checks a result: the ONNX full check, the same input/output names, element types and declared dims
as the original (initializers listed as inputs aside), a run in onnxruntime (optimisations disabled) with the
same output dtypes and shapes, finite outputs, and, for an exact rewrite, outputs within 1e-4 (rtol and
atol). `optimize` runs graphopt.optimize and classifies what happened: a GraphoptError is a refusal
(allowed), any other exception a failure named by where it was raised.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir import graph as ir
from graphopt.ir.shapes import resolve_input_shapes
from graphopt.passes import PassContext, PassManager, normalising_passes
from graphopt.passes.channels.budget import MacModel
from graphopt.passes.channels.magnitude import analyse, magnitude_scores
from tests.conftest import run_ort as run
from tests.fuzz.builder import Example

EXACT = 1e-4  # rtol and atol of an exact rewrite


@dataclass
class Outcome:
    """What one method did on one graph: `failure` (kind, detail) for a broken property, `refusal` for a
    GraphoptError, else the report."""

    method: str
    failure: tuple[str, str] | None = None
    refusal: str | None = None
    report: dict | None = None


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def interface(model: onnx.ModelProto) -> list[tuple]:
    """Names, element types and declared dims of the graph inputs and outputs."""
    weights = {t.name for t in model.graph.initializer}

    def described(values: Sequence[onnx.ValueInfoProto]) -> list[tuple]:
        return [(v.name, v.type.tensor_type.elem_type, _dims(v))
                for v in values if v.name not in weights]
    return [described(model.graph.input), described(model.graph.output)]


def feeds_for(example: Example, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded normal inputs of `batch` samples (symbolic dims at the example's sizes)."""
    rng = np.random.default_rng(seed)
    weights = {t.name for t in example.model.graph.initializer}
    return {v.name: rng.standard_normal([batch, *(d.dim_value or example.dims[d.dim_param]
                                                  for d in v.type.tensor_type.shape.dim[1:])]).astype(np.float32)
            for v in example.model.graph.input if v.name not in weights}


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _output_problem(name: str, have: np.ndarray, want: np.ndarray, exact: bool) -> tuple[str, str] | None:
    if have.dtype != want.dtype or have.shape != want.shape:
        return "interface", f"output {name}: {have.dtype}{list(have.shape)}, not {want.dtype}{list(want.shape)}"
    if not np.all(np.isfinite(have)):
        return "not finite", f"output {name}"
    if exact and not np.allclose(have, want, rtol=EXACT, atol=EXACT):
        worst = float(np.max(np.abs(have - want)))
        return "inexact", f"output {name}: max |diff| {worst:.3g}"
    return None


def compare(example: Example, optimized: onnx.ModelProto, exact: bool) -> tuple[str, str] | None:
    """The first broken property of `optimized` against the example's model: (kind, detail), or None."""
    original = example.model
    try:
        onnx.checker.check_model(optimized, full_check=True)
    except Exception as error:  # noqa: BLE001 (any checker complaint is the finding)
        return "checker", _line(error)
    if interface(optimized) != interface(original):
        return "interface", f"{interface(original)} became {interface(optimized)}"
    feeds = feeds_for(example, 3, 1)
    try:
        expected = run(original, feeds)
    except Exception as error:  # noqa: BLE001 (the generator drew a graph onnxruntime cannot run)
        return "generator", _line(error)
    try:
        got = run(optimized, feeds)
    except Exception as error:  # noqa: BLE001
        return "onnxruntime", _line(error)
    for name, want in expected.items():
        problem = _output_problem(name, got[name], want, exact)
        if problem is not None:
            return problem
    return None


def _where(error: BaseException) -> str:
    """The innermost graphopt frame of a traceback, as module:function."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/graphopt/" in f.filename]
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/graphopt/', 1)[1]}:{frame.name}"


def crash(method: str, error: BaseException) -> Outcome:
    """An exception other than a GraphoptError: a failure, named by where it was raised."""
    while error.__cause__ is not None:  # the pass manager wraps a pass's error
        error = error.__cause__
    return Outcome(method, failure=(f"crash in {_where(error)}", _line(error)))


def input_shapes(example: Example) -> dict[str, tuple[int, ...]] | None:
    """The sizes of the input's symbolic dims, as `--input-shape H=8` gives them."""
    return {symbol: (size,) for symbol, size in example.dims.items()} or None


def optimize(example: Example, method: str, exact: bool, **options: object) -> Outcome:
    """`graphopt.optimize` and the properties of its result; only GraphoptError may escape it."""
    try:
        result = graphopt.optimize(example.model, method=method, input_shapes=input_shapes(example), **options)
    except GraphoptError as refusal:
        return Outcome(method, refusal=f"{type(refusal).__name__}: {str(refusal)[:160]}")
    except Exception as error:  # noqa: BLE001 (anything else is a bug)
        return crash(method, error)
    return Outcome(method, failure=compare(example, result.model, exact), report=result.report)


def zero_channel_target(example: Example) -> tuple[float, float]:
    """The MAC ratio left when every channel of a prunable group whose producers are all zero is removed (one
    channel per group stays): the magnitude target that asks for exactly those channels; and the MACs of
    the pre-passed graph the target is a fraction of."""
    model = example.model
    shapes = resolve_input_shapes(model, input_shapes(example), None)
    graph = ir.import_graph(model)
    ctx = PassContext(template=model, input_shapes=shapes, progress=False)
    PassManager(normalising_passes()).run(graph, ctx)
    analysis, per_node = analyse(graph, ctx)
    prunable = [g for g in analysis.groups() if g.prunable]
    scores = magnitude_scores(analysis, prunable, "l1")
    counts = {root: max(1, int(np.count_nonzero(values))) for root, values in scores.items()}
    macs = MacModel(analysis, per_node, set(scores))
    return macs.ratio(counts), macs.total


def check_magnitude(example: Example) -> Outcome:
    """Magnitude pruning asked for exactly the all-zero channels removes them: exact, and on target."""
    try:
        target, total = zero_channel_target(example)
    except Exception as error:  # noqa: BLE001
        return crash("magnitude", error)
    target = min(1.0, target * (1 + 1e-9))
    outcome = optimize(example, "magnitude", exact=True, target_macs=target, round_to=1)  # exactly those channels
    if outcome.failure is None and outcome.report is not None:
        # the target is a fraction of the pre-passed graph's MACs (dead code already gone), as is the estimate
        estimated = outcome.report["passes"][-1]["stats"]["estimated_macs_ratio"]
        reached = outcome.report["macs_after"] / total if total else 1.0
        if estimated > target or not math.isclose(reached, estimated, rel_tol=1e-9):
            outcome.failure = ("missed target", f"target {target:.6f}, estimated {estimated:.6f}, "
                                                f"reached {reached:.6f}")
    return outcome


def check_dead_units(example: Example) -> Outcome:
    return optimize(example, "dead-units", exact=True)


def check_snp(example: Example, seed: int = 0) -> Outcome:
    """SNP at a MAC target of 0.7 on random calibration data: a valid model with the same interface."""
    return optimize(example, "snp", exact=False, target_macs=0.7, calib=feeds_for(example, 24, seed))


def describe(example: Example) -> str:
    """The graph as ONNX text (parse it back with onnx.parser.parse_model), for a failure message."""
    return f"ops: {', '.join(example.ops)}\n{onnx.printer.to_text(example.model)}"

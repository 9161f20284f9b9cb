"""Runs a sequence of passes, holding each to its contract.

Before a pass runs, every property it `requires` (graphopt.passes.base.PROPERTIES) must hold, else a
`PassFailedError` names the pass, the property and what broke it: that is a pipeline-ordering bug, not
bad input. A property holds once a pass that `ensures` it has run, and until a pass changes the graph
without preserving it. The input graph is taken to have every property that no pass of the sequence
ensures (the caller vouches for the graph it hands in, as when one pass runs alone on a prepared graph);
a property the sequence does establish holds only from its pass on. `assume` overrides that.

After a pass reports a change the manager removes dead nodes and re-sorts the graph (only then: an
unchanged graph is left exactly as it was), so dead_code_removed holds again. Any exception names the
failing pass and those that ran before it; bad input stays a `GraphoptError` (exit code 2), anything
else is a `PassFailedError`.
Before the first method pass, while only normalising passes have changed the graph, the manager notes it on
the context (`PassContext.note_normalised`), so calibration can keep the outputs the fidelity check needs.
In a pipeline of several methods under `--target-macs`, the target stays a fraction of the MACs the first
method saw: before each later method that follows a change, `PassContext.macs_scale` becomes those MACs over
the current graph's, so `magnitude,snp` or `dead-units,snp` spends only what the earlier methods left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from graphopt.calibration.shapes import count_cost
from graphopt.errors import GraphoptError, PassFailedError, PassInputError
from graphopt.ir import graph as ir
from graphopt.passes.base import PROPERTIES, REGISTRY, Pass, PassContext, PassResult

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    name: str
    result: PassResult
    requires: frozenset[str] = field(default_factory=frozenset)
    ensures: frozenset[str] = field(default_factory=frozenset)

    def to_json(self) -> dict[str, object]:
        contract = {key: sorted(values) for key, values in (("requires", self.requires), ("ensures", self.ensures))
                    if values}
        return {"pass": self.name, **contract, **self.result.to_json()}


class _Properties:
    """Which properties hold, and which pass's change invalidated each one that no longer does."""

    def __init__(self, holding: Iterable[str]) -> None:
        self.holding = set(holding)
        self.invalidated_by: dict[str, str] = {}

    def missing(self, current: Pass, before: str) -> str | None:
        """Why `current` may not run, or None when all it requires holds."""
        for name in sorted(current.requires - self.holding):
            ensurers = sorted(n for n, cls in REGISTRY.items() if name in cls.ensures) or ["no registered pass"]
            if name in self.invalidated_by:
                why = f"'{self.invalidated_by[name]}' changed the graph without preserving it; run " \
                      f"{' or '.join(ensurers)} after it"
            else:
                why = f"no earlier pass ensured it; run {' or '.join(ensurers)} before it"
            return f"pipeline-ordering bug: pass '{current.name}' requires {name}, which does not hold " \
                   f"(after: {before}): {why}"
        return None

    def update(self, current: Pass, result: PassResult) -> None:
        if result.modified:
            lost = self.holding - current.preserves - current.ensures
            self.invalidated_by.update({name: current.name for name in lost})
            self.holding -= lost
            self.holding.add("dead_code_removed")  # the manager's cleanup after a change removes it
        self.holding |= current.ensures
        for name in current.ensures:
            self.invalidated_by.pop(name, None)


class _PipelineBudget:
    """Keeps a MAC target a fraction of the MACs the first method pass saw (see the module docstring)."""

    def __init__(self, passes: list[Pass], ctx: PassContext) -> None:
        self.active = ctx.option("target_macs") is not None and sum(p.kind == "method" for p in passes) > 1
        self.first: float | None = None
        self.changed = False

    def before(self, current: Pass, graph: gs.Graph, ctx: PassContext) -> None:
        if not self.active or current.kind != "method":
            return
        if self.first is None:
            self.first = _macs(graph, ctx)
        elif self.changed:
            ctx.macs_scale = self.first / max(_macs(graph, ctx), 1.0)
            self.changed = False

    def after(self, current: Pass, result: PassResult) -> None:
        self.changed = self.changed or (current.kind == "method" and result.modified)


def _macs(graph: gs.Graph, ctx: PassContext) -> float:
    return float(count_cost(ir.export_model(graph, ctx.template, infer=False), ctx.input_shapes,
                            sample=ctx.sample).macs)


class PassManager:
    def __init__(self, passes: list[Pass], assume: Iterable[str] | None = None) -> None:
        self.passes = passes
        ensured = frozenset().union(*(p.ensures for p in passes))
        self.assume = frozenset(PROPERTIES) - ensured if assume is None else frozenset(assume)
        unknown = sorted(self.assume - set(PROPERTIES))
        if unknown:
            raise ValueError(f"unknown properties assumed: {unknown} (known: {', '.join(PROPERTIES)})")

    def run(self, graph: gs.Graph, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        properties = _Properties(self.assume)
        rewritten = False  # a method pass changed the graph
        checked = False  # ctx.normalised_checks ran
        budget = _PipelineBudget(self.passes, ctx)
        for current in tqdm(self.passes, desc="passes", unit="pass", disable=not ctx.progress, leave=False):
            before = ", ".join(r.name for r in records) or "none"
            refusal = properties.missing(current, before)
            if refusal:
                raise PassFailedError(refusal)
            if current.kind != "prepass" and not rewritten:
                ctx.note_normalised(graph)  # only normalising passes changed it: calibration may keep its outputs
            if current.kind != "prepass" and not checked:
                checked = True
                for check in ctx.normalised_checks:
                    check(graph)
            budget.before(current, graph, ctx)
            result = self._run_one(current, graph, ctx, before)
            budget.after(current, result)
            rewritten = rewritten or (current.kind != "prepass" and result.modified)
            properties.update(current, result)
            records.append(PassRecord(current.name, result, current.requires, current.ensures))
        return records

    @staticmethod
    def _run_one(current: Pass, graph: gs.Graph, ctx: PassContext, before: str) -> PassResult:
        try:
            result = _run_through_quantized(current, graph, ctx) if current.through_quantized \
                else current.run(graph, ctx)
            if result.modified:
                ir.cleanup(graph)
        except GraphoptError as exc:
            raise PassInputError(f"pass '{current.name}' (after: {before}): {exc}") from exc
        except Exception as exc:
            raise PassFailedError(
                f"pass '{current.name}' failed (after: {before}): {type(exc).__name__}: {exc}"
            ) from exc
        for reason in result.skipped:
            log.info("%s: %s", current.name, reason)
        return result


def _run_through_quantized(current: Pass, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Run `current` with the graph's QDQ weights as the float constants they stand for and its dynamically
    quantized layers as float layers, then store them as integers again (graphopt.passes.quantize.through and
    .dynamic); the stats say how many channels kept their integers."""
    from graphopt.passes.quantize.dynamic import requantize_layers, unquantize_layers
    from graphopt.passes.quantize.through import requantize_weights, unquantize_weights

    records = unquantize_weights(graph)
    layers = unquantize_layers(graph)
    result = current.run(graph, ctx)
    if records or layers:
        counts = requantize_weights(graph, records)
        for key, value in requantize_layers(graph, layers).items():
            counts[key] += value
        if result.modified:
            result.stats.update(counts)
    return result

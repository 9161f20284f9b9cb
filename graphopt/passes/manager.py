"""Runs a sequence of passes.

After a pass reports a change the manager removes dead nodes and re-sorts the graph (only then: an
unchanged graph is left exactly as it was). Any exception names the failing pass and those that ran
before it; bad input stays a `GraphoptError` (exit code 2), anything else is a `PassFailedError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from graphopt.errors import GraphoptError, PassFailedError, PassInputError
from graphopt.ir import graph as ir
from graphopt.passes.base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    name: str
    result: PassResult

    def to_json(self) -> dict[str, object]:
        return {"pass": self.name, **self.result.to_json()}


class PassManager:
    def __init__(self, passes: list[Pass]) -> None:
        self.passes = passes

    def run(self, graph: gs.Graph, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        for current in tqdm(self.passes, desc="passes", unit="pass", disable=not ctx.progress, leave=False):
            before = ", ".join(r.name for r in records) or "none"
            try:
                result = current.run(graph, ctx)
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
            records.append(PassRecord(current.name, result))
        return records

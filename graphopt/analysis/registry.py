"""One registry of per-op knowledge, keyed by (domain, op_type, opset range).

An `OpRule` holds everything graphopt knows about one ONNX op:
- `channels`: how channel states flow through it (graphopt.analysis.groups walks the graph with these);
  an op without a rule blocks every group that reaches it, with the reason;
- `layout`: the op moves or copies values without arithmetic (reshapes, transposes, slicing,
  concatenation, identities), so a per-channel constant passes through it unchanged;
- `constant`: how a per-channel constant (a dead unit's bias) is evaluated through it
  (graphopt.analysis.constant_flow); None stops the evaluation there, unless the op is `layout`;
- `rotation`: whether it commutes with an orthogonal rotation of the channel axis, and onto which
  output axis the rotated channels go (change-of-basis chains); the rule returns the output axis or
  the reason it is not equivariant.
Rules are registered by op family in graphopt.analysis.oprules, whose `rule_for` is the lookup by node.
Opset ranges are inclusive; two rules for one (domain, op_type) must not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from graphopt.analysis.state import Analysis

Values = dict[int, np.ndarray]  # group root -> per-channel constant (NaN: unknown)
ChannelRule = Callable[[gs.Node, "Analysis"], None]
ConstantRule = Callable[["Analysis", gs.Node, dict[str, Values], list[Values]], "Values | None"]
RotationRule = Callable[[gs.Node, gs.Tensor, int], "int | str"]

DEFAULT_DOMAIN = ""
NOT_EQUIVARIANT = "not equivariant to a rotation of the channels"


def no_rule(node: gs.Node, a: Analysis) -> None:
    a.block_inputs(node, "no channel rule for this op")


def reads_once(node: gs.Node, tensor: gs.Tensor) -> str | None:
    """Why a rotation cannot pass `node` before its own rule is asked: the channels enter as anything
    but its first input, or twice."""
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return "reads the channels twice or as a parameter"
    return None


def declines(reason: str) -> RotationRule:
    """A rotation rule for an op that is not equivariant, for `reason`."""
    def rule(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
        return reads_once(node, tensor) or reason
    return rule


def equivariant(rule: RotationRule) -> RotationRule:
    """A rotation rule for an op that passes rotations (as `rule` says) when it reads the channels once,
    as its first input."""
    def checked(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str:
        why = reads_once(node, tensor)
        return why if why is not None else rule(node, tensor, axis)
    return checked


@dataclass(frozen=True)
class OpRule:
    op_type: str
    domain: str = DEFAULT_DOMAIN
    since: int = 1
    until: int | None = None
    channels: ChannelRule = no_rule
    layout: bool = False
    constant: ConstantRule | None = None
    rotation: RotationRule = declines(NOT_EQUIVARIANT)

    def covers(self, opset: int) -> bool:
        return self.since <= opset and (self.until is None or opset <= self.until)


DEFAULT_RULE = OpRule("")
_RULES: dict[tuple[str, str], list[OpRule]] = {}


def domain_key(name: str | None) -> str:
    """The registry's name of a domain: "ai.onnx" and the empty name are the default domain."""
    return DEFAULT_DOMAIN if name in (None, "", "ai.onnx") else str(name)


def register(*op_types: str, domain: str = DEFAULT_DOMAIN, since: int = 1, until: int | None = None,
             channels: ChannelRule = no_rule, layout: bool = False, constant: ConstantRule | None = None,
             rotation: RotationRule | None = None) -> None:
    """Register one rule for each of `op_types` in `domain` over opsets [since, until]; an overlapping
    registration for the same op is refused."""
    for op_type in op_types:
        rule = OpRule(op_type, domain_key(domain), since, until, channels, layout, constant,
                      rotation if rotation is not None else declines(NOT_EQUIVARIANT))
        existing = _RULES.setdefault((rule.domain, op_type), [])
        for other in existing:
            if rule.since <= (other.until or 10**9) and other.since <= (rule.until or 10**9):
                raise ValueError(f"duplicate rule for {rule.domain or 'ai.onnx'}::{op_type} "
                                 f"(opsets {other.since}..{other.until or ''})")
        existing.append(rule)


def lookup(domain: str | None, op_type: str, opset: int) -> OpRule | None:
    """The rule for `op_type` in `domain` at `opset`, or None."""
    return next((rule for rule in _RULES.get((domain_key(domain), op_type), []) if rule.covers(opset)), None)


def registered() -> list[OpRule]:
    return [rule for rules in _RULES.values() for rule in rules]


def opsets_of(graph: gs.Graph) -> dict[str, int]:
    """Opset version per domain of `graph` (the default domain under "")."""
    opsets = {domain_key(o.domain): int(o.version) for o in (getattr(graph, "import_domains", None) or [])}
    if getattr(graph, "opset", None):
        opsets[DEFAULT_DOMAIN] = int(graph.opset)
    return opsets


def positive_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis

"""One registry of per-op knowledge, keyed by (domain, op_type, opset range).

An `OpRule` holds everything graphopt knows about one ONNX op:
- `channels`: how channel states flow through it (graphopt.analysis.groups walks the graph with these);
  an op without a rule blocks every group that reaches it, with the reason;
- `layout`: the op moves or copies values without arithmetic (reshapes, transposes, slicing,
  concatenation, identities), so a per-channel constant passes through it unchanged;
- `constant`: how a per-channel constant (a dead unit's bias) is evaluated through it
  (graphopt.analysis.constant_flow); None stops the evaluation there, unless the op is `layout`;
- `rotation`: whether it commutes with an orthogonal rotation Q of the channel axis, and onto which
  output axis the rotated channels go (change-of-basis chains); the rule returns the output axis (or a
  `Carried`: several outputs, or other variable inputs that must carry the same rotation, as the
  branches of a residual Add do) or the reason it is not equivariant. Ops that are linear and treat
  every channel alike state which axes they mix (`Mixing`, ruled by `linear`): such an op f acts on
  each channel slice by one linear map, f(x)[.., c, ..] = L(x[.., c, ..]), so f(Q x) = Q f(x) exactly
  when the channel axis is not among the axes L combines or re-lays (a pooling window, a reduction, a
  padded, sliced, resized or reshaped axis).
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
RotationRule = Callable[[gs.Node, gs.Tensor, int], "int | Carried | str"]

DEFAULT_DOMAIN = ""
NOT_EQUIVARIANT = "not equivariant to a rotation of the channels"


@dataclass(frozen=True)
class Carried:
    """Where a rotation of the input's channel axis goes through an op: onto `axis` of each output in
    `outputs`, provided every (input index, channel axis) in `joins` carries the same rotation (the
    other branches of a residual Add, the other pieces of a Concat on another axis)."""

    axis: int
    outputs: tuple[int, ...] = (0,)
    joins: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Mixing:
    """What a linear op that treats every channel alike does to its first input's axes: `mixes` are the
    input axes it combines or re-lays (values along them move or add up), `moved[i]` is the output axis
    input axis i becomes (None: reduced away or merged), `outputs` the outputs that carry them."""

    mixes: frozenset[int]
    moved: tuple[int | None, ...]
    outputs: tuple[int, ...] = (0,)


def rank_of(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


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


def linear(mixing: Callable[[gs.Node, gs.Tensor], "Mixing | str"]) -> RotationRule:
    """A rotation rule for a linear op that treats every channel alike and mixes the axes `mixing`
    states (or says why it cannot tell): rotations of any other axis pass, onto the axis it moves to."""
    def rule(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | Carried | str:
        found = mixing(node, tensor)
        if isinstance(found, str):
            return found
        if axis in found.mixes or axis >= len(found.moved) or found.moved[axis] is None:
            return f"mixes the channel axis {axis}"
        return Carried(int(found.moved[axis]), found.outputs) if found.outputs != (0,) else int(found.moved[axis])
    return equivariant(rule)


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

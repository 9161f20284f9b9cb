"""Per-op rules, one registration per op, grouped by op family.

Each family module registers its ops with graphopt.analysis.registry.register: how channels flow
through the op, whether it only moves values (layout), how a per-channel constant passes it, and
whether it commutes with a rotation of the channel axis. `rule_for(node, opsets)` is the one lookup
every question goes through (channel groups, dead-unit constants, change-of-basis chains).

Adding an op is one `register(...)` call in its family module and one test:

    register("Softsign", channels=unary, constant=elementwise(_fixed(lambda x: x / (1 + np.abs(x)))),
             rotation=declines(NONLINEAR))
"""

from __future__ import annotations

from typing import Mapping

import onnx_graphsurgeon as gs

from graphopt.analysis.oprules import (elementwise, functions, layout, normalising, pooling, producers, quantized,
                                       reshape)
from graphopt.analysis.registry import DEFAULT_DOMAIN, DEFAULT_RULE, OpRule, domain_key, lookup

FAMILIES = (producers, elementwise, pooling, normalising, layout, reshape, functions, quantized)


def rule_for(node: gs.Node, opsets: Mapping[str, int]) -> OpRule:
    """The rule registered for `node` at the graph's opsets (graphopt.analysis.registry.opsets_of),
    or the default rule: no channel rule, no constant evaluation, not equivariant. A domain the graph does
    not import is looked up at its first version (the default domain at the newest)."""
    domain = domain_key(node.domain)
    found = lookup(domain, node.op, opsets.get(domain, 10**6 if domain == DEFAULT_DOMAIN else 1))
    return found if found is not None else DEFAULT_RULE


__all__ = ["FAMILIES", "rule_for"]

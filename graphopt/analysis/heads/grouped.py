"""Query heads alone under grouped-query attention (graphopt.analysis.heads).

A torch export repeats each key/value head for its g query heads (Unsqueeze → Expand [.., kv, g, ..] → Reshape
[.., kv·g, ..]); the head walk then counts a unit as a key/value head with its g query heads
(`HeadBlock.coarsen`). The same block can give up query heads instead and keep every key/value head: when
every group keeps the same number k of its query heads, the Expand repeats each key/value head k times and the
query head h still meets key/value head h / k. `query_heads` derives that block: the query side's slices,
entries and consumers per query head, the repeat Reshapes counting the kept query heads, the Expands' group
entries counting k, and nothing on the key/value side (projections, splits, rotary tables) touched.
`prefers_query_heads` is the rule graphopt uses: query heads when a group holds more heads than there are
groups (a unit of query heads is then the smaller step), or when the key/value heads are the model's
interface (a cache).
"""

from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from graphopt.analysis.heads.blocks import HeadBlock, ShapeEntry


def prefers_query_heads(heads: int, kv_heads: int, cache: bool = False) -> bool:
    """Whether a grouped-query block of `heads` query heads over `kv_heads` prunes query heads, as many from
    every group, rather than key/value heads with their groups."""
    return heads > kv_heads and (cache or heads // kv_heads > kv_heads)


def _upstream(tensors: list[gs.Tensor]) -> set[int]:
    """Ids of every node whose output reaches one of `tensors`."""
    seen: set[int] = set()
    stack = [t.inputs[0] for t in tensors if t.inputs]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(t.inputs[0] for t in node.inputs if t.inputs)
    return seen


def _group_entries(block: HeadBlock) -> list[ShapeEntry] | str:
    """The entry of each repeat's Expand that counts a group's query heads (the axis after the key/value
    heads), or why a repeat does not come from an Expand."""
    entries = []
    for repeat in block.repeats:
        expand = repeat.inputs[0].inputs[0] if repeat.inputs[0].inputs else None
        position = next((e.position for e in block.shapes if e.node is repeat), None)
        if expand is None or expand.op != "Expand" or position is None:
            return f"{repeat.name}: the repeated key/value heads do not come from an Expand"
        entries.append(ShapeEntry(expand, position + 1, 1))
    return entries


def query_heads(block: HeadBlock) -> HeadBlock | str:
    """The block of `block`'s query heads alone (module docstring), or why it cannot be one."""
    group, kv = block.factor, block.heads
    if group < 2 or not block.repeats:
        return "not grouped-query attention repeated by Expand and Reshape"
    entries = _group_entries(block)
    if isinstance(entries, str):
        return entries
    kv_side = _upstream([r.inputs[0] for r in block.repeats])
    repeats = {id(r) for r in block.repeats}
    found = HeadBlock(kv * group, groups=kv, group_entries=entries, attributes=list(block.attributes),
                      mixing=list(block.mixing), declined=block.declined)
    found.slices = [replace(s, width=s.width // group) for s in block.slices if id(s.node) not in kv_side]
    found.packed = [replace(p, width=p.width // group) for p in block.packed
                    if not p.tensor.inputs or id(p.tensor.inputs[0]) not in kv_side]
    found.shapes = [replace(e, per_head=e.per_head // group) for e in block.shapes
                    if id(e.node) not in kv_side or id(e.node) in repeats]
    found.consumers = [replace(c, width=c.width // group) for c in block.consumers]
    return found

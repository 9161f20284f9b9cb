"""Attention heads: channel axes split into heads, mixed head by head, and merged back.

A *head block* is what whole-head pruning removes together. Its sources are linear producers (MatMul
with a constant weight, Gemm) whose output columns, after per-channel ops (bias Add, scale Mul) and
optionally a Split/Slice of a packed projection, a Reshape splits as [..., H, width] (query, key and
value projections). From there the head axis is followed forward through every reader: layout ops
(Transpose, Unsqueeze, Squeeze, Slice/Split/Concat along other axes), element-wise ops whose other
operands broadcast over the head axis (scales, masks, rotary tables), Softmax over another axis, and
batched MatMuls that hold the head axis as a batch axis (q·kᵀ, p·v; they couple the heads of their
operands index by index). A Reshape that merges [H, width] back into one last axis ends the walk; its
readers must be linear consumers (the output projection), whose weight rows are the merged features.

Head h is independent of every other head on the way (every op acts per head or broadcasts over heads),
so removing head h everywhere — its columns in every source, its rows in every consumer, one head fewer
in every Reshape target and per-head constant — is exact when the consumers' rows for that head are
zero, and otherwise removes exactly that head's contribution to the consumers' outputs (the pass folds a
least-squares reconstruction from the kept heads into the consumer, graphopt.passes.heads).

com.microsoft Attention (packed QKV weight and bias, a `num_heads` attribute), MultiHeadAttention fed
by separate projections and GroupQueryAttention (separate or packed query/key/value, `num_heads` and
`kv_num_heads` following) are blocks too: the op is the whole mixing, its output the merged heads. Under
grouped-query attention, from an export's Expand + Reshape or GroupQueryAttention, a unit is a key/value head
with its query heads, or query heads alone, as many from every group (graphopt.analysis.heads.grouped says
which; always the latter for a GroupQueryAttention whose key/value cache is the model's interface). Other
attention ops carrying state (past inputs, present outputs read) keep their heads.

Anything else reading a head tensor (a graph output, a reshape that folds heads into the batch, an
Expand to more heads, an operand that differs per head and is not a constant) declines the block, with
the op named. Shapes are batch-1 static shapes (graphopt.calibration.shapes).
"""

from graphopt.analysis.heads.blocks import HeadBlock, HeadConsumer, HeadSlice, ShapeEntry
from graphopt.analysis.heads.track import find_head_blocks

__all__ = ["HeadBlock", "HeadConsumer", "HeadSlice", "ShapeEntry", "find_head_blocks"]

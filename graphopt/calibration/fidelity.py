"""What agreement between a reference and a candidate output means, decided per output from its shape and
the op that produces it, and the agreement counts that follow.

Each output gets one kind (`output_kinds`), from the shape of its first batch, its declared dimensions
and its producer:
- "classes": rank 2 [N, C] with C > 1: class scores; top-1 agreement is the fraction of rows whose
  arg-max matches the reference's;
- "sequence": rank 3 with C > 1 on the last axis, produced by a classifier head: Softmax or LogSoftmax,
  or a linear layer (MatMul, Gemm, Conv, a quantized one rescaled to float, or the Add of its bias), seen
  through layout-only ops (Transpose, Reshape, Squeeze, Unsqueeze, Identity, Cast). Read batch-first
  [N, T, C], or time-major [T, N, C] when the declared second dimension is the inputs' batch symbol and the
  first is not, or, where neither is declared as the batch, when only the second axis has the batch's size
  in the data.
  Position agreement: the fraction of the N·T positions whose arg-max matches; sequence agreement: the
  fraction of the N samples whose greedy CTC decoding matches exactly (arg-max per position, repeats
  collapsed, the blank label, index 0 unless told, dropped);
- "values": anything else, [N, 1] included (a single score or regression value), an embedding scaled to
  unit length (a Div by its L2 norm, or LpNormalization: sentence and speaker encoders, whose arg-max
  means nothing and flips with float rounding), a detector's decoded
  boxes [N, B, 4 + classes] (Concat of coordinates and scores) and hidden states [N, T, D]: no arg-max
  measure is meaningful, only the distances (cosine, relative L2 error) apply.
A dynamic dimension takes the size it has in the data. Counts are exact integers, per sample, so that
callers can sum them over batches or bound them (graphopt.calibration.heldout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.ir.shapes import batch_symbols, input_specs

KINDS = ("classes", "sequence", "values")
LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast"}
SCORE_OPS = {"Softmax", "LogSoftmax"}
LINEAR_OPS = {"MatMul", "Gemm", "Conv"}
QUANTIZED_LINEAR_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}


@dataclass(frozen=True)
class OutputKind:
    """How one output is compared: `kind` (one of KINDS) and, for a sequence, which axis holds the samples."""

    kind: str
    batch_axis: int = 0


@dataclass
class Counts:
    """Agreement of one batch, per sample: `rows` arg-max rows (1 for class scores, T positions for a
    sequence, 0 for values), `same` the rows that agree, `sequence_same` whether the decoded sequence
    agrees (None unless a sequence)."""

    rows: np.ndarray
    same: np.ndarray
    sequence_same: np.ndarray | None = None


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output if output}


def _through(name: str, producers: dict[str, onnx.NodeProto], ops: set[str]) -> onnx.NodeProto | None:
    """The producer of `name`, followed back through standard-domain nodes of `ops` (by their first input)."""
    node = producers.get(name)
    while node is not None and node.op_type in ops and node.domain in ("", "ai.onnx"):
        node = producers.get(node.input[0]) if node.input else None
    return node


def _is_head(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether `name` comes from a classifier head, through layout-only ops (module docstring)."""
    node = _through(name, producers, LAYOUT_OPS)
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Add":
        return any(_is_linear(producers.get(term), producers) for term in node.input)
    return node.op_type in SCORE_OPS or _is_linear(node, producers)


def _is_linear(node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether `node` is a linear layer: MatMul, Gemm or Conv, or a quantized one's result back in float (a Mul by
    the scales of a Cast MatMulInteger or ConvInteger, as onnxruntime's dynamic quantization writes it, or a
    DequantizeLinear of a QLinearMatMul or QLinearConv)."""
    if node is None:
        return False
    if node.op_type in LINEAR_OPS:
        return True
    if node.op_type not in ("Mul", "DequantizeLinear"):
        return False
    terms = node.input[:1] if node.op_type == "DequantizeLinear" else node.input[:2]
    sources = (_through(term, producers, {"Cast"}) for term in terms)
    return any(source is not None and source.op_type in QUANTIZED_LINEAR_OPS for source in sources)


NORM_PATH_OPS = LAYOUT_OPS | {"Expand", "Clip", "Max", "Add"}  # between an L2 norm and the Div it feeds


def _is_unit_length(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether `name` is a vector divided by its own L2 norm (through layout ops): Div(x, norm) with the norm a
    ReduceL2 of x or the Sqrt of a sum of x's squares (through Expand, an epsilon's Clip, Max or Add), or
    LpNormalization with p = 2."""
    node = _through(name, producers, LAYOUT_OPS)
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "LpNormalization":
        return next((a.i for a in node.attribute if a.name == "p"), 2) == 2
    if node.op_type != "Div" or len(node.input) < 2:
        return False
    return _norm_of(node.input[0], _through(node.input[1], producers, NORM_PATH_OPS), producers)


def _norm_of(vector: str, norm: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether `norm` computes the L2 norm of `vector`: ReduceL2(vector), Sqrt(ReduceSumSquare(vector)) or
    Sqrt(ReduceSum(vector * vector or vector ^ 2))."""
    if norm is not None and norm.op_type == "Sqrt":
        norm = producers.get(norm.input[0])
        if norm is not None and norm.op_type == "ReduceSum":
            squared = producers.get(norm.input[0])
            return squared is not None and squared.op_type in ("Mul", "Pow") and squared.input[0] == vector
        if norm is None or norm.op_type != "ReduceSumSquare":
            return False
    return norm is not None and norm.op_type in ("ReduceL2", "ReduceSumSquare") and norm.input[0] == vector


def _declared_dims(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    dims = {}
    for value in model.graph.output:
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]
    return dims


def output_kinds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                 samples: int | None = None) -> dict[str, OutputKind]:
    """The kind of each output in `shapes` (name -> the shape it has in the data, on a batch of `samples`
    samples where known), by the rule above."""
    producers, declared = _producers(model), _declared_dims(model)
    batch = batch_symbols(input_specs(model))
    kinds = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and shape[1] > 1 and not _is_unit_length(name, producers):
            kinds[name] = OutputKind("classes")
        elif len(shape) == 3 and shape[2] > 1 and _is_head(name, producers):
            kinds[name] = OutputKind("sequence", _sequence_batch_axis(declared.get(name), batch, shape, samples))
        else:
            kinds[name] = OutputKind("values")
    return kinds


def _sequence_batch_axis(dims: list[int | str | None] | None, batch: set[str], shape: tuple[int, ...],
                         samples: int | None) -> int:
    """0 (batch-first) or 1 (time-major): from the declared dimensions where one of the first two is the inputs'
    batch symbol; else, with `samples` known, 1 where only the second axis has that size (an export with a
    fixed batch or a stale declared shape, such as [1, T] declared for a [T, N, C] result); else 0."""
    dims = dims if dims is not None and len(dims) == 3 else [None, None, None]
    if dims[0] in batch or dims[1] in batch:
        return 1 if dims[0] not in batch else 0
    return 1 if samples is not None and shape[1] == samples != shape[0] else 0


def ctc_decode(labels: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of per-position labels [N, T]: repeats collapsed, then `blank` dropped."""
    if labels.shape[1] == 0:
        return [() for _ in range(labels.shape[0])]
    new = np.ones(labels.shape, dtype=bool)
    new[:, 1:] = labels[:, 1:] != labels[:, :-1]
    kept = new & (labels != blank)
    return [tuple(int(label) for label in row[keep]) for row, keep in zip(labels, kept)]


def compare(reference: np.ndarray, candidate: np.ndarray, kind: OutputKind, blank: int = 0) -> Counts:
    """Per-sample agreement counts of one batch of one output (shapes already checked equal)."""
    if kind.kind == "classes":
        same = np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)
        return Counts(np.ones(same.shape[0], dtype=np.int64), same.astype(np.int64))
    if kind.kind == "sequence":
        want = np.argmax(np.moveaxis(reference, kind.batch_axis, 0), axis=-1)
        got = np.argmax(np.moveaxis(candidate, kind.batch_axis, 0), axis=-1)
        decoded = zip(ctc_decode(want, blank), ctc_decode(got, blank))
        return Counts(np.full(want.shape[0], want.shape[1], dtype=np.int64), np.sum(want == got, axis=1),
                      np.array([a == b for a, b in decoded], dtype=bool))
    samples = reference.shape[0] if reference.ndim else 1
    return Counts(np.zeros(samples, dtype=np.int64), np.zeros(samples, dtype=np.int64))

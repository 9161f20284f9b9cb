"""Which graph inputs are attention masks: integer or boolean inputs whose values reach a Softmax as an
additive bias (or a masked fill), or the mask input of an attention op.

Read-only and structural, on the main graph in topological order. From each candidate input a forward
walk follows the tensors computed from it through the ops masks travel through (casts, layout ops,
element-wise arithmetic and comparisons, Where, Concat, ...), in two states:
- pure: computed from the input and constants alone (shape computations and initializers count as
  constants), e.g. (1 − Cast(Unsqueeze(mask))) · −10000 or Where(mask, 0, −inf);
- scored: a pure tensor combined with data (Add/Sub/Mul/Div/Where against a tensor that is neither
  constant nor derived from the input), e.g. scores + bias or Where(mask == 0, −inf, scores).
A scored tensor read by Softmax/LogSoftmax, or a pure or scored tensor in the mask slot of an attention op
(com.microsoft Attention's mask_index, MultiHeadAttention's key_padding_mask, GroupQueryAttention's
seqlens_k, ONNX Attention's attn_mask,
also through EmbedLayerNormalization's mask, or as the token counts a ReduceSum of it gives, the
mask_index onnxruntime's transformers optimizer writes), makes the input a mask. An input that reaches a Gather's
indices (token ids looked up in an embedding) is not one, whatever else it reaches; nor is one whose
values stop at an op outside the walk (a MatMul, a Gather of data, a Shape).

Which entries mark the tokens that count: the pure path is evaluated on the two scalar mask values 0 and
1 (every op on the path acts element-wise or moves elements, so one scalar per case suffices). Where the
pure tensor meets data: a larger additive bias, a nonzero multiplier, or the Where branch that keeps the
data marks the kept value (HF-style −10000·(1 − m) is 0 at m = 1: ones count; a key_padding_mask filled
with −inf where True: zeros count). A step whose scalar result is not known (a non-uniform constant, an
op without a scalar rule) leaves it undecided, and then nonzero entries count, as in ONNX Runtime's
attention ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.ir import weights

# (domain, op) -> the input slot that holds an attention mask
ATTENTION_MASK_SLOTS = {("com.microsoft", "Attention"): 3, ("com.microsoft", "MultiHeadAttention"): 4,
                        ("com.microsoft", "GroupQueryAttention"): 5, ("", "Attention"): 3}
SOFTMAX = {"Softmax", "LogSoftmax"}
INDEX_SLOTS = {"Gather": 1, "GatherElements": 1, "GatherND": 1}
# ops that move or copy elements: a scalar per case passes unchanged; only the first input carries
LAYOUT = {"Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Slice", "Flatten", "Tile",
          "Pad", "Gather", "Dropout", "Split"}
UNARY: dict[str, Callable[[float], float]] = {"Not": lambda v: float(v == 0), "Neg": lambda v: -v,
                                              "Abs": abs}
BINARY: dict[str, Callable[[float, float], float]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b if b != 0 else math.copysign(math.inf, a) if a != 0 else math.nan,
    "Max": max, "Min": min, "Pow": lambda a, b: a ** b if a != 0 or b >= 0 else math.inf,
    "Equal": lambda a, b: float(a == b), "Greater": lambda a, b: float(a > b), "Less": lambda a, b: float(a < b),
    "GreaterOrEqual": lambda a, b: float(a >= b), "LessOrEqual": lambda a, b: float(a <= b),
    "And": lambda a, b: float(a != 0 and b != 0), "Or": lambda a, b: float(a != 0 or b != 0),
    "Xor": lambda a, b: float((a != 0) != (b != 0)),
}
# ops through which a scored tensor (attention scores with the mask applied) stays scored
SCORED_CARRIERS = LAYOUT | {"Cast", "CastLike", "Add", "Sub", "Mul", "Div", "Max", "Min", "Where", "Clip", "Concat"}
INTEGER_TYPES = {onnx.TensorProto.BOOL, onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                 onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                 onnx.TensorProto.UINT64}
KEEPS = ("nonzero", "zero")
Values = tuple[float, float] | None  # the tensor's value where the mask entry is 0, and where it is 1


@dataclass(frozen=True)
class Trace:
    """A tensor computed from the candidate input: pure (with its scalar values per case) or scored."""

    scored: bool
    values: Values = None
    keeps: str | None = None  # scored: which mask entries keep the data ("nonzero"/"zero"), None: undecided


@dataclass(frozen=True)
class MaskInput:
    """A graph input found to be an attention mask: `keeps` says which entries mark tokens that count."""

    name: str
    rank: int | None
    keeps: str
    evidence: str


class _Graph:
    """The main graph's nodes in order, its constant tensors, and their uniform scalar values (lazily)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant: set[str] = set(self.initializers)
        self._scalars: dict[str, float | None] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            self.producer.update({output: node for output in node.output})
            inputs = [name for name in node.input if name]
            if node.op_type in ("Constant", "Shape", "Size", "ConstantOfShape") or \
                    (inputs and all(name in self.constant for name in inputs) and node.op_type not in ("If", "Loop")):
                self.constant.update(node.output)

    def scalar(self, name: str) -> float | None:
        """The single value every entry of constant `name` holds, or None (not constant, not uniform)."""
        if name not in self._scalars:
            self._scalars[name] = self._uniform(name)
        return self._scalars[name]

    def _uniform(self, name: str) -> float | None:
        array = None
        if name in self.initializers:
            array = weights.array_of(self.initializers[name])
        elif name in self.producer and self.producer[name].op_type in ("Constant", "ConstantOfShape"):
            node = self.producer[name]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            value = attrs.get("value")
            if isinstance(value, onnx.TensorProto):
                array = numpy_helper.to_array(value)
            elif node.op_type == "ConstantOfShape":
                return 0.0
            else:
                array = np.asarray(attrs.get("value_float", attrs.get("value_int", np.nan)))
        elif name in self.producer and self.producer[name].op_type in ("Cast", "Identity", "Unsqueeze", "Reshape",
                                                                             "Expand", "Tile"):
            return self.scalar(self.producer[name].input[0])
        if array is None or array.size == 0 or array.size > 1 << 16:
            return None
        flat = array.reshape(-1).astype(np.float64)
        return float(flat[0]) if np.all((flat == flat[0]) | (np.isnan(flat) & np.isnan(flat[0]))) else None


def find_masks(model: onnx.ModelProto) -> tuple[list[MaskInput], dict[str, str]]:
    """The masks among the model's integer and boolean inputs, and for every other such input why not."""
    graph = _Graph(model)
    found, rejected = [], {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        if value.name in graph.initializers or tensor.elem_type not in INTEGER_TYPES:
            continue
        rank = len(tensor.shape.dim) if tensor.HasField("shape") else None
        outcome = _walk(graph, value.name, rank)
        if isinstance(outcome, MaskInput):
            found.append(outcome)
        else:
            rejected[value.name] = outcome
    return found, rejected


def _walk(graph: _Graph, name: str, rank: int | None) -> MaskInput | str:
    traces = {name: Trace(scored=False, values=(0.0, 1.0))}
    for node in graph.nodes:
        hits = {slot: traces[t] for slot, t in enumerate(node.input) if t in traces}
        if not hits:
            continue
        if INDEX_SLOTS.get(node.op_type) in hits:
            return f"read as the indices of {node.op_type} '{node.name}' (token ids, not a mask)"
        sink = _sink(node, hits)
        if sink is not None:
            keeps, evidence = sink
            return MaskInput(name, rank, keeps or "nonzero",
                             evidence + ("" if keeps else "; which entries count is undecided: nonzero ones do"))
        carried = _carry(graph, node, hits)
        if carried is not None:
            traces.update({output: carried[min(slot, len(carried) - 1)]
                           for slot, output in enumerate(node.output) if output})
    return "reaches no Softmax and no attention mask input"


def _sink(node: onnx.NodeProto, hits: dict[int, Trace]) -> tuple[str | None, str] | None:
    """(keeps, evidence) when `node` consumes the traced input as an attention mask."""
    if node.op_type in SOFTMAX and 0 in hits and hits[0].scored:
        return hits[0].keeps, f"{node.op_type} '{node.name}' reads it as an additive bias or masked fill"
    slot = ATTENTION_MASK_SLOTS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
    if slot is not None and slot in hits:
        trace = hits[slot]
        keeps = trace.keeps if trace.scored else _nonzero_case(trace.values)
        return keeps, f"{node.domain or 'ai.onnx'} {node.op_type} '{node.name}' reads it as its mask (input {slot})"
    return None


def _carry(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> list[Trace] | None:
    """The traces of the node's outputs (one for all, or one per output), or None where the walk stops."""
    if node.domain == "com.microsoft" and node.op_type == "EmbedLayerNormalization":
        return [Trace(False), Trace(False)] if 7 in hits and not any(t.scored for t in hits.values()) else None
    if any(trace.scored for trace in hits.values()):
        return [_scored(graph, node, hits)] if node.op_type in SCORED_CARRIERS else None
    step = _pure_step(graph, node, hits)
    return None if step is None else [step]


def _pure_step(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> Trace | None:
    """The trace of a node reading pure traces (it may turn scored where it meets data), or None."""
    if node.op_type in LAYOUT or node.op_type in ("Cast", "CastLike") or node.op_type in UNARY:
        return _unary(node, hits[0]) if 0 in hits else None
    if node.op_type == "Concat":
        return Trace(False, _concat(graph, node, hits))
    if node.op_type == "ReduceSum" and 0 in hits:  # token counts: onnxruntime's fused Attention's mask_index
        return Trace(False)
    if node.op_type == "Where":
        return _where(graph, node, hits)
    return _binary(graph, node, hits) if node.op_type in BINARY else None


def _unary(node: onnx.NodeProto, trace: Trace) -> Trace:
    """A pure trace through a layout op (values unchanged), a cast or an element-wise unary op."""
    if node.op_type in LAYOUT:
        return trace
    if node.op_type in ("Cast", "CastLike"):
        return Trace(False, _cast(node, trace.values))
    return Trace(False, None if trace.values is None else _apply(UNARY[node.op_type], trace.values))


def _data(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> list[int]:
    """Input slots holding data: neither traced nor constant."""
    return [slot for slot, name in enumerate(node.input)
            if name and slot not in hits and name not in graph.constant]


def _operand(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace], slot: int) -> Values:
    """Scalar values per case of input `slot`: traced, or a uniform constant (the same in both cases)."""
    if slot in hits:
        return hits[slot].values
    value = graph.scalar(node.input[slot])
    return None if value is None else (value, value)


def _binary(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> Trace:
    data = _data(graph, node, hits)
    if data:  # the mask meets data here: scores + bias, scores · mask, scores − bias
        mask_slot = next(iter(hits))
        return Trace(True, keeps=_keeps_at(node.op_type, mask_slot, hits[mask_slot].values))
    left, right = _operand(graph, node, hits, 0), _operand(graph, node, hits, 1)
    if left is None or right is None:
        return Trace(False)
    operation = BINARY[node.op_type]
    with np.errstate(all="ignore"):
        return Trace(False, (operation(left[0], right[0]), operation(left[1], right[1])))


def _keeps_at(op: str, mask_slot: int, values: Values) -> str | None:
    """Which mask value keeps the data where a pure tensor with `values` meets it through `op`."""
    if values is None or values[0] == values[1] or any(math.isnan(v) for v in values):
        return None
    if op == "Add" or (op == "Sub" and mask_slot == 0) or op in ("Max", "Min"):
        return "nonzero" if values[1] > values[0] else "zero"  # the larger bias keeps a score
    if op == "Sub":
        return "nonzero" if values[1] < values[0] else "zero"
    if op in ("Mul", "Div"):
        return _nonzero_case(values)
    return None


def _where(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> Trace:
    data = _data(graph, node, hits)
    condition = hits.get(0)
    if data:
        keeps = None
        if condition is not None and condition.values is not None and data in ([1], [2]):
            taken = [bool(v) for v in condition.values]  # per case: the first branch is taken
            kept = [t == (data == [1]) for t in taken]
            keeps = None if kept[0] == kept[1] else ("nonzero" if kept[1] else "zero")
        return Trace(True, keeps=keeps)
    operands = [_operand(graph, node, hits, slot) for slot in range(3)]
    if any(values is None for values in operands):
        return Trace(False)
    cond, first, second = operands
    return Trace(False, tuple(first[c] if cond[c] else second[c] for c in (0, 1)))  # type: ignore[index]


def _concat(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> Values:
    """Concat of traced and constant parts: the traced parts' values when they agree (constant columns,
    such as a kept class token, do not change which value a mask entry maps to)."""
    values = {hits[slot].values for slot in hits}
    return next(iter(values)) if len(values) == 1 else None


def _cast(node: onnx.NodeProto, values: Values) -> Values:
    if values is None or node.op_type == "CastLike":
        return values
    to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.FLOAT)
    if to == onnx.TensorProto.BOOL:
        return _apply(lambda v: float(v != 0), values)
    if to in INTEGER_TYPES:
        return _apply(lambda v: float(math.trunc(v)) if math.isfinite(v) else v, values)
    return values


def _apply(operation: Callable[[float], float], values: tuple[float, float]) -> tuple[float, float]:
    return operation(values[0]), operation(values[1])


def _nonzero_case(values: Values) -> str | None:
    """"nonzero" when only the mask value 1 gives a nonzero value, "zero" when only 0 does, else None."""
    if values is None:
        return None
    nonzero = [v != 0 and not math.isnan(v) for v in values]
    return None if nonzero[0] == nonzero[1] else ("nonzero" if nonzero[1] else "zero")


def _scored(graph: _Graph, node: onnx.NodeProto, hits: dict[int, Trace]) -> Trace:
    """A scored tensor through a carrier; a pure bias added later decides an undecided `keeps`."""
    keeps = next((t.keeps for t in hits.values() if t.scored and t.keeps), None)
    if keeps is None and node.op_type in BINARY:
        pure = [(slot, t) for slot, t in hits.items() if not t.scored]
        if pure:
            keeps = _keeps_at(node.op_type, pure[0][0], pure[0][1].values)
    return Trace(True, keeps=keeps)

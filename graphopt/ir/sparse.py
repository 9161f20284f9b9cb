"""Weight sparsity of a model, and storing sparse weights as ONNX sparse initializers.

`weight_sparsity` measures the fraction of zero entries in the constant weight (input 1) of every
Conv/ConvTranspose/Gemm/MatMul, per node and overall: a float initializer's zeros, or for a weight stored as
integers behind a DequantizeLinear (QDQ), the integers equal to their zero point.

`to_sparse_initializers` moves each float initializer whose COO form (values + int64 linear indices,
as the ONNX checker requires: 4 + 8 bytes per nonzero for float32) is smaller than its dense form into
`graph.sparse_initializer`. The values are bit-identical. What works (onnx 1.23, onnxruntime 1.32):
onnxruntime densifies sparse initializers when it loads a model, so Conv/Gemm/MatMul read them as
usual; `onnx.checker.check_model` accepts them, but its `full_check` (shape inference) does not see
their shapes, and onnx-graphsurgeon ignores them, so such a file is for deployment, not for further
graphopt passes. Storage pays off only below about 1/3 density (float32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.ir import weights

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _stored_zeros(name: str, producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]
                  ) -> tuple[np.ndarray, object] | None:
    """The stored values of weight `name` and what stands for zero among them: a float initializer and 0, or the
    integers a DequantizeLinear reads and their zero point (QDQ); None for anything else."""
    if name in initializers:
        stored = weights.array_of(initializers[name])
        return (stored, 0) if stored.dtype.kind == "f" else None
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
        return None
    stored = weights.array_of(initializers[node.input[0]])
    point = weights.array_of(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] in initializers \
        else np.zeros(1, stored.dtype)
    return stored, _along(point, stored.ndim, next((a.i for a in node.attribute if a.name == "axis"), 1))


def _along(point: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A zero point shaped to broadcast over a weight of `rank` axes: per tensor, or per channel of `axis`."""
    shape = [1] * rank
    if point.size > 1:
        shape[axis % rank] = -1
    return point.reshape(shape)


def _integer_zeros(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, object] | None:
    """The stored weight of a ConvInteger or MatMulInteger and its zero point (input 3; 0 when absent)."""
    if node.op_type not in ("ConvInteger", "MatMulInteger") or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    stored = weights.array_of(initializers[node.input[1]])
    if len(node.input) < 4 or not node.input[3]:
        return stored, 0
    if node.input[3] not in initializers:
        return None
    point = weights.array_of(initializers[node.input[3]])
    return stored, _along(point, stored.ndim, 0 if node.op_type == "ConvInteger" else -1)


def weight_sparsity(model: onnx.ModelProto) -> dict[str, object]:
    """Zero weights of every layer: float entries equal to 0, or integers equal to their zero point (QDQ weights,
    ConvInteger and MatMulInteger)."""
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    layers: dict[str, float] = {}
    zeros = total = 0
    for node in model.graph.node:
        found = _stored_zeros(node.input[1], producers, initializers) \
            if node.op_type in WEIGHTED_OPS and len(node.input) > 1 else _integer_zeros(node, initializers)
        if found is not None:
            weight, zero = found
            layer_zeros = int(np.count_nonzero(weight == zero))
            layers[node.name or node.output[0]] = layer_zeros / weight.size if weight.size else 0.0
            zeros += layer_zeros
            total += weight.size
    return {"overall": zeros / total if total else 0.0, "layers": layers}


def to_sparse_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` with the initializers that shrink stored sparse; and their names."""
    sparse = onnx.ModelProto()
    sparse.CopyFrom(model)
    kept, moved = [], []
    for tensor in sparse.graph.initializer:
        array = weights.array_of(tensor)
        flat = array.reshape(-1)
        nonzero = np.flatnonzero(flat)
        if array.dtype.kind != "f" or array.ndim == 0 or nonzero.size * (array.itemsize + 8) >= array.nbytes:
            kept.append(tensor)
            continue
        values = numpy_helper.from_array(flat[nonzero], tensor.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{tensor.name}_indices")
        sparse.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved.append(tensor.name)
    del sparse.graph.initializer[:]
    sparse.graph.initializer.extend(kept)
    return sparse, moved

"""ExPrune linear layers that run dense over many rows: an If on the call's row count.

Skipping a neuron's tail pays when one row's dot products stream from memory (batch 1). Over several rows a
packed dense GEMM is what pays: the op's own packed GEMM ran at 0.78-0.98x of onnxruntime's MatMul+Add+Relu
at 2, 32 and 64 rows, though at 1.03-1.16x at 8 (bench/results/exprune_kernel.txt). So each replaced linear
layer is written as

    rows = prod(shape(X)[:-1])
    Y = If(rows >= dense_rows, then: Relu(X · Wt + B), else: ExPruneLinearRelu(X, Wp, B, Tau, Perm))

where Wt [d, n] is the layer's own weight (the one initializer kept in the file) and the op's permuted
weight Wp = Transpose(Gather(Wt, Perm)) is computed from it in the main graph (onnxruntime folds it once,
when the session is created; both branches read main-graph values, so nothing is stored twice and MLAS
prepacks Wt). A call of fewer rows is the op, exactly as before; a call of dense_rows rows or more is the
dense layer, the unpruned output up to float rounding. The If costs about 5 µs per call at batch 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.ops.functions import DOMAIN

DENSE_ROWS = 2  # at 2 rows the op's packed GEMM already lost to MLAS (0.94-0.98x, one thread)


def _carried(graph: gs.Graph, base: str, tag: str, source: gs.Tensor) -> gs.Variable:
    """A main-graph value equal to `source` (an Identity), for the branches to read from the outer scope: a
    constant read inside a branch would be written into that branch as its own initializer."""
    value = gs.Variable(ir.unique_name(graph, f"{base}_{tag}"), dtype=source.dtype, shape=source.shape)
    graph.nodes.append(gs.Node("Identity", ir.unique_name(graph, f"{base}_{tag}_carry"), inputs=[source],
                               outputs=[value]))
    return value


def dispatch_by_rows(graph: gs.Graph, node: gs.Node, dense_rows: int) -> gs.Node:
    """Wrap the swapped-in ExPruneLinearRelu `node` ([X, W, B, Tau, Perm] -> Y, constant W, B, Tau, Perm) in
    the If above; returns the If node, which writes Y."""
    x, weight, bias, tau, perm = node.inputs
    output = node.outputs[0]
    base = node.name
    n, d = weight.values.shape
    order = np.asarray(perm.values, dtype=np.int64)
    dense = np.empty((d, n), dtype=weight.values.dtype)
    dense[order] = weight.values.T  # Wp[:, i] = W[:, perm[i]]
    dense_w = gs.Constant(ir.unique_name(graph, f"{base}_dense_w"), np.ascontiguousarray(dense))
    wt, b, t, p = (_carried(graph, base, tag, source)
                   for tag, source in (("wt", dense_w), ("b", bias), ("tau", tau), ("perm", perm)))
    gathered = gs.Variable(ir.unique_name(graph, f"{base}_wt_perm"), dtype=dense.dtype, shape=[d, n])
    permuted = gs.Variable(ir.unique_name(graph, f"{base}_wp"), dtype=dense.dtype, shape=[n, d])
    lead = gs.Variable(ir.unique_name(graph, f"{base}_lead"), dtype=np.int64)
    rows = gs.Variable(ir.unique_name(graph, f"{base}_rows"), dtype=np.int64, shape=[])
    dense_call = gs.Variable(ir.unique_name(graph, f"{base}_dense_call"), dtype=bool, shape=[])
    threshold = gs.Constant(ir.unique_name(graph, f"{base}_dense_rows"), np.array(dense_rows, dtype=np.int64))
    graph.nodes.extend([
        gs.Node("Gather", ir.unique_name(graph, f"{base}_gather"), attrs={"axis": 0}, inputs=[wt, p],
                outputs=[gathered]),
        gs.Node("Transpose", ir.unique_name(graph, f"{base}_transpose"), attrs={"perm": [1, 0]}, inputs=[gathered],
                outputs=[permuted]),
        gs.Node("Shape", ir.unique_name(graph, f"{base}_shape"), attrs={"end": -1}, inputs=[x], outputs=[lead]),
        gs.Node("ReduceProd", ir.unique_name(graph, f"{base}_row_count"), attrs={"keepdims": 0}, inputs=[lead],
                outputs=[rows]),
        gs.Node("GreaterOrEqual", ir.unique_name(graph, f"{base}_many_rows"), inputs=[rows, threshold],
                outputs=[dense_call]),
    ])
    then_branch = _dense_branch(graph, base, x, wt, b, output)
    else_out = gs.Variable(ir.unique_name(graph, f"{base}_probed"), dtype=output.dtype, shape=output.shape)
    op = gs.Node(node.op, node.name, attrs=dict(node.attrs), inputs=[x, permuted, b, t, p], outputs=[else_out],
                 domain=node.domain)
    else_branch = gs.Graph(nodes=[op], outputs=[else_out], name=f"{base}_probed")
    ir.detach(node)
    wrapped = gs.Node("If", ir.unique_name(graph, f"{base}_by_rows"), inputs=[dense_call], outputs=[output],
                      attrs={"then_branch": then_branch, "else_branch": else_branch})
    graph.nodes.append(wrapped)
    return wrapped


def _dense_branch(graph: gs.Graph, base: str, x: gs.Tensor, wt: gs.Variable, b: gs.Variable,
                  output: gs.Tensor) -> gs.Graph:
    """Relu(X · Wt + B) as an If branch reading main-graph values."""
    product = gs.Variable(ir.unique_name(graph, f"{base}_dense_mm"), dtype=output.dtype)
    biased = gs.Variable(ir.unique_name(graph, f"{base}_dense_add"), dtype=output.dtype)
    out = gs.Variable(ir.unique_name(graph, f"{base}_dense"), dtype=output.dtype, shape=output.shape)
    nodes = [gs.Node("MatMul", ir.unique_name(graph, f"{base}_dense_matmul"), inputs=[x, wt], outputs=[product]),
             gs.Node("Add", ir.unique_name(graph, f"{base}_dense_bias"), inputs=[product, b], outputs=[biased]),
             gs.Node("Relu", ir.unique_name(graph, f"{base}_dense_relu"), inputs=[biased], outputs=[out])]
    return gs.Graph(nodes=nodes, outputs=[out], name=f"{base}_dense")


def written_model(model: onnx.ModelProto, dense_rows: int) -> onnx.ModelProto:
    """A one-layer model whose only node is an ExPruneLinearRelu on constant inputs (graphopt.passes.exprune.timing),
    as the pass writes it: wrapped by `dispatch_by_rows`."""
    graph = ir.import_graph(model)
    dispatch_by_rows(graph, graph.nodes[0], dense_rows)
    return ir.export_model(ir.cleanup(graph), model)


def dense_rows_of(model: onnx.ModelProto) -> int | None:
    """The smallest row count from which some ExPrune layer of `model` runs dense (dispatch_by_rows), or None."""
    constants = {t.name: t for t in model.graph.initializer}
    found = []
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type != "If" or not _probes(node):
            continue
        test = producers.get(node.input[0])
        if test is not None and test.op_type == "GreaterOrEqual" and test.input[1] in constants:
            found.append(int(onnx.numpy_helper.to_array(constants[test.input[1]])))
    return min(found) if found else None


def measuring_batch(model: onnx.ModelProto, batch_size: int) -> int:
    """`batch_size`, lowered below the row count from which `model`'s ExPrune layers run dense: the op decides
    per row, so any smaller batch measures what a single-row caller gets."""
    rows = dense_rows_of(model)
    return batch_size if rows is None else max(1, min(batch_size, rows - 1))


def _probes(node: onnx.NodeProto) -> bool:
    """Whether an If node's else branch is a graphopt op."""
    return any(inner.domain == DOMAIN for attr in node.attribute if attr.name == "else_branch"
               for inner in attr.g.node)

"""onnxruntime's fused norms split back into the ops they fuse, so CoB can centre and rotate the stream.

onnxruntime's transformers optimizer writes the residual Add and the norm after it as one node:
    SkipLayerNormalization(input, skip, γ, β?, bias?)  (com.microsoft)
        -> output 0 = LayerNorm(input + skip + bias), output 3 = input + skip + bias (the stream)
    SkipSimplifiedLayerNormalization(input, skip, γ, bias?)  (com.microsoft): the same with an RMS norm
and an RMS norm with a gain as SimplifiedLayerNormalization(x, γ). Each is rewritten, exactly, as
    b = x + bias for the operand x a linear layer writes (the bias back where the exporter had it);
    s = input + skip with that operand replaced by b;
    LayerNormalization(s, γ, β, axis=-1, epsilon)  or  graphopt.RMSNorm(s, axis=-1) · γ
keeping the names of the outputs the graph reads. A node whose mean or inverse-deviation outputs are
read, whose axis is not the last, or (for LayerNormalization) in a graph below opset 17 is left alone.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.channels.function_patterns import rms_norm_node

SKIP_NORMS = {"SkipLayerNormalization": "layer", "SkipSimplifiedLayerNormalization": "rms"}


def _last_axis(node: gs.Node) -> bool:
    rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
    return int(node.attrs.get("axis", -1)) in (-1, (rank or 0) - 1)


def _statistics_read(node: gs.Node, outputs: tuple[int, ...]) -> bool:
    return any(i < len(node.outputs) and node.outputs[i].name and node.outputs[i].outputs for i in outputs)


def _variable(graph: gs.Graph, like: gs.Tensor, base: str) -> gs.Variable:
    return gs.Variable(ir.unique_name(graph, base), dtype=like.dtype, shape=like.shape)


def _norm(graph: gs.Graph, kind: str, source: gs.Tensor, inputs: list[gs.Tensor], eps: float, output: gs.Tensor,
          name: str) -> list[gs.Node]:
    """LayerNormalization(source, γ, β) or RMSNorm(source) · γ, writing `output`."""
    if kind == "layer":
        return [gs.Node("LayerNormalization", ir.unique_name(graph, name), attrs={"axis": -1, "epsilon": eps},
                        inputs=[source, *inputs], outputs=[output])]
    normed = _variable(graph, output, f"{name}_rms")
    return [rms_norm_node(graph, f"{name}_rms_node", source, normed, int(source.shape[-1]), eps, -1),
            gs.Node("Mul", ir.unique_name(graph, f"{name}_gain"), inputs=[normed, inputs[0]], outputs=[output])]


def _written_by_layer(tensor: gs.Tensor) -> bool:
    node = ir.producer(tensor)
    return node is not None and node.op in ("MatMul", "Gemm", "Conv") and len(ir.consumers(tensor)) == 1


def _skip_norm(graph: gs.Graph, node: gs.Node) -> list[gs.Node]:
    kind = SKIP_NORMS[node.op]
    inputs = [t if t.name else None for t in node.inputs]
    first, skip, gain = inputs[:3]
    optional = inputs[3:] + [None, None]  # β and bias (LayerNorm), bias alone (RMS norm)
    shift, bias = (optional[0], optional[1]) if kind == "layer" else (None, optional[0])
    nodes: list[gs.Node] = []
    operands = [first, skip]
    if bias is not None:  # back on the layer whose bias it was: the operand a linear layer writes for this node alone
        side = next((i for i, t in enumerate(operands) if _written_by_layer(t)), 1)
        biased = _variable(graph, first, f"{node.name}_biased")
        nodes.append(gs.Node("Add", ir.unique_name(graph, f"{node.name}_bias"), inputs=[operands[side], bias],
                             outputs=[biased]))
        operands[side] = biased
    stream = node.outputs[3] if len(node.outputs) > 3 and node.outputs[3].name else _variable(graph, first,
                                                                                           f"{node.name}_sum")
    nodes.append(gs.Node("Add", ir.unique_name(graph, f"{node.name}_add"), inputs=operands, outputs=[stream]))
    nodes += _norm(graph, kind, stream, [gain] + ([shift] if shift is not None else []),
                   float(node.attrs.get("epsilon", 1e-12)), node.outputs[0], f"{node.name}_norm")
    return nodes


def _split(graph: gs.Graph, node: gs.Node) -> list[gs.Node] | None:
    """The ops replacing one fused norm, or None to leave it alone."""
    fused = node.op in SKIP_NORMS and node.domain == "com.microsoft"
    simple = node.op == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx", None)
    if not (fused or simple) or node.inputs[0].shape is None or not _last_axis(node) or _statistics_read(node, (1, 2)):
        return None
    if fused and SKIP_NORMS[node.op] == "layer" and (graph.opset or 0) < 17:  # no LayerNormalization below 17
        return None
    if fused:
        return _skip_norm(graph, node)
    return _norm(graph, "rms", node.inputs[0], [node.inputs[1]], float(node.attrs.get("epsilon", 1e-5)),
                 node.outputs[0], f"{node.name}_norm")


def unfuse_norms(graph: gs.Graph) -> int:
    """Rewrite onnxruntime's fused (skip) norms as described above; returns how many were rewritten."""
    from graphopt.ops.rms_norm import build_rms_norm_function

    rewritten, rms = 0, False
    for node in list(graph.nodes):
        nodes = _split(graph, node)
        if nodes is None:
            continue
        rms = rms or any(n.op == "RMSNorm" for n in nodes)
        node.outputs = []
        graph.nodes.extend(nodes)
        rewritten += 1
    if rewritten:
        if rms:
            ir.add_function(graph, build_rms_norm_function(graph.opset))
        ir.cleanup(graph)
    return rewritten

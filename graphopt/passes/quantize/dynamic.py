"""Pruning through dynamically quantized layers: onnxruntime's `quantize_dynamic` writes every MatMul and Conv as

    x_q, x_scale, x_zero = DynamicQuantizeLinear(x)
    y_int = MatMulInteger(x_q, W_q, x_zero, W_zero)      (or ConvInteger, with the Conv's attributes)
    y = Cast(y_int, float) * (x_scale * W_scale)

with stored integer weights W_q and a per-tensor (or, for MatMul, per-output-column) weight scale and zero point.
An older form of it (ddddocr ships a recogniser so quantized) also adds a Conv's bias to the integer counts,
Reshape(Cast(Floor(bias / (x_scale x W_scale)))); the float layer then takes the bias, and a rebuilt chain adds it
after the rescaling, in float.

`unquantize_layers` replaces each such chain by the float layer it approximates, y = MatMul(x, W) (or Conv) with
W = (W_q - W_zero) x W_scale, so the channel methods see float layers; while a method runs, the graph computes x
unquantized (its statistics are those of the float model the quantized one stands for). `requantize_layers`
writes every float layer back: where a layer still reads the same input with the same weight, its original nodes
go back exactly as they were; otherwise the chain is built again around the new weight, each channel keeping its
original integers and scale where it was only sliced and quantized anew from its range where it changed
(graphopt.passes.quantize.through), with one DynamicQuantizeLinear per input tensor as onnxruntime writes it.
The activation's scale is computed at run time over the whole tensor, so a layer reading fewer channels quantizes
them on its own range: pruned dynamic models are as close to their float selves as the original was to its own.

Chains of any other form (a weight computed at run time, another reader of an intermediate tensor, a per-channel
Conv scale) are left as they are, and the channel analysis leaves those layers alone with the reason. A weight
quantized anew keeps its type and scheme (symmetric where the zero points were all zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import graph as ir
from graphopt.passes.quantize.through import Quantized, quantize_weight

INTEGER_LAYERS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}
_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class DynamicLayer:
    """One dynamically quantized layer and the float layer standing for it while a method runs."""

    nodes: list[gs.Node]  # the integer op, its Cast and the two Muls, then the integer bias's nodes, if any
    inputs: list[list[gs.Tensor]]  # what each of them read, given back with them
    quantizer: gs.Node  # the DynamicQuantizeLinear it reads
    source: gs.Tensor  # what the quantizer reads
    output: gs.Variable  # the layer's float output
    weight: Quantized  # the stored weight with its scale and zero point
    layer: gs.Node = field(default=None)  # type: ignore[assignment]  # the float MatMul or Conv
    floats: np.ndarray | None = None  # the float weight it started from
    bias: np.ndarray | None = None  # the float bias an older form adds to the integer counts


def _readers(tensor: gs.Tensor, present: set[int]) -> list[gs.Node]:
    """The nodes of the graph reading `tensor` (nodes an earlier rewrite took out may still list it)."""
    return [node for node in ir.consumers(tensor) if id(node) in present]


def _single_reader(tensor: gs.Tensor, op: str, present: set[int]) -> gs.Node | None:
    readers = _readers(tensor, present)
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _match(node: gs.Node, present: set[int]) -> DynamicLayer | None:
    """`node` (a MatMulInteger or ConvInteger) and the chain around it, when it is onnxruntime's dynamic form."""
    quantizer = _quantizer_read(node)
    weight = _stored_weight(node)
    chain = _rescaling(node, quantizer, present) if quantizer is not None and weight is not None else None
    if chain is None:
        return None
    (stored, zero), (cast, scales, rescale, weight_scale, bias, bias_nodes) = weight, chain
    axis = _axis(node, stored, weight_scale, zero)
    if axis is False:
        return None
    record = Quantized(node.name, stored, weight_scale.reshape(-1).astype(np.float32),
                       None if zero is None else zero.reshape(-1), axis)
    nodes = [node, cast, scales, rescale, *bias_nodes]
    return DynamicLayer(nodes, [list(n.inputs) for n in nodes], quantizer, quantizer.inputs[0], rescale.outputs[0],
                        record, bias=bias)


def _quantizer_read(node: gs.Node) -> gs.Node | None:
    """The DynamicQuantizeLinear whose integers and zero point `node` reads."""
    if len(node.inputs) < 3 or not all(t.name for t in node.inputs[:3]):
        return None
    quantizer = ir.producer(node.inputs[0])
    if quantizer is None or quantizer.op != "DynamicQuantizeLinear" or node.inputs[2] is not quantizer.outputs[2]:
        return None
    return quantizer


def _stored_weight(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(the stored integer weight, its constant zero point or None when absent)."""
    stored = ir.constant_array(node.inputs[1])
    given = len(node.inputs) > 3 and bool(node.inputs[3].name)
    zero = ir.constant_array(node.inputs[3]) if given else None
    if stored is None or stored.dtype.kind not in "iu" or (given and zero is None):
        return None
    return stored, zero


def _rescaling(node: gs.Node, quantizer: gs.Node, present: set[int]) -> tuple | None:
    """(the Cast to float, the Mul of the two scales, the Mul rescaling the counts, the weight scale, the float bias
    added to the counts or None, the nodes computing that bias)."""
    after = _readers(node.outputs[0], present)
    bias, bias_nodes = None, []
    if node.op == "ConvInteger" and len(after) == 1 and after[0].op == "Add":
        found = _integer_bias(after[0], node.outputs[0], quantizer, present)
        if found is None:
            return None
        bias, bias_nodes = found
        after = _readers(after[0].outputs[0], present)
    cast = after[0] if len(after) == 1 and after[0].op == "Cast" and after[0].attrs.get("to") == _FLOAT else None
    scaling = _scaling(cast, quantizer, present) if cast is not None else None
    if scaling is None or (bias_nodes and not _same_scale(bias_nodes[-1], scaling[2])):
        return None
    return cast, *scaling, bias, bias_nodes


def _same_scale(bias_scale: gs.Node, weight_scale: np.ndarray) -> bool:
    """Whether the bias was quantized with the weight's scale (the product the counts are rescaled by)."""
    return any(ir.constant_array(t) is not None and np.array_equal(ir.constant_array(t), weight_scale)
               for t in bias_scale.inputs)


def _scaling(cast: gs.Node, quantizer: gs.Node, present: set[int]) -> tuple[gs.Node, gs.Node, np.ndarray] | None:
    """(the Mul of the input's and the weight's scales, the Mul of the counts by it, the weight scale)."""
    rescale = _single_reader(cast.outputs[0], "Mul", present)
    other = next((t for t in rescale.inputs if t is not cast.outputs[0]), None) if rescale is not None else None
    scales = ir.producer(other) if other is not None else None
    if scales is None or scales.op != "Mul" or quantizer.outputs[1] not in scales.inputs \
            or len(_readers(scales.outputs[0], present)) != 1:
        return None
    weight_scale = next((ir.constant_array(t) for t in scales.inputs if ir.constant_array(t) is not None), None)
    return None if weight_scale is None else (scales, rescale, weight_scale)


def _integer_bias(add: gs.Node, counts: gs.Tensor, quantizer: gs.Node, present: set[int]
                  ) -> tuple[np.ndarray, list[gs.Node]] | None:
    """An older form of onnxruntime's dynamic Conv adds its bias to the integer counts: Reshape(Cast(Floor(Div(bias,
    Mul(x_scale, W_scale))), int32), [1, C, 1, 1]). (the float bias, those nodes with the Add first), else None."""
    operand = next((t for t in add.inputs if t is not counts), None)
    chain, node = [add], ir.producer(operand) if operand is not None else None
    if node is not None and node.op == "Reshape":
        chain.append(node)
        node = ir.producer(node.inputs[0])
    for op, source in (("Cast", 0), ("Floor", 0), ("Div", 1), ("Mul", None)):
        if node is None or node.op != op or len(_readers(node.outputs[0], present)) != 1:
            return None
        chain.append(node)
        node = ir.producer(node.inputs[source]) if source is not None else None
    div, scale = chain[-2], chain[-1]
    bias = ir.constant_array(div.inputs[0])
    if bias is None or bias.dtype.kind != "f" or quantizer.outputs[1] not in scale.inputs:
        return None
    return bias.reshape(-1), chain


def _axis(node: gs.Node, stored: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> int | None | bool:
    """None for a per-tensor weight scale, the output-channel axis for a per-channel one, False for anything else."""
    channel = 0 if node.op == "ConvInteger" else stored.ndim - 1
    sizes = {scale.size} | ({zero.size} if zero is not None else set())
    if sizes == {1}:
        return None
    if node.op == "ConvInteger":  # a per-channel rescale of [N, C, H, W] is no 1-D vector: not onnxruntime's form
        return False
    per_channel = sizes == {stored.shape[channel]} and scale.ndim <= 1 and (zero is None or zero.ndim <= 1)
    return channel if per_channel else False


def unquantize_layers(graph: gs.Graph) -> list[DynamicLayer]:
    """Replace every dynamically quantized MatMul and Conv of onnxruntime's form by the float layer it stands for
    (module docstring); return what was replaced, for `requantize_layers`."""
    present = {id(node) for node in graph.nodes}
    found = []
    for node in [n for n in graph.nodes if n.op in INTEGER_LAYERS]:
        layer = _match(node, present)
        if layer is None:
            continue
        layer.floats = layer.weight.floats()
        weight = gs.Constant(ir.unique_name(graph, f"{node.inputs[1].name}_float"), layer.floats)
        attrs = dict(node.attrs) if node.op == "ConvInteger" else {}
        bias = [] if layer.bias is None else [gs.Constant(ir.unique_name(graph, f"{node.name}_bias"), layer.bias)]
        layer.layer = gs.Node(INTEGER_LAYERS[node.op], ir.unique_name(graph, f"{node.name}_float"), attrs=attrs,
                              inputs=[layer.source, weight, *bias], outputs=[])
        for old in layer.nodes:
            graph.nodes.remove(old)
            present.discard(id(old))
            old.inputs.clear()
        layer.nodes[3].outputs.clear()  # the rescaling Mul
        layer.layer.outputs.append(layer.output)
        graph.nodes.append(layer.layer)
        found.append(layer)
    quantizers = {id(layer.quantizer): layer.quantizer for layer in found}
    for quantizer in quantizers.values():
        if not any(_readers(out, present) for out in quantizer.outputs):
            graph.nodes.remove(quantizer)
            quantizer.inputs.clear()  # no longer a reader of its input
    if found:
        graph.toposort(recurse_subgraphs=False, recurse_functions=False, mode="nodes")
    return found


def requantize_layers(graph: gs.Graph, layers: list[DynamicLayer]) -> dict[str, int]:
    """Write every float layer `unquantize_layers` made back in its dynamically quantized form (module docstring);
    stats: channels restored as they were and channels quantized anew."""
    stats = {"quantized_channels_kept": 0, "quantized_channels_requantized": 0}
    present = {id(node) for node in graph.nodes}
    quantizers: dict[int, gs.Node] = {}  # input tensor id -> the DynamicQuantizeLinear reading it
    for layer in layers:
        if id(layer.layer) not in present:
            continue
        weight = ir.constant_array(layer.layer.inputs[1])
        has_bias = len(layer.layer.inputs) > 2 and bool(layer.layer.inputs[2].name)
        bias = ir.constant_array(layer.layer.inputs[2]) if has_bias else None
        if weight is None or (has_bias and bias is None):
            continue  # left a float layer: nothing here computes it in integers
        if _unchanged(layer, weight, bias):
            _restore(graph, layer, quantizers)
            stats["quantized_channels_kept"] += layer.weight.scale.size
            continue
        _rebuild(graph, layer, weight, bias, _quantizer(graph, layer.layer.inputs[0], quantizers, layer))
        kept = sum(c is not None for c in layer.weight.written_channels)
        stats["quantized_channels_kept"] += kept
        stats["quantized_channels_requantized"] += len(layer.weight.written_channels) - kept
    ir.cleanup(graph)
    return stats


def _unchanged(layer: DynamicLayer, weight: np.ndarray, bias: np.ndarray | None) -> bool:
    """Whether the float layer reads and writes what it did, with the weight, bias and attributes it started from."""
    same_bias = (bias is None and layer.bias is None) or (bias is not None and layer.bias is not None and
                                                          np.array_equal(bias.reshape(-1), layer.bias))
    same_attrs = layer.layer.op == "MatMul" or layer.layer.attrs == layer.nodes[0].attrs
    return layer.layer.inputs[0] is layer.source and layer.layer.outputs[0] is layer.output and same_bias \
        and weight.shape == layer.floats.shape and np.array_equal(weight, layer.floats) and same_attrs


def _restore(graph: gs.Graph, layer: DynamicLayer, quantizers: dict[int, gs.Node]) -> None:
    """The original chain, its DynamicQuantizeLinear put back once."""
    _detach(graph, layer)
    _put_back(graph, layer.quantizer, layer.source)
    quantizers.setdefault(id(layer.source), layer.quantizer)
    for node, inputs in zip(layer.nodes, layer.inputs):
        node.inputs.extend(inputs)
    layer.nodes[3].outputs.append(layer.output)
    graph.nodes.extend(layer.nodes)


def _put_back(graph: gs.Graph, quantizer: gs.Node, source: gs.Tensor) -> None:
    """The original DynamicQuantizeLinear, reading `source` again, once."""
    if not any(n is quantizer for n in graph.nodes):
        graph.nodes.append(quantizer)
        if not quantizer.inputs:
            quantizer.inputs.append(source)


def _detach(graph: gs.Graph, layer: DynamicLayer) -> None:
    layer.layer.outputs.clear()
    layer.layer.inputs.clear()
    graph.nodes.remove(layer.layer)


def _quantizer(graph: gs.Graph, source: gs.Tensor, quantizers: dict[int, gs.Node], layer: DynamicLayer) -> gs.Node:
    """The DynamicQuantizeLinear of `source`: the original where it read this tensor, else a new one, once."""
    if id(source) in quantizers:
        return quantizers[id(source)]
    if source is layer.source:
        quantizer = layer.quantizer
        _put_back(graph, quantizer, source)
    else:
        base = ir.unique_name(graph, f"{source.name}_QuantizeLinear")
        outputs = [gs.Variable(ir.unique_name(graph, f"{source.name}_{suffix}"), dtype=dtype, shape=shape)
                   for suffix, dtype, shape in (("quantized", np.uint8, source.shape), ("scale", np.float32, []),
                                                ("zero_point", np.uint8, []))]
        quantizer = gs.Node("DynamicQuantizeLinear", base, inputs=[source], outputs=outputs)
        graph.nodes.append(quantizer)
    quantizers[id(source)] = quantizer
    return quantizer


def _rebuild(graph: gs.Graph, layer: DynamicLayer, weight: np.ndarray, bias: np.ndarray | None,
             quantizer: gs.Node) -> None:
    """The quantized chain around the float layer's new weight, writing the layer's output; a bias is added to the
    rescaled output in float."""
    stored, scale, zero = quantize_weight(layer.weight, np.asarray(weight, dtype=np.float32))
    integer, cast, scales, rescale = layer.nodes[:4]
    attrs = dict(layer.layer.attrs)  # a pruned grouped convolution has fewer groups
    base = integer.name or f"{integer.op}_quant"
    names = [ir.unique_name(graph, name) for name in (scales.name or f"{base}_scales_mul", base,
                                                       cast.name or f"{base}_cast", rescale.name or f"{base}_rescale")]
    inputs = [quantizer.outputs[0], gs.Constant(ir.unique_name(graph, f"{base}_weight_quantized"), stored),
              quantizer.outputs[2]]
    if zero is not None:
        inputs.append(gs.Constant(ir.unique_name(graph, f"{base}_weight_zero_point"), zero))
    combined = gs.Variable(ir.unique_name(graph, f"{base}_scales"), dtype=np.float32)
    counted = gs.Variable(ir.unique_name(graph, f"{base}_output_quantized"), dtype=np.int32)
    floated = gs.Variable(ir.unique_name(graph, f"{base}_output_cast"), dtype=np.float32)
    scale_constant = gs.Constant(ir.unique_name(graph, f"{base}_weight_scale"), np.asarray(scale, np.float32))
    output = layer.layer.outputs[0]  # a method may have put an Add (SNP's bias shift) between it and the original
    scaled = output if bias is None else gs.Variable(ir.unique_name(graph, f"{base}_scaled"), dtype=np.float32)
    _detach(graph, layer)
    graph.nodes.extend([
        gs.Node("Mul", names[0], inputs=[quantizer.outputs[1], scale_constant], outputs=[combined]),
        gs.Node(integer.op, names[1], attrs=attrs, inputs=inputs, outputs=[counted]),
        gs.Node("Cast", names[2], attrs={"to": _FLOAT}, inputs=[counted], outputs=[floated]),
        gs.Node("Mul", names[3], inputs=[floated, combined], outputs=[scaled])])
    if bias is not None:  # [C] onto the channels of [N, C, ...]
        shaped = np.asarray(bias, np.float32).reshape([1, -1] + [1] * (weight.ndim - 2))
        graph.nodes.append(gs.Node("Add", ir.unique_name(graph, f"{base}_bias_add"),
                                   inputs=[scaled, gs.Constant(ir.unique_name(graph, f"{base}_bias"), shaped)],
                                   outputs=[output]))

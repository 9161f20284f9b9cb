"""An ONNX graph as a torch module: its weights become parameters, its nodes run as torch ops in graph order.

`GraphModule(model)` keeps every initializer of the main graph as a tensor of its own dtype: the float32
and float64 weights and biases of Conv, ConvTranspose, Gemm, MatMul and Einsum, the scale and bias of
LayerNormalization, BatchNormalization, InstanceNormalization and GroupNormalization, the table of a Gather
(an embedding), the weights, biases and peepholes of LSTM, GRU and RNN, PRelu's slope and the bias a
Conv/Gemm/MatMul output is added to become `nn.Parameter`s (`parameters_by_name()`, keyed by
initializer name); every other initializer is a buffer. `forward(feed, names)` runs the nodes in the
graph's (topological) order, one rule per op type (graphopt.torch.interpreter.registry), and returns the
graph outputs, or the tensors `names`. Values no later node or requested name reads are dropped as soon as
their last reader ran.

A node without a rule (another domain, control flow, an op not covered) is refused when the module is
built, in one line naming the op and the node (`UnsupportedOpError`); so is a rule that cannot honour an
attribute, and an error torch raises inside a rule is reported the same way with the node's name.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from graphopt.errors import DataError, UnsupportedOpError
from graphopt.ir import weights
from graphopt.torch.interpreter import elementwise, functions, linear, recurrent, shape  # noqa: F401  (their rules)
from graphopt.torch.interpreter.registry import Call, check_domain, node_rule

# op type -> the input positions that hold its trainable weights
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Einsum": tuple(range(8)),
    "LayerNormalization": (1, 2), "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "Gather": (0,),
    "GroupNormalization": (1, 2),
    "LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3), "RNN": (1, 2, 3),  # W, R, B (and LSTM's peepholes)
    "PRelu": (1,),
}
LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"})
TRAINABLE_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def refuse_unsupported(model: onnx.ModelProto) -> None:
    """Raise `UnsupportedOpError` naming the first node no rule can run (and how many more there are)."""
    reasons = [why for why in map(check_domain, model.graph.node) if why is not None]
    if reasons:
        others = sorted({r.split(" of node ")[0].removeprefix("op ") for r in reasons[1:]})
        more = f"; {len(reasons) - 1} more node(s) of unsupported ops: {', '.join(others)}" if others else ""
        raise UnsupportedOpError(f"--repair cannot train through the model: {reasons[0]}{more}")


def _biases(graph: onnx.GraphProto, floats: set[str]) -> set[str]:
    """Float initializers added to a Conv/ConvTranspose/Gemm/MatMul/Einsum output: the layer's bias."""
    linear_outputs = {out for node in graph.node if node.op_type in LINEAR for out in node.output}
    return {name for node in graph.node if node.op_type == "Add" and set(node.input) & linear_outputs
            for name in node.input if name in floats}


def weight_names(graph: onnx.GraphProto) -> set[str]:
    """The float initializers that become parameters (see the module docstring)."""
    floats = {t.name for t in graph.initializer if t.data_type in TRAINABLE_DTYPES}
    found = {name for node in graph.node for index, name in enumerate(node.input)
             if index in WEIGHT_INPUTS.get(node.op_type, ()) and name in floats}
    return found | _biases(graph, floats)


class GraphModule(nn.Module):
    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        refuse_unsupported(model)
        graph = model.graph
        opset = default_opset(model)
        self.calls = [Call.of(node, opset) for node in graph.node]
        trainable = weight_names(graph)
        self.parameter_names: list[str] = []
        self.buffer_names: dict[str, str] = {}  # initializer name -> the buffer attribute holding it
        self.weights = nn.ParameterList()
        for index, tensor in enumerate(graph.initializer):
            value = torch.from_numpy(np.array(weights.array_of(tensor), copy=True))
            if tensor.name in trainable:
                self.parameter_names.append(tensor.name)
                self.weights.append(nn.Parameter(value))
            else:
                self.register_buffer(f"constant_{index}", value)
                self.buffer_names[tensor.name] = f"constant_{index}"
        known = set(self.parameter_names) | set(self.buffer_names)
        self.inputs = [i.name for i in graph.input if i.name not in known]
        self.outputs = [o.name for o in graph.output]
        self.last_reader: dict[str, int] = {}
        for position, node in enumerate(graph.node):
            self.last_reader.update((name, position) for name in node.input if name)

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.parameter_names, self.weights))

    def _initial(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self.inputs if name not in feed]
        if missing:
            raise DataError(f"the torch interpreter was given no value for input(s) {missing}")
        values: dict[str, torch.Tensor] = dict(zip(self.parameter_names, self.weights))
        values.update((name, getattr(self, attr)) for name, attr in self.buffer_names.items())
        values.update((name, feed[name]) for name in self.inputs)
        return values

    def forward(self, feed: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The graph outputs (or the tensors `names`) for `feed` (input name -> tensor)."""
        wanted = list(names) if names is not None else self.outputs
        keep = set(wanted)
        values = self._initial(feed)
        for position, call in enumerate(self.calls):
            found = self._run(call, [values[name] if name else None for name in call.node.input])
            for name, value in zip(call.node.output, found):
                if name:
                    values[name] = value
            for name in call.node.input:
                if name and self.last_reader.get(name) == position and name not in keep:
                    values.pop(name, None)
        absent = [name for name in wanted if name not in values]
        if absent:
            raise DataError(f"the graph computes no tensor named {absent}")
        return {name: values[name] for name in wanted}

    @staticmethod
    def _run(call: Call, inputs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs.pop()
        try:
            found = node_rule(call.node)(call, inputs)
        except UnsupportedOpError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise call.refuse(f"torch raised: {first}") from exc
        return [found] if isinstance(found, torch.Tensor) else list(found)

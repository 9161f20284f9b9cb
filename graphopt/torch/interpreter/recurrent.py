"""Rules for the recurrent ops LSTM, GRU and RNN, step by step as the ONNX specification writes them.

Gate order as ONNX stores it: LSTM i, o, f, c (W [directions, 4H, I], R [directions, 4H, H], B the input
biases Wb then the recurrent ones Rb, peepholes P [directions, 3H] for i, o, f); GRU z, r, h
(`linear_before_reset` either way); RNN one gate. Directions forward, reverse (the sequence read from its end,
each step's state written at its own position) and bidirectional; initial states. Refused with the reason:
activations other than the defaults (Sigmoid/Tanh/Tanh, Sigmoid/Tanh, Tanh), `clip`, LSTM's `input_forget`,
`sequence_lens` shorter than the sequence, and `layout` 1 (batch first, which onnxruntime's CPU kernels do
not run either).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from graphopt.torch.interpreter.registry import Call, rule

_DEFAULTS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}

Step = Callable[[torch.Tensor, tuple[torch.Tensor, ...], int], tuple[torch.Tensor, ...]]


def _directions(call: Call) -> list[bool]:
    """Per direction whether it reads the sequence backwards."""
    direction = call.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise call.refuse(f"direction {direction}")
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


def _check(call: Call, inputs: list[Any], steps: int) -> None:
    op = call.node.op_type
    count = len(_directions(call))
    activations = [a.lower() for a in call.attr("activations", [])]
    if activations and activations != _DEFAULTS[op] * count:
        raise call.refuse(f"activations {call.attr('activations')} (only the defaults {_DEFAULTS[op]} are supported)")
    if call.attr("clip") is not None:
        raise call.refuse("clip")
    if op == "LSTM" and call.attr("input_forget", 0):
        raise call.refuse("input_forget")
    if int(call.attr("layout", 0)):
        raise call.refuse("layout 1 (batch first)")
    lengths = inputs[4] if len(inputs) > 4 else None
    if lengths is not None and bool((lengths != steps).any()):
        raise call.refuse("sequence_lens shorter than the sequence")


def _state(inputs: list[Any], index: int, direction: int, batch: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
    given = inputs[index] if len(inputs) > index else None
    return like.new_zeros(batch, hidden) if given is None else given[direction]


def _lstm_step(w: torch.Tensor, r: torch.Tensor, b: torch.Tensor, p: torch.Tensor | None) -> Step:
    def step(x: torch.Tensor, state: tuple[torch.Tensor, ...], _: int) -> tuple[torch.Tensor, ...]:
        h, c = state
        i, o, f, g = (x @ w.T + h @ r.T + b).chunk(4, dim=-1)
        if p is not None:
            i, f = i + p[0] * c, f + p[2] * c
        i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
        c = f * c + i * g
        o = torch.sigmoid(o + p[1] * c if p is not None else o)
        return o * torch.tanh(c), c
    return step


def _gru_step(w: torch.Tensor, r: torch.Tensor, wb: torch.Tensor, rb: torch.Tensor, before_reset: bool) -> Step:
    hidden = r.shape[1]

    def step(x: torch.Tensor, state: tuple[torch.Tensor, ...], _: int) -> tuple[torch.Tensor, ...]:
        (h,) = state
        xz, xr, xh = (x @ w.T + wb).chunk(3, dim=-1)
        rz, rr = (h @ r[:2 * hidden].T + rb[:2 * hidden]).chunk(2, dim=-1)
        z, reset = torch.sigmoid(xz + rz), torch.sigmoid(xr + rr)
        if before_reset:
            candidate = torch.tanh(xh + reset * (h @ r[2 * hidden:].T + rb[2 * hidden:]))
        else:
            candidate = torch.tanh(xh + (reset * h) @ r[2 * hidden:].T + rb[2 * hidden:])
        return ((1 - z) * candidate + z * h,)
    return step


def _rnn_step(w: torch.Tensor, r: torch.Tensor, b: torch.Tensor) -> Step:
    def step(x: torch.Tensor, state: tuple[torch.Tensor, ...], _: int) -> tuple[torch.Tensor, ...]:
        return (torch.tanh(x @ w.T + state[0] @ r.T + b),)
    return step


def _run(call: Call, inputs: list[Any], make_step: Callable[[int], Step], states: int) -> list[torch.Tensor | None]:
    """Y, Y_h (and Y_c for LSTM): each direction's steps over the sequence, stacked as ONNX lays them out."""
    sequence, r = inputs[0], inputs[2]  # [seq, batch, features]
    steps, batch, hidden = sequence.shape[0], sequence.shape[1], r.shape[-1]
    _check(call, inputs, steps)
    ys, finals = [], []
    for direction, backwards in enumerate(_directions(call)):
        step = make_step(direction)
        state = tuple(_state(inputs, 5 + k, direction, batch, hidden, sequence) for k in range(states))
        outputs: list[torch.Tensor] = [sequence.new_zeros(0)] * steps
        for t in (reversed(range(steps)) if backwards else range(steps)):
            state = step(sequence[t], state, t)
            outputs[t] = state[0]
        ys.append(torch.stack(outputs))  # [seq, batch, hidden]
        finals.append(state)
    y = torch.stack(ys, dim=1)  # [seq, directions, batch, hidden]
    last = [torch.stack([final[k] for final in finals]) for k in range(states)]  # [directions, batch, hidden]
    return [y, *last]  # matched to the node's outputs by position; unnamed ones are dropped


def _split_bias(inputs: list[Any], direction: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bias = inputs[3] if len(inputs) > 3 else None
    if bias is None:
        return like.new_zeros(width), like.new_zeros(width)
    return bias[direction, :width], bias[direction, width:]


@rule("LSTM")
def lstm(call: Call, inputs: list[Any]) -> list[torch.Tensor | None]:
    w, r = inputs[1], inputs[2]
    peepholes = inputs[7] if len(inputs) > 7 else None

    def make(direction: int) -> Step:
        wb, rb = _split_bias(inputs, direction, w.shape[1], w)
        p = peepholes[direction].chunk(3) if peepholes is not None else None
        return _lstm_step(w[direction], r[direction], wb + rb, p)
    return _run(call, inputs, make, 2)


@rule("GRU")
def gru(call: Call, inputs: list[Any]) -> list[torch.Tensor | None]:
    w, r = inputs[1], inputs[2]
    before_reset = bool(call.attr("linear_before_reset", 0))

    def make(direction: int) -> Step:
        wb, rb = _split_bias(inputs, direction, w.shape[1], w)
        return _gru_step(w[direction], r[direction], wb, rb, before_reset)
    return _run(call, inputs, make, 1)


@rule("RNN")
def rnn(call: Call, inputs: list[Any]) -> list[torch.Tensor | None]:
    w, r = inputs[1], inputs[2]

    def make(direction: int) -> Step:
        wb, rb = _split_bias(inputs, direction, w.shape[1], w)
        return _rnn_step(w[direction], r[direction], wb + rb)
    return _run(call, inputs, make, 1)


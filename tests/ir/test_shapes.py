"""Input shapes: dimension symbols bind once across inputs; batch axes wherever they sit."""

from __future__ import annotations

import re

import onnx
import pytest

from graphopt.errors import OptionError
from graphopt.ir.shapes import batch_axes, resolve_input_shapes
from tests.conftest import tiny


def bert_like() -> onnx.ModelProto:
    """Three token inputs sharing `batch` and `sequence`, as a BERT export declares them."""
    return tiny("""a = Cast <to = 1> (input_ids)
                   b = Cast <to = 1> (attention_mask)
                   c = Cast <to = 1> (token_type_ids)
                   s = Add (a, b)
                   y = Add (s, c)""",
                inputs="int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask, "
                       "int64[batch, sequence] token_type_ids", outputs="float[batch, sequence] y")


NAMES = ("input_ids", "attention_mask", "token_type_ids")


@pytest.mark.parametrize("explicit", [{"sequence": (128,)}, {"sequence": 128}, {"input_ids": (1, 128)},
                                      {"sequence": 128, "attention_mask": (1, 128)}])
def test_a_symbol_binds_every_input_that_shares_it(explicit):
    assert resolve_input_shapes(bert_like(), explicit) == {name: (1, 128) for name in NAMES}


def test_symbols_and_inputs_mix_and_the_batch_symbol_can_be_set():
    shapes = resolve_input_shapes(bert_like(), {"batch": 4, "sequence": 16})
    assert shapes == {name: (4, 16) for name in NAMES}
    assert resolve_input_shapes(bert_like(), {"sequence": 8}, {"input_ids": (1, 32)})["input_ids"] == (1, 8)


@pytest.mark.parametrize("explicit,message", [
    ({"seq": 128}, "--input-shape names 'seq', which is not a model input nor a dimension symbol (inputs: "
                   "['attention_mask', 'input_ids', 'token_type_ids']; symbols: ['batch', 'sequence'])"),
    ({"sequence": (1, 128)}, "'sequence' is a dimension symbol (of input_ids[1], attention_mask[1], "
                             "token_type_ids[1]); give one size, sequence=N"),
    ({"sequence": 128, "input_ids": (1, 64)}, "gives dimension 'sequence' two sizes: 128 (sequence=128) and 64 "
                                               "(input_ids=1x64)"),
    ({"input_ids": (1, 64), "attention_mask": (1, 32)}, "two sizes: 64 (input_ids=1x64) and 32"),
    ({"sequence": 0}, "sizes must be positive integers"),
])
def test_bad_keys_and_contradictions_are_refused(explicit, message):
    with pytest.raises(OptionError) as info:
        resolve_input_shapes(bert_like(), explicit)
    assert message in str(info.value)


def test_a_key_that_is_both_a_rank1_input_and_a_symbol_is_ambiguous():
    model = tiny("y = Add (x, L)", inputs="float[N, L] x, float[L] L", outputs="float[N, L] y")
    with pytest.raises(OptionError, match=r"--input-shape L=5 is ambiguous: 'L' is both a rank-1 input and a "
                                          r"dimension symbol .*inputs: \['L', 'x'\]; symbols: \['L', 'N'\]"):
        resolve_input_shapes(model, {"L": 5})
    assert resolve_input_shapes(model, {"x": (1, 5)}) == {"x": (1, 5), "L": (5,)}


def test_an_unbound_symbol_names_both_ways_to_give_it():
    with pytest.raises(OptionError, match=r"input 'input_ids' has dynamic axis 1 \('sequence'\): give "
                                          r"--input-shape sequence=N or --input-shape input_ids=\.\.\."):
        resolve_input_shapes(bert_like())


def test_batch_symbols_default_to_one_wherever_they_sit():
    model = tiny("""ys, yh = GRU <hidden_size = 3> (x, w, r, "", "", h0)""",
                 inputs="float[T, batch, 4] x, float[1, batch, 3] h0, float[1, 9, 4] w, float[1, 9, 3] r",
                 outputs="float[T, 1, batch, 3] ys, float[1, batch, 3] yh")
    assert batch_axes(model) == {"x": 1, "h0": 1, "w": None, "r": None}
    assert resolve_input_shapes(model, {"T": 10}) == {"x": (10, 1, 4), "h0": (1, 1, 3), "w": (1, 9, 4),
                                                      "r": (1, 9, 3)}


@pytest.mark.parametrize("inputs,expected", [
    ("float[?, 4] x, float[2, ?, 128] state", {"x": 0, "state": 1}),  # silero-vad style, unnamed dims
    ("float[N, 4] x, float[3, L] pos", {"x": 0, "pos": None}),  # a named non-batch symbol is not a batch axis
    ("float[1, 4] x, float[2, 1, 3] state", {"x": None, "state": None}),
    ("float[seq, bs, 8] x", {"x": 1}),
])
def test_batch_axes(inputs, expected):
    declared = re.findall(r"(\w+\[[^\]]*\]) (\w+)", inputs)
    outputs = ", ".join(f"{kind} {name}_out" for kind, name in declared)
    body = "\n".join(f"{name}_out = Identity ({name})" for _, name in declared)
    assert batch_axes(tiny(body, inputs=inputs, outputs=outputs)) == expected

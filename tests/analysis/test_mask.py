"""Attention-mask inputs found in the graph (graphopt/analysis/mask.py): the forms exporters write, which
entries mark kept tokens, and the integer inputs that are not masks."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.analysis.mask import find_masks
from tests.conftest import init, parse, tiny, weights

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
SCORES = """
    e = Gather(table, ids)
    q = MatMul(e, wq)
    kt = Transpose <perm = [0, 2, 1]> (e)
    raw = MatMul(q, kt)
    scores = Div(raw, scale)
"""
INITS = [init("table", weights(11, 4)), init("wq", weights(4, 4, seed=1)), init("scale", [2.0])]


def _attention(mask_lines: str, *, mask_type: str = "int64[N, T] mask", extra: list[str] | None = None,
               output: str = "float[N, T, T] y") -> tuple[list, dict]:
    model = tiny(SCORES + mask_lines + "\n    y = Softmax <axis = -1> (biased)",
                 inputs=f"int64[N, T] ids, {mask_type}", outputs=output,
                 inits=", ".join(INITS + (extra or [])))
    return find_masks(model)


HF_BIAS = """
    m1 = Unsqueeze(mask, one)
    m2 = Cast <to = 1> (m1)
    inverted = Sub(unit, m2)
    bias = Mul(inverted, big_negative)
    biased = Add(scores, bias)
"""
HF_INITS = [init("one", [1], "int64"), init("unit", [1.0]), init("big_negative", [-10000.0])]


def test_an_hf_style_additive_mask_is_found_and_token_ids_are_not() -> None:
    found, rejected = _attention(HF_BIAS, extra=HF_INITS)
    assert [(m.name, m.rank, m.keeps) for m in found] == [("mask", 2, "nonzero")]
    assert "Softmax" in found[0].evidence
    assert rejected == {"ids": "read as the indices of Gather '' (token ids, not a mask)"}


@pytest.mark.parametrize("fill_where,keeps", [("Equal(mask, zero)", "nonzero"), ("Cast <to = 9> (mask)", "zero")])
def test_a_masked_fill_says_which_entries_count(fill_where: str, keeps: str) -> None:
    """Where(mask == 0, -inf, scores): ones count; Where(padding, -inf, scores) (a key-padding mask that
    is True at padded positions): zeros count."""
    lines = f"""
    condition = {fill_where}
    c4 = Unsqueeze(condition, one)
    biased = Where(c4, minus_inf, scores)
"""
    found, _ = _attention(lines, extra=[init("one", [1], "int64"), init("zero", [0], "int64"),
                                        init("minus_inf", [-1e30])])
    assert [(m.name, m.keeps) for m in found] == [("mask", keeps)]


def test_a_boolean_key_padding_mask_turned_into_a_bias_counts_its_false_entries() -> None:
    lines = """
    f = Cast <to = 1> (mask)
    bias = Mul(f, big_negative)
    b3 = Unsqueeze(bias, one)
    biased = Add(scores, b3)
"""
    found, _ = _attention(lines, mask_type="bool[N, T] mask", extra=[init("one", [1], "int64"),
                                                                      init("big_negative", [-10000.0])])
    assert [(m.name, m.keeps) for m in found] == [("mask", "zero")]


def test_a_mask_that_never_meets_the_scores_is_not_taken() -> None:
    """The mask weights a pooled sum (no Softmax reads it): not an attention mask."""
    model = tiny("""
        weight = Cast <to = 1> (mask)
        column = Unsqueeze(weight, last)
        kept = Mul(x, column)
        probs = Softmax <axis = -1> (x)
        y = Add(kept, probs)""", inputs="float[N, T, 4] x, int64[N, T] mask", outputs="float[N, T, 4] y",
                 inits=init("last", [2], "int64"))
    found, rejected = find_masks(model)
    assert found == [] and rejected == {"mask": "reaches no Softmax and no attention mask input"}


def test_no_integer_input_means_nothing_to_find() -> None:
    model = tiny("y = Softmax <axis = -1> (x)", inputs="float[N, 4] x", outputs="float[N, 4] y")
    assert find_masks(model) == ([], {})


def test_ids_compared_in_the_graph_are_still_token_ids() -> None:
    """A model that derives its mask from the ids (ids != pad) reads the ids as Gather indices too."""
    lines = """
    pad = Equal(ids, zero)
    p4 = Unsqueeze(pad, one)
    biased = Where(p4, minus_inf, scores)
"""
    model = tiny(SCORES + lines + "\n    y = Softmax <axis = -1> (biased)", inputs="int64[N, T] ids",
                 outputs="float[N, T, T] y",
                 inits=", ".join(INITS + [init("one", [1], "int64"), init("zero", [0], "int64"),
                                          init("minus_inf", [-1e30])]))
    found, rejected = find_masks(model)
    assert found == [] and "token ids" in rejected["ids"]


def test_contrib_attention_mask_index_also_through_embed_layer_normalization() -> None:
    direct = parse(f"""{HEADER}
        g (float[N, T, 8] x, int32[N, T] mask) => (float[N, T, 8] y) <float[8, 24] w, float[24] b> {{
            y = com.microsoft.Attention <num_heads = 2> (x, w, b, mask)
        }}""", check=False)
    found, _ = find_masks(direct)
    assert [(m.name, m.keeps) for m in found] == [("mask", "nonzero")] and "input 3" in found[0].evidence
    embedded = parse(f"""{HEADER}
        g (int32[N, T] ids, int32[N, T] segments, int32[N, T] mask) => (float[N, T, 8] y)
          <float[11, 8] words, float[16, 8] positions, float[2, 8] kinds, float[8] gamma, float[8] beta,
           float[8, 24] w, float[24] b> {{
            e, index = com.microsoft.EmbedLayerNormalization(ids, segments, words, positions, kinds, gamma, beta, mask)
            y = com.microsoft.Attention <num_heads = 2> (e, w, b, index)
        }}""", check=False)
    found, rejected = find_masks(embedded)
    assert [m.name for m in found] == ["mask"]
    assert set(rejected) == {"ids", "segments"}


def test_a_four_dimensional_mask_is_found_with_its_rank() -> None:
    lines = """
    f = Cast <to = 1> (mask)
    inverted = Sub(unit, f)
    bias = Mul(inverted, big_negative)
    biased = Add(scores, bias)
"""
    found, _ = _attention(lines, mask_type="int64[N, 1, T, T] mask", output="float[N, 1, T, T] y",
                          extra=[init("unit", [1.0]), init("big_negative", [-10000.0])])
    assert [(m.name, m.rank, m.keeps) for m in found] == [("mask", 4, "nonzero")]


def test_an_undecidable_polarity_defaults_to_nonzero_and_says_so() -> None:
    """A bias scaled by a non-uniform constant: which value keeps tokens cannot be read as a scalar."""
    lines = """
    f = Cast <to = 1> (mask)
    bias = Mul(f, ramp)
    biased = Add(scores, bias)
"""
    found, _ = _attention(lines, extra=[init("ramp", np.linspace(-1, 1, 4).astype(np.float32))])
    assert [(m.name, m.keeps) for m in found] == [("mask", "nonzero")]
    assert "undecided" in found[0].evidence

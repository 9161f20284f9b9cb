"""Property tests on random graphs (tests/fuzz: the supported op set; NCHW, NHWC-with-Transpose, token and
feature layouts; residual branches; planted zero, constant and dead channels):

- magnitude pruning with the target that asks for exactly the all-zero channels removes them exactly
  (onnxruntime, optimisations disabled, within 1e-4) and reaches that target;
- dead-unit elimination is exact on planted zero, constant and dead channels;
- SNP at a MAC target of 0.7 on random calibration data gives a valid model;
and every result passes the ONNX full check and runs with the original's input/output names, dtypes and
declared dims. No exception but a GraphoptError (a one-line refusal) may escape.

Hypothesis runs derandomised with a fixed example budget, so CI sees the same few hundred graphs every
time; bench/fuzz.py sweeps thousands of seeded graphs and tabulates failures by kind. A failing example
is shrunk and printed as ONNX text (onnx.parser.parse_model reads it back). The bugs the sweeps found are
kept below as hand-written reproducers.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import graphopt
from tests.conftest import assert_equivalent, init, random_inputs, tiny, weights
from tests.fuzz.builder import DEAD_UNITS, MAGNITUDE, Example
from tests.fuzz.checks import EXACT, Outcome, check_dead_units, check_magnitude, check_snp, describe
from tests.fuzz.graphs import build

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class DrawChooser:
    """Choices drawn from hypothesis, so a failing graph shrinks to a short one."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))


def _holds(outcome: Outcome, example: Example) -> None:
    if outcome.refusal is not None:  # a refusal is allowed: one clear line
        assert outcome.refusal.strip() and "\n" not in outcome.refusal, outcome.refusal
    assert outcome.failure is None, (f"{outcome.method}: {outcome.failure[0]}: {outcome.failure[1]}\n"
                                     f"{describe(example)}")


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_magnitude_removes_planted_zero_channels_exactly(data: st.DataObject) -> None:
    example = build(DrawChooser(data), MAGNITUDE)
    _holds(check_magnitude(example), example)


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_dead_units_is_exact_on_planted_zero_constant_and_dead_channels(data: st.DataObject) -> None:
    example = build(DrawChooser(data), DEAD_UNITS)
    _holds(check_dead_units(example), example)


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_snp_gives_a_valid_model_with_the_same_interface(data: st.DataObject) -> None:
    example = build(DrawChooser(data), DEAD_UNITS if data.draw(st.booleans()) else MAGNITUDE)
    _holds(check_snp(example), example)


# -- bugs the fuzzer found, kept as ONNX-text reproducers ----------------------------------------

def test_dead_units_history_keeps_the_groups_a_split_cuts_apart() -> None:
    """One producer's channels split into two groups, each with a constant unit: the report's history named
    both groups by the same producer weight and crashed mapping one group's removals onto the other."""
    w1 = weights(4, 5, seed=1)
    w1[:, [1, 4]] = 0.0
    bias = weights(5, seed=2)
    model = tiny("[p] h = MatMul (x, w1)\n[pb] hb = Add (h, b1)\n[s] a, b = Split <axis = 1> (hb, sizes)\n"
                 "[ra] ra = Relu (a)\n[rb] rb = Tanh (b)\n[ca] ya = MatMul (ra, wa)\n[cb] yb = MatMul (rb, wb)\n"
                 "[o] y = Add (ya, yb)", inputs="float[N, 4] x", outputs="float[N, 3] y",
                 inits=", ".join([init("w1", w1), init("b1", bias), init("sizes", [2, 3], "int64"),
                                  init("wa", weights(2, 3, seed=3)), init("wb", weights(3, 3, seed=4))]))
    result = graphopt.optimize(model, method="dead-units")
    assert_equivalent(model, result.model, random_inputs(model, batch=3), rtol=EXACT, atol=EXACT)
    history = result.report["passes"][-1]["history"]
    assert sorted((entry["size"], entry["removed"], entry["reasons"]) for entry in history) == \
        [(2, [1], ["constant"]), (3, [2], ["constant"])]


def test_dead_units_keeps_a_constant_channel_that_a_per_feature_batchnorm_spreads() -> None:
    """Conv -> Flatten -> BatchNormalization over the 8 features: a constant channel leaves the BatchNorm as 4
    different values, but the first feature's value was folded for all four (off by 2.4 on the output)."""
    model = tiny("[c] h = Conv (x, w, b)\n[f] f = Flatten (h)\n[n] g = BatchNormalization (f, s, t, m, v)\n"
                 "[o] y = MatMul (g, wo)", inputs="float[N, 1, 2, 2] x", outputs="float[N, 3] y",
                 inits=", ".join([init("w", [[[[1.5]]], [[[0.0]]]]), init("b", [0.25, 0.5]),
                                  init("s", weights(8, seed=5)), init("t", weights(8, seed=6)),
                                  init("m", weights(8, seed=7)), init("v", np.abs(weights(8, seed=8)) + 0.5),
                                  init("wo", weights(8, 3, seed=9))]))
    result = graphopt.optimize(model, method="dead-units")
    assert_equivalent(model, result.model, random_inputs(model, batch=3), rtol=EXACT, atol=EXACT)
    assert result.report["passes"][-1]["skipped"] == \
        ["group 0: 1 constant channels kept at o: value not evaluated through BatchNormalization"]


def test_dead_units_folds_coupled_channels_only_when_their_constants_agree() -> None:
    """A channel shuffle (Reshape into 2 groups, Transpose, Reshape back) couples conv channels 0 and 2; both
    are constant, -0.5 and 0. One of the two values was folded for both (the other head's leaf overwrote it)."""
    weight = weights(4, 2, 1, 1, seed=1)
    weight[:3] = 0.0
    model = tiny("[p] h = Conv (x, w, b)\n[r1] s = Reshape (h, split)\n[t] m = Transpose <perm = [0, 2, 1, 3, 4]> (s)\n"
                 "[r2] k = Reshape (m, merge)\n[c] y = Conv (k, wc)",
                 inputs="float[N, 2, 3, 3] x", outputs="float[N, 3, 3, 3] y",
                 inits=", ".join([init("w", weight), init("b", [-0.5, 0.3, 0.0, 0.1]),
                                  init("split", [0, 2, 2, 3, 3], "int64"), init("merge", [0, 4, 3, 3], "int64"),
                                  init("wc", weights(3, 4, 1, 1, seed=2))]))
    result = graphopt.optimize(model, method="dead-units")
    assert_equivalent(model, result.model, random_inputs(model, batch=3), rtol=EXACT, atol=EXACT)
    assert result.report["passes"][-1]["skipped"] == ["group 1: 1 constant channels kept at c: the channels coupled "
                                                      "with it (across heads or reshapes) hold different constants"]


def test_dead_units_does_not_fold_a_constant_concatenated_with_its_convolution() -> None:
    """Concat(h, depthwise(h)): h's constant channel is no constant after the zero-padded depthwise conv, but
    the Concat passed h's value on for both copies of the channel (Gemm-after-pooling in the fuzzer)."""
    weight = weights(2, 1, 1, 1, seed=1)
    weight[1] = 0.0
    model = tiny("[p] h = Conv (x, w, b)\n[d] d = Conv <group = 2, pads = [1, 1, 1, 1]> (h, wd)\n"
                 "[j] c = Concat <axis = 1> (h, d)\n[o] y = Conv (c, wo)",
                 inputs="float[N, 1, 4, 4] x", outputs="float[N, 3, 4, 4] y",
                 inits=", ".join([init("w", weight), init("b", [0.25, 0.5]), init("wd", weights(2, 1, 3, 3, seed=2)),
                                  init("wo", weights(3, 4, 1, 1, seed=3))]))
    result = graphopt.optimize(model, method="dead-units")
    assert_equivalent(model, result.model, random_inputs(model, batch=3), rtol=EXACT, atol=EXACT)
    assert result.report["passes"][-1]["skipped"] == \
        ["group 0: 1 constant channels kept at o: value not evaluated through Concat, Conv"]

"""Output kinds and their agreement measures (graphopt/calibration/fidelity.py), held-out sequence measures
and tolerances on them (graphopt/calibration/heldout.py)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration.data import load_data
from graphopt.calibration.fidelity import ctc_decode, output_kinds
from graphopt.calibration.heldout import HeldOut, Tolerance, binomial_upper
from graphopt.errors import OptionError
from graphopt.evaluate import verify
from tests.conftest import init, parse, tiny, weights

# per-position labels of 5 samples x 5 positions, and a candidate that moves 4 positions: two of the moves
# leave the greedy CTC decoding as it was (a repeat, a blank next to a repeat), two change it
REFERENCE = [[1, 1, 0, 2, 2], [3, 0, 3, 3, 0], [0, 0, 0, 0, 0], [2, 1, 2, 1, 0], [1, 2, 3, 0, 0]]
CANDIDATE = [[1, 0, 0, 2, 2], [3, 3, 3, 3, 0], [0, 0, 0, 0, 0], [2, 1, 2, 1, 1], [1, 2, 1, 0, 0]]
MOVED_POSITIONS, MOVED_SEQUENCES = 4, 2  # s1 decodes (3, 3) -> (3,), s4 (1, 2, 3) -> (1, 2, 1)


def scores(labels: list[list[int]], classes: int = 4) -> np.ndarray:
    """One-hot logits (5 at the label) for [N, T] labels: [N, T, C] float32."""
    return (5.0 * np.eye(classes, dtype=np.float32)[np.asarray(labels)]).astype(np.float32)


def sequence_models(time_major: bool = False, batch: str = "N") -> tuple[object, object]:
    """Softmax(x) and Softmax(x + e): the perturbation `e` is an input, so the data decides what moves; `batch`
    is the batch dimension as declared (a symbol, or a fixed size)."""
    shape = f"float[5, {batch}, 4]" if time_major else f"float[{batch}, 5, 4]"
    io = {"inputs": f"{shape} x, {shape} e", "outputs": f"{shape} y"}
    reference = tiny("s = Mul (e, zero)\n t = Add (x, s)\n y = Softmax <axis = -1> (t)", **io,
                     inits="float[1] zero = {0.0}")
    candidate = tiny("t = Add (x, e)\n y = Softmax <axis = -1> (t)", **io)
    return reference, candidate


def sequence_data() -> dict[str, np.ndarray]:
    x = scores(REFERENCE)
    return {"x": x, "e": scores(CANDIDATE) * 2.0 - x * 2.0}  # the candidate's label wins by 5 wherever it moved


def test_ctc_decoding_collapses_repeats_then_drops_the_blank() -> None:
    assert ctc_decode(np.array(REFERENCE)) == [(1, 2), (3, 3), (), (2, 1, 2, 1), (1, 2, 3)]
    assert ctc_decode(np.array(CANDIDATE)) == [(1, 2), (3,), (), (2, 1, 2, 1), (1, 2, 1)]
    assert ctc_decode(np.array([[3, 0, 3, 3, 1]]), blank=3) == [(0, 1)]


def test_kinds_follow_the_shape_rule_and_the_producer() -> None:
    model = tiny("""c = Gemm <transB = 1> (v, w)
                    one = ReduceSum <keepdims = 1> (v, axes)
                    h = MatMul (t, m)
                    p = Transpose <perm = [0, 2, 1]> (h)
                    q = Transpose <perm = [0, 2, 1]> (p)
                    boxes = Concat <axis = 2> (b, s)
                    hidden = Relu (t)""",
                 inputs="float[N, 6] v, float[N, 5, 8] t, float[N, 7, 4] b, float[N, 7, 80] s",
                 outputs="float[N, 3] c, float[N, 1] one, float[N, 5, 4] q, float[N, 7, 84] boxes, "
                         "float[N, 5, 8] hidden",
                 inits=", ".join([init("w", weights(3, 6)), init("m", weights(8, 4)), "int64[1] axes = {1}"]))
    shapes = {"c": (2, 3), "one": (2, 1), "q": (2, 5, 4), "boxes": (2, 7, 84), "hidden": (2, 5, 8)}
    kinds = {name: found.kind for name, found in output_kinds(model, shapes).items()}
    assert kinds == {"c": "classes", "one": "values", "q": "sequence", "boxes": "values", "hidden": "values"}
    assert output_kinds(model, {"q": (2, 5, 1)})["q"].kind == "values"  # one class per position: no arg-max


def test_an_embedding_scaled_to_unit_length_is_values_not_class_scores() -> None:
    """Speaker and sentence encoders end in x / ||x||: an arg-max of an embedding means nothing (and flips with
    float rounding), so agreement there is cosine and rel_l2; a plain Div or a norm over another tensor stays
    class scores."""
    model = tiny("""e = Gemm <transB = 1> (v, w)
                    n = ReduceL2 <keepdims = 1, axes = [1]> (e)
                    l2 = Div (e, n)
                    sq = Mul (e, e)
                    s = ReduceSum <keepdims = 1> (sq, axes)
                    r = Sqrt (s)
                    c = Clip (r, eps)
                    x = Expand (c, shape)
                    sqrt_div = Div (e, x)
                    lp = LpNormalization <p = 2, axis = 1> (e)
                    l1 = LpNormalization <p = 1, axis = 1> (e)
                    scaled = Div (e, two)
                    other = ReduceL2 <keepdims = 1, axes = [1]> (v)
                    by_other = Div (e, other)""",
                 inputs="float[N, 6] v",
                 outputs=", ".join(f"float[N, 6] {name}" for name in
                                   ("l2", "sqrt_div", "lp", "l1", "scaled", "by_other")),
                 inits=", ".join([init("w", weights(6, 6)), "int64[1] axes = {1}", "float eps = {1e-12}",
                                  "int64[2] shape = {1, 6}", "float[1] two = {2.0}"]))
    shapes = {name: (2, 6) for name in ("l2", "sqrt_div", "lp", "l1", "scaled", "by_other")}
    kinds = {name: found.kind for name, found in output_kinds(model, shapes).items()}
    assert kinds == {"l2": "values", "sqrt_div": "values", "lp": "values", "l1": "classes", "scaled": "classes",
                     "by_other": "classes"}


def test_a_time_major_sequence_is_read_along_its_batch_axis() -> None:
    reference, _ = sequence_models(time_major=True)
    kind = output_kinds(reference, {"y": (5, 3, 4)})["y"]
    assert kind.kind == "sequence" and kind.batch_axis == 1


def test_a_time_major_sequence_without_a_declared_batch_is_read_along_the_axis_the_data_gives_the_batch() -> None:
    # an export with a fixed batch of 1 (or a stale declared shape, as old torch exports of CRNNs write [1, T] for
    # their [T, N, C] result): the axis whose size is the batch's in the data holds the samples
    stale = parse('<ir_version: 8, opset_import: ["" : 17]>\ng (float[5, 1, 4] x) => (float[1, T] y) {\n'
                  'y = Softmax <axis = -1> (x)\n}', check=False)  # the checker rejects the stale rank
    for model in (stale, sequence_models(time_major=True, batch="1")[0]):
        assert output_kinds(model, {"y": (5, 1, 4)}, samples=1)["y"].batch_axis == 1
        assert output_kinds(model, {"y": (5, 1, 4)})["y"].batch_axis == 0  # the batch's size unknown
        assert output_kinds(model, {"y": (1, 5, 4)}, samples=1)["y"].batch_axis == 0
        assert output_kinds(model, {"y": (5, 5, 4)}, samples=5)["y"].batch_axis == 0  # ambiguous: batch-first


def test_a_quantized_linear_head_gives_a_sequence() -> None:
    # onnxruntime's dynamic quantization of a CRNN's head: MatMulInteger, Cast, Mul by the scales, Add of the bias
    head = """q, s, z = DynamicQuantizeLinear (x)
              i = MatMulInteger (q, wq, z, wz)
              c = Cast <to = 1> (i)
              scales = Mul (s, ws)
              m = Mul (c, scales)
              y = Add (m, b)
              plain = Relu (m)"""
    inits = ", ".join(["uint8[8, 4] wq = {" + ", ".join(str(v) for v in range(100, 132)) + "}", "uint8 wz = {128}",
                       "float ws = {0.01}", init("b", weights(4))])
    model = tiny(head, inputs="float[N, 5, 8] x", outputs="float[N, 5, 4] y, float[N, 5, 4] m, float[N, 5, 4] plain",
                 inits=inits)
    found = output_kinds(model, {name: (2, 5, 4) for name in ("y", "m", "plain")})
    kinds = {name: kind.kind for name, kind in found.items()}
    assert kinds == {"y": "sequence", "m": "sequence", "plain": "values"}


@pytest.mark.parametrize("confidence", [0.0, 0.9])
def test_a_fixed_batch_time_major_sequence_is_measured_per_sample(confidence: float) -> None:
    reference, candidate = sequence_models(time_major=True, batch="1")
    data = {name: value[:, :, None, :] for name, value in sequence_data().items()}  # 5 samples of [T, 1, C]
    report = verify(reference, candidate, data, batch_size=2)
    assert report.samples == 5 and report.first["kind"] == "sequence"
    assert report.first["position_agreement"] == pytest.approx(1 - MOVED_POSITIONS / 25)
    assert report.first["sequence_agreement"] == pytest.approx(1 - MOVED_SEQUENCES / 5)
    check = HeldOut(reference, load_data(data, reference), batch_size=2, confidence=confidence)
    assert check.trials("sequence") == 5 and check.trials("position") == 25
    assert check.measure(candidate)["sequence"] == pytest.approx(1 - MOVED_SEQUENCES / 5)


@pytest.mark.parametrize("confidence", [0.0, 0.9])
def test_held_out_sequence_measures_match_the_hand_count(confidence: float) -> None:
    reference, candidate = sequence_models()
    check = HeldOut(reference, load_data(sequence_data(), reference), batch_size=2, confidence=confidence)
    assert not check.classifier and check.trials("sequence") == 5 and check.trials("position") == 25
    assert check.default_tolerance() == Tolerance("sequence", 0.99)
    measured = check.measure(candidate)
    assert measured["top1"] is None and measured["top1_lower_bound"] is None
    assert measured["position"] == pytest.approx(1 - MOVED_POSITIONS / 25)
    assert measured["sequence"] == pytest.approx(1 - MOVED_SEQUENCES / 5)
    assert measured["sequence_disagreements"] == MOVED_SEQUENCES
    assert measured["sequence_lower_bound"] == pytest.approx(1 - binomial_upper(MOVED_SEQUENCES, 5, confidence))
    same = check.measure(reference)
    assert same["position"] == same["sequence"] == 1.0 and same["sequence_disagreements"] == 0


def test_tolerances_the_output_has_no_meaning_for_are_refused() -> None:
    reference, _ = sequence_models()
    check = HeldOut(reference, load_data(sequence_data(), reference))
    with pytest.raises(OptionError, match="top1=0.9 applies to class scores .* use sequence=A, position=A"):
        check.require(Tolerance.parse("top1=0.9"))
    with pytest.raises(OptionError, match="no --metric is given"):
        check.require(Tolerance.parse("f1=0.9"))
    check.require(Tolerance.parse("sequence=0.5"))
    check.require(Tolerance.parse("rel_l2<=0.1"))


def test_tolerance_spellings() -> None:
    assert Tolerance.parse("f1=0.9") == Tolerance("f1", 0.9, True) and str(Tolerance.parse("f1>=0.9")) == "f1=0.9"
    loss = Tolerance.parse("loss<=0.25")
    assert str(loss) == "loss<=0.25" and loss.key == "metric_loss"
    assert loss.met({"metric_loss": 0.2}) and not loss.met({"metric_loss": 0.3})
    assert Tolerance.parse("rel_l2=0.01") == Tolerance("rel_l2", 0.01, False) == Tolerance.parse("rel_l2<=0.01")
    for text in ("top1<=0.9", "rel_l2>=0.1", "sequence=1.5", "f 1=0.2", "=0.3", "f1=nan"):
        with pytest.raises(OptionError, match="--tolerance"):
            Tolerance.parse(text)

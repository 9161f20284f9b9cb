"""Data sources: npz keyed by input name, dicts, iterables of feeds; every mismatch is one clear DataError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.calibration.data import Dataset, load_data, load_npz
from graphopt.errors import DataError
from graphopt.ir.shapes import input_specs
from tests.conftest import init, run_ort, tiny, weights

UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_record, ("unpickled",))


def _two_inputs() -> onnx.ModelProto:
    return tiny("c = MatMul (image, w)\n y = Add (c, bias)", inputs="float[N, 4] image, float[N, 3] bias",
                outputs="float[N, 3] y", inits=init("w", weights(4, 3)))


def _one_input() -> onnx.ModelProto:
    return tiny("y = Relu (x)", inputs="float[N, 3, H, 5] x", outputs="float[N, 3, H, 5] y")


def _save_npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_npz_keyed_by_input_name(tmp_path):
    image, bias = weights(10, 4), weights(10, 3, seed=1)
    dataset = load_data(_save_npz(tmp_path, bias=bias, image=image), _two_inputs())
    assert dataset.num_samples == 10
    batches = list(dataset.batches(4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), image)
    np.testing.assert_array_equal(np.concatenate([b["bias"] for b in batches]), bias)
    assert dataset.first_sample_shapes() == {"image": (1, 4), "bias": (1, 3)}


def test_single_input_model_accepts_any_single_key(tmp_path):
    data = weights(6, 3, 7, 5)
    dataset = load_data(_save_npz(tmp_path, arr_0=data), _one_input())
    assert list(dataset.arrays) == ["x"]
    np.testing.assert_array_equal(dataset.arrays["x"], data)
    assert dataset.first_sample_shapes() == {"x": (1, 3, 7, 5)}


def test_initializers_listed_as_inputs_are_not_data_inputs():
    model = tiny("y = Add (x, k)", inputs="float[N, 3] x, float[3] k", outputs="float[N, 3] y",
                 inits=init("k", [1.0, 2.0, 3.0]))
    assert [s.name for s in input_specs(model)] == ["x"]
    assert list(load_data({"anything": weights(2, 3)}, model).arrays) == ["x"]


BAD = [  # (id, arrays for the two-input model, expected message fragment)
    ("unknown_key", {"image": weights(2, 4), "bias": weights(2, 3), "extra": weights(2, 3)}, "unknown: ['extra']"),
    ("missing_key", {"image": weights(2, 4)}, "missing: ['bias']"),
    ("wrong_static_dim", {"image": weights(2, 5), "bias": weights(2, 3)}, "input 'image' axis 1 must be 4, data has 5"),
    ("wrong_rank", {"image": weights(2, 4, 1, 1), "bias": weights(2, 3)},
     "expects rank 2 [N, 4] (samples along axis 0) or rank 3 (samples stacked in front), data has shape [2, 4, 1, 1]"),
    ("wrong_stacked_dim", {"image": weights(2, 4, 1), "bias": weights(2, 3)},
     "input 'image' axis 1 must be 4, data has 1 per stacked sample (data shape [2, 4, 1])"),
    ("complex_for_float", {"image": weights(2, 4).astype(np.complex64), "bias": weights(2, 3)},
     "expects float32, data has complex64"),
    ("float_overflow", {"image": np.full((2, 4), 1e39), "bias": weights(2, 3)},
     "input 'image' is float32; data (float64) has values up to 1e+39, beyond float32's range"),
    ("nan_float64", {"image": np.full((2, 4), np.nan), "bias": weights(2, 3)}, "'image' contains NaN or Inf"),
    ("symbol_sizes", {"image": weights(2, 4), "bias": weights(2, 2, 3)},
     "dimension 'N' is 1 per sample in 'image' axis 0 but 2 in 'bias' axis 0"),
    ("int_for_float", {"image": np.ones((2, 4), np.int64), "bias": weights(2, 3)}, "expects float32, data has int64"),
    ("nan", {"image": np.full((2, 4), np.nan, np.float32), "bias": weights(2, 3)}, "'image' contains NaN or Inf"),
    ("inf", {"image": weights(2, 4), "bias": np.full((2, 3), -np.inf, np.float32)}, "'bias' contains NaN or Inf"),
    ("unequal_counts", {"image": weights(2, 4), "bias": weights(3, 3)}, "different sample counts"),
    ("empty", {"image": np.zeros((0, 4), np.float32), "bias": np.zeros((0, 3), np.float32)}, "no samples"),
]


@pytest.mark.parametrize("arrays,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_npz_is_one_clear_error(tmp_path, arrays, message):
    path = _save_npz(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        load_data(path, _two_inputs())
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


@pytest.mark.parametrize("arrays,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_dict_is_one_clear_error(arrays, message):
    with pytest.raises(DataError, match=None) as info:
        load_data(arrays, _two_inputs())
    assert message in str(info.value)


def test_pickled_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([_Payload()], dtype=object))
    UNPICKLED.clear()
    with pytest.raises(DataError, match="not a readable .npz of numeric arrays"):
        load_data(path, _one_input())
    assert UNPICKLED == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"plain text"])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.npz"):
        load_npz(path)
    with pytest.raises(DataError, match="data file not found"):
        load_npz(tmp_path / "missing.npz")


def test_plain_npy_file_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, weights(2, 3, 7, 5))
    with pytest.raises(DataError, match="x.npy is not an .npz archive"):
        load_npz(path)


def test_dict_source():
    dataset = load_data({"image": weights(5, 4), "bias": weights(5, 3)}, _two_inputs())
    assert dataset.num_samples == 5 and [len(b["image"]) for b in dataset.batches(2)] == [2, 2, 1]


def test_iterable_of_feeds_is_validated_and_replayable():
    feeds = ({"image": weights(n, 4, seed=n), "bias": weights(n, 3, seed=n)} for n in (2, 3))
    dataset = load_data(feeds, _two_inputs())
    assert dataset.num_samples is None
    for _ in range(2):  # a one-shot generator is kept, so several readers see every feed
        batches = list(dataset.batches(100))
        assert [b["image"].shape[0] for b in batches] == [2, 3]
        np.testing.assert_array_equal(batches[1]["image"], weights(3, 4, seed=3))
    assert dataset.first_sample_shapes() == {"image": (1, 4), "bias": (1, 3)}


def test_bad_feed_in_an_iterable_names_it():
    feeds = [{"image": weights(2, 4), "bias": weights(2, 3)}, {"image": weights(2, 4)}]
    dataset = load_data(feeds, _two_inputs())
    with pytest.raises(DataError, match=r"feed 1: keys do not match .*missing: \['bias'\]"):
        list(dataset.batches(2))


def test_dataset_passes_through():
    dataset = load_data({"x": weights(2, 3, 4, 5)}, _one_input())
    assert isinstance(dataset, Dataset) and load_data(dataset, _one_input()) is dataset


def test_fixed_batch_models_get_batches_of_their_size():
    model = tiny("y = Relu (x)", inputs="float[2, 3] x", outputs="float[2, 3] y")
    dataset = load_data({"x": weights(6, 3)}, model)
    assert dataset.fixed_batch == 2 and [len(b["x"]) for b in dataset.batches(32)] == [2, 2, 2]
    with pytest.raises(DataError, match="fixed to 2: 5 samples are not a multiple"):
        list(load_data({"x": weights(5, 3)}, model).batches(32))
    assert load_data({"x": weights(5, 3, 7, 5)}, _one_input()).fixed_batch is None


def test_split_holds_out_a_seeded_fraction_of_samples() -> None:
    model = _two_inputs()
    arrays = {"image": weights(40, 4), "bias": weights(40, 3)}
    fit, held = load_data(arrays, model).split(0.25, seed=3)
    assert fit.num_samples == 30 and held.num_samples == 10
    rows = np.concatenate([fit.arrays["image"], held.arrays["image"]])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, arrays["image"]))  # disjoint, nothing lost
    again = load_data(arrays, model).split(0.25, seed=3)[1]
    np.testing.assert_array_equal(again.arrays["image"], held.arrays["image"])
    pairs = {tuple(r): tuple(b) for r, b in zip(arrays["image"], arrays["bias"])}
    assert all(pairs[tuple(r)] == tuple(b) for r, b in zip(held.arrays["image"], held.arrays["bias"]))


def test_split_of_a_stream_and_of_a_single_sample() -> None:
    model = _two_inputs()
    feeds = [{"image": weights(2, 4), "bias": weights(2, 3)} for _ in range(8)]
    fit, held = load_data(feeds, model).split(0.25)
    assert len(list(fit.batches(2))) == 6 and len(list(held.batches(2))) == 2
    fit, held = load_data({"image": weights(1, 4), "bias": weights(1, 3)}, model).split(0.5)
    assert fit.num_samples == 1 and held.num_samples == 0


# --- close dtypes are cast, with one warning per input -------------------------------------------

def _typed_inputs() -> onnx.ModelProto:
    return tiny("""a = Cast <to = 1> (ids)
                   b = Cast <to = 1> (mask)
                   c = Cast <to = 1> (keep)
                   s = Add (a, b)
                   y = Add (s, c)""", inputs="int64[N, 3] ids, int32[N, 3] mask, bool[N, 3] keep",
                outputs="float[N, 3] y")


def _cast_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "cast to it" in r.getMessage()]


def test_float64_and_float16_data_are_cast_with_one_warning_per_input(caplog):
    image, bias = np.random.default_rng(0).standard_normal((6, 4)), weights(6, 3).astype(np.float16)
    with caplog.at_level("WARNING"):
        dataset = load_data({"image": image, "bias": bias}, _two_inputs())
        list(dataset.batches(2))
    assert dataset.arrays["image"].dtype == np.float32 and dataset.arrays["bias"].dtype == np.float32
    np.testing.assert_array_equal(dataset.arrays["image"], image.astype(np.float32))
    np.testing.assert_array_equal(dataset.arrays["bias"], bias.astype(np.float32))
    messages = _cast_warnings(caplog)
    assert len(messages) == 2
    assert "input 'image' is float32; data (float64)" in messages[0] and "input 'bias'" in messages[1]


def test_refused_data_are_not_warned_about(caplog):
    with caplog.at_level("WARNING"), pytest.raises(DataError, match="'image' contains NaN or Inf"):
        load_data({"image": np.full((2, 4), np.nan), "bias": weights(2, 3).astype(np.float16)}, _two_inputs())
    assert _cast_warnings(caplog) == []  # the CLI prints one error line, no warning before it


def test_a_stream_of_float64_feeds_warns_once(caplog):
    feeds = [{"image": np.ones((2, 4)), "bias": weights(2, 3)} for _ in range(3)]
    dataset = load_data(feeds, _two_inputs())
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert [b["image"].dtype for b in dataset.batches(2)] == [np.float32] * 3
        fit, held = dataset.split(0.3)
        list(fit.batches(2)), list(held.batches(2))
    assert len(_cast_warnings(caplog)) == 1


def test_integer_widths_and_bools_are_cast_when_the_values_fit(caplog):
    model = _typed_inputs()
    rng = np.random.default_rng(1)
    ids, mask, keep = rng.integers(-5, 5, (4, 3)), rng.integers(0, 9, (4, 3)), rng.random((4, 3)) < 0.5
    want = run_ort(model, {"ids": ids, "mask": mask.astype(np.int32), "keep": keep})["y"]
    given = {"ids": ids.astype(np.int32), "mask": mask.astype(np.int64), "keep": keep.astype(np.uint8)}
    with caplog.at_level("WARNING"):
        dataset = load_data(given, model)
    assert {k: v.dtype for k, v in dataset.arrays.items()} == {"ids": np.int64, "mask": np.int32, "keep": np.bool_}
    np.testing.assert_array_equal(run_ort(model, next(dataset.batches(4)))["y"], want)
    assert sorted(m.split("'")[1] for m in _cast_warnings(caplog)) == ["ids", "keep", "mask"]
    as_bool = load_data({"ids": ids > 0, "mask": mask, "keep": keep}, model).arrays["ids"]
    np.testing.assert_array_equal(as_bool, (ids > 0).astype(np.int64))


BAD_TYPES = [
    ("int64_beyond_int32", {"mask": np.array([[0, 1, 2**40]] * 2)},
     "input 'mask' is int32; data (int64) has values in [0, 1099511627776], outside int32's range "
     "[-2147483648, 2147483647]"),
    ("int8_fits_int64", {"ids": np.array([[0, -1, 2]] * 2, dtype=np.int8)}, None),
    ("int_not_0_1_for_bool", {"keep": np.array([[0, 1, 2]] * 2)}, "input 'keep' is bool; data (int64) has values "
     "other than 0 and 1"),
    ("float_for_int", {"ids": np.zeros((2, 3), np.float32)}, "input 'ids' expects int64, data has float32"),
    ("float_for_bool", {"keep": np.zeros((2, 3))}, "input 'keep' expects bool, data has float64"),
]


@pytest.mark.parametrize("override,message", [c[1:] for c in BAD_TYPES], ids=[c[0] for c in BAD_TYPES])
def test_integer_data_that_do_not_fit_are_refused_with_the_range(override, message):
    arrays = {"ids": np.zeros((2, 3), np.int64), "mask": np.zeros((2, 3), np.int32), "keep": np.zeros((2, 3), bool)}
    arrays.update(override)
    if message is None:  # int8 -1 fits int64: accepted as is
        assert load_data(arrays, _typed_inputs()).arrays["ids"][0, 1] == -1
        return
    with pytest.raises(DataError) as info:
        load_data(arrays, _typed_inputs())
    assert message in str(info.value)


# --- inputs whose batch axis is not first: stacked samples, or samples along the batch axis ----------

def _gru() -> onnx.ModelProto:
    """A time-major bidirectional GRU: x [T, batch, 4], initial state h0 [2, batch, 3]."""
    return tiny("""ys, yh = GRU <direction = "bidirectional", hidden_size = 3> (x, wx, rx, bx, "", h0)
                   t = Transpose <perm = [1, 0, 2]> (yh)
                   f = Flatten (t)
                   a = MatMul (f, w1)
                   r = Relu (a)
                   y = MatMul (r, w2)""",
                inputs="float[T, batch, 4] x, float[2, batch, 3] h0", outputs="float[batch, 5] y",
                inits=", ".join([init("wx", weights(2, 9, 4, seed=1)), init("rx", weights(2, 9, 3, seed=2)),
                                 init("bx", weights(2, 18, seed=3)), init("w1", weights(6, 16, seed=4)),
                                 init("w2", weights(16, 5, seed=5))]))


def _gru_samples(count: int = 12, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`count` samples stacked in front: x [count, 7, rows, 4], h0 [count, 2, rows, 3]."""
    return weights(count, 7, rows, 4, seed=7), weights(count, 2, rows, 3, seed=8)


def _per_sample(model: onnx.ModelProto, x: np.ndarray, h0: np.ndarray) -> np.ndarray:
    return np.concatenate([run_ort(model, {"x": x[i], "h0": h0[i]})["y"] for i in range(len(x))])


def test_stacked_samples_are_concatenated_along_the_models_batch_axis():
    model, (x, h0) = _gru(), _gru_samples()
    dataset = load_data({"x": x, "h0": h0}, model)
    batches = list(dataset.batches(5))
    assert [(b["x"].shape, b["h0"].shape) for b in batches] == [((7, 5, 4), (2, 5, 3))] * 2 + [((7, 2, 4), (2, 2, 3))]
    assert [dataset.feed_samples(b) for b in batches] == [5, 5, 2] and dataset.num_samples == 12
    np.testing.assert_array_equal(batches[1]["h0"], np.concatenate(list(h0[5:10]), axis=1))
    got = np.concatenate([run_ort(model, b)["y"] for b in batches])
    np.testing.assert_allclose(got, _per_sample(model, x, h0), rtol=1e-5, atol=1e-6)
    assert dataset.first_sample_shapes() == {"x": (7, 1, 4), "h0": (2, 1, 3)}


@pytest.mark.parametrize("layout", ["batched", "mixed"])
def test_samples_along_a_batch_axis_that_is_not_first(layout):
    model, (x, h0) = _gru(), _gru_samples()
    x_batched, h0_batched = np.concatenate(list(x), axis=1), np.concatenate(list(h0), axis=1)  # [7, 12, 4], [2, 12, 3]
    given = {"x": x_batched, "h0": h0_batched if layout == "batched" else h0}
    dataset = load_data(given, model)
    for got, want in zip(dataset.batches(5), load_data({"x": x, "h0": h0}, model).batches(5)):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    fit, held = dataset.split(0.25, seed=1)
    assert fit.num_samples == 9 and held.num_samples == 3
    held_feed = next(held.batches(8))
    np.testing.assert_allclose(run_ort(model, held_feed)["y"], np.concatenate(
        [_per_sample(model, x[[i]], h0[[i]]) for i in range(12)])[np.sort(
            np.random.default_rng(1).permutation(12)[:3])], rtol=1e-5, atol=1e-6)


def test_stacked_samples_of_several_rows_each():
    model, (x, h0) = _gru(), _gru_samples(count=4, rows=2)
    dataset = load_data({"x": x, "h0": h0}, model)
    batches = list(dataset.batches(3))
    assert [b["x"].shape for b in batches] == [(7, 6, 4), (7, 2, 4)]
    assert [dataset.feed_samples(b) for b in batches] == [3, 1]
    np.testing.assert_allclose(np.concatenate([run_ort(model, b)["y"] for b in batches]),
                               _per_sample(model, x, h0), rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"dimension 'batch' is 1 per sample in 'x' axis 1 but 2 in 'h0' axis 1"):
        load_data({"x": np.concatenate(list(_gru_samples(4)[0]), axis=1), "h0": h0}, model)


def test_a_model_fixed_to_batch_1_is_fed_one_stacked_sample_at_a_time():
    model = tiny("""s = Mul (state, two)
                    z = Relu (x)""", inputs="float[1, 4] x, float[2, 1, 3] state, int64 sr",
                 outputs="float[1, 4] z, float[2, 1, 3] s", inits=init("two", [2.0]))
    state = weights(5, 2, 1, 3)
    dataset = load_data({"x": weights(5, 4), "state": state, "sr": np.array(16000)}, model)
    batches = list(dataset.batches(32))
    assert dataset.fixed_batch == 1 and len(batches) == 5
    assert all(b["x"].shape == (1, 4) and b["state"].shape == (2, 1, 3) and b["sr"].shape == () for b in batches)
    np.testing.assert_array_equal(np.stack([run_ort(model, b)["s"] for b in batches]), 2 * state)
    with pytest.raises(DataError, match=r"fix different numbers of samples per run: 2 by 'x', 1 by 'state'"):
        load_data({"x": weights(4, 4), "state": state[:4]},
                  tiny("z = Relu (x)\n s = Relu (state)", inputs="float[2, 4] x, float[2, 1, 3] state",
                       outputs="float[2, 4] z, float[2, 1, 3] s"))


def test_unnamed_state_batch_axis_is_found():
    model = tiny("""z = Relu (x)
                    s = Relu (state)""", inputs="float[?, 4] x, float[2, ?, 3] state",
                 outputs="float[?, 4] z, float[2, ?, 3] s")
    dataset = load_data({"x": weights(6, 4), "state": weights(6, 2, 1, 3)}, model)
    assert [b["state"].shape for b in dataset.batches(4)] == [(2, 4, 3), (2, 2, 3)]
    assert dataset.first_sample_shapes() == {"x": (1, 4), "state": (2, 1, 3)}


def test_a_recurrent_model_optimizes_on_stacked_state_data():
    import graphopt
    from graphopt.evaluate import random_feed
    from graphopt.ir.shapes import resolve_input_shapes

    model, (x, h0) = _gru(), _gru_samples()
    # the GRU's 882 MACs stay (its input is the graph's), the MatMuls' 176 go with the 16 units: 0.95 keeps 11
    result = graphopt.optimize(model, method="snp", target_macs=0.95, calib={"x": x, "h0": h0}, round_to=1)
    report = result.report
    assert report["input_shapes"] == {"x": [7, 1, 4], "h0": [2, 1, 3]} and report["fidelity"]["samples"] == 12
    # 12 samples span at most 11 directions around their mean: the kept units reconstruct the rest exactly
    assert report["macs_after"] == 882 + 11 * (6 + 5) and report["fidelity"]["rel_l2"] < 1e-4
    feed = random_feed(model, resolve_input_shapes(model), batch=8)  # random inputs batch the state's axis 1
    assert feed["x"].shape == (1, 8, 4) and feed["h0"].shape == (2, 8, 3)
    assert graphopt.optimize(model).report["fidelity"]["samples"] == 8


def test_samples_are_counted_along_the_batch_axis_where_it_is_not_first():
    import graphopt

    model = tiny("z = Relu (x)", inputs="float[5, ?, 4] x", outputs="float[5, ?, 4] z")  # time-major
    dataset = load_data({"x": weights(5, 6, 4)}, model)
    assert [dataset.feed_samples(b) for b in dataset.batches(4)] == [4, 2]
    assert graphopt.optimize(model, calib={"x": weights(5, 6, 4)}).report["fidelity"]["samples"] == 6


def _placeholder_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its input declared as Paddle2ONNX writes it: [-1, 3, '?', '?']."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    for dim in dims[2:]:
        dim.Clear()
        dim.dim_param = "?"
    return model


def test_placeholder_dims_are_unnamed_and_a_negative_batch_is_dynamic():
    """Paddle2ONNX declares every unknown dim '?' and the batch -1: the '?' dims may differ (48 x 192 text
    lines) and -1 fixes no batch size."""
    model = _placeholder_dims(tiny("y = Relu (x)", inputs="float[N, 3, H, W] x", outputs="float[N, 3, H, W] y"))
    assert input_specs(model)[0].shape == (None, 3, None, None)
    dataset = load_data({"x": weights(5, 3, 4, 6)}, model)
    assert dataset.num_samples == 5 and dataset.fixed_batch is None
    assert [b["x"].shape for b in dataset.batches(2)] == [(2, 3, 4, 6), (2, 3, 4, 6), (1, 3, 4, 6)]


def test_a_paddle_style_classifier_prunes_and_keeps_its_declared_input(tmp_path):
    import graphopt

    body = """a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
              r = Relu (a)
              c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
              p = GlobalAveragePool (c)
              y = Flatten (p)"""
    model = _placeholder_dims(tiny(body, inputs="float[N, 3, H, W] x", outputs="float[N, 4] y", inits=", ".join([
        init("w1", weights(16, 3, 3, 3)), init("b1", weights(16, seed=1)), init("w2", weights(4, 16, 3, 3, seed=2)),
        init("b2", weights(4, seed=3))])))
    source = tmp_path / "cls.onnx"
    onnx.save(model, str(source))
    result = graphopt.optimize(source, method="snp", target_macs=0.7, round_to=1, output=tmp_path / "out.onnx",
                               calib={"x": weights(16, 3, 6, 20, seed=4)})
    assert result.report["target_reached"] and result.report["macs_ratio"] <= 0.7 + 0.02
    written = onnx.load(str(tmp_path / "out.onnx"))
    declared = written.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value if d.HasField("dim_value") else d.dim_param for d in declared] == [-1, 3, "?", "?"]
    feed = {"x": weights(2, 3, 6, 20, seed=5)}
    assert run_ort(written, feed)["y"].shape == (2, 4)

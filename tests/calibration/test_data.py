"""Data sources: npz keyed by input name, dicts, iterables of feeds; every mismatch is one clear DataError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.calibration.data import Dataset, load_data, load_npz
from graphopt.errors import DataError
from graphopt.ir.shapes import input_specs
from tests.conftest import init, tiny, weights

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
    ("wrong_rank", {"image": weights(2, 4, 1), "bias": weights(2, 3)},
     "expects rank 2 [N, 4], data has shape [2, 4, 1]"),
    ("wrong_dtype", {"image": weights(2, 4).astype(np.float64), "bias": weights(2, 3)},
     "expects float32, data has float64"),
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

"""sample_maps: the first samples' whole intermediate tensors, only the needed cone run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.calibration.data import load_data
from graphopt.calibration.maps import sample_maps
from tests.conftest import init, run_ort, tiny, weights


def _model() -> onnx.ModelProto:
    body = "h = Conv <pads = [1, 1, 1, 1]> (x, w)\n r = Relu(h)\n y = Sigmoid(r)"
    return tiny(body, inputs="float[N, 3, 6, 6] x", outputs="float[N, 4, 6, 6] y",
                inits=init("w", weights(4, 3, 3, 3, seed=1)))


@pytest.mark.parametrize("max_items", [1, 70, 500])
def test_first_items_of_each_tensor(max_items: int) -> None:
    model = _model()
    x = np.random.default_rng(0).standard_normal((100, 3, 6, 6)).astype(np.float32)
    maps = sample_maps(model, load_data({"x": x}, model), ["r", "x", "h"], max_items=max_items, batch_size=32)
    kept = min(max_items, 100)
    assert sorted(maps) == ["h", "r", "x"]
    np.testing.assert_array_equal(maps["x"], x[:kept])
    np.testing.assert_allclose(maps["r"], np.maximum(maps["h"], 0))
    want = 1 / (1 + np.exp(-maps["r"]))
    np.testing.assert_allclose(want, run_ort(model, {"x": x[:kept]})["y"], rtol=1e-5, atol=1e-6)
    assert maps["r"].shape == (kept, 4, 6, 6) and maps["r"].dtype == np.float32


def test_refuses_zero_items() -> None:
    model = _model()
    with pytest.raises(ValueError, match="max_items"):
        sample_maps(model, load_data({"x": np.zeros((2, 3, 6, 6), np.float32)}, model), ["r"], max_items=0)

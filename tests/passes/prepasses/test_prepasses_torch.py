"""Every pre-pass on unoptimised torch exports: Constant nodes, Identity, shape arithmetic, unfused BN."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes import PREPASSES
from tests.conftest import assert_equivalent, op_types, random_inputs, run_ort, run_pass, run_passes

RAW = ["legacy_raw", "dynamo_raw"]
MODELS = ["conv_stack", "linear_stack"]


@pytest.mark.parametrize("exporter", RAW)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prepass", PREPASSES)
def test_each_prepass_alone_is_exact(torch_export, name, exporter, prepass):
    model = torch_export(name, exporter)
    rewritten, result = run_pass(model, prepass)
    assert_equivalent(model, rewritten, random_inputs(model, batch=3))
    if prepass == "fold_batchnorm":  # alone, a BN may sit behind a not-yet-folded weight: it says why
        left = op_types(rewritten).count("BatchNormalization")
        assert result.stats["folded"] + left == op_types(model).count("BatchNormalization")
        assert len(result.skipped) == left


@pytest.mark.parametrize("exporter", RAW)
@pytest.mark.parametrize("name", MODELS)
def test_prepasses_normalise_raw_exports(torch_export, name, exporter):
    torch = pytest.importorskip("torch")
    from tests.torch_models import BUILDERS

    model = torch_export(name, exporter)
    rewritten, records = run_passes(model, *PREPASSES)
    ops = op_types(rewritten)
    assert not {"BatchNormalization", "Constant", "Identity", "Dropout"} & set(ops)
    assert len(ops) < len(op_types(model))
    assert [i.name for i in rewritten.graph.input] == ["input"]
    assert_equivalent(model, rewritten, random_inputs(model, batch=4))
    module, example = BUILDERS[name]()
    with torch.no_grad():
        expected = module(example).numpy()
    np.testing.assert_allclose(run_ort(rewritten, {"input": example.numpy()})["output"], expected, rtol=1e-4, atol=1e-5)
    again, second = run_passes(rewritten, *PREPASSES)
    assert not any(r.result.modified for r in second)  # the sequence is idempotent
    assert op_types(again) == ops

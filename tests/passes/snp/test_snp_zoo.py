"""SNP and CoB on every torch zoo architecture from both exporters.

Calibration data is seeded Gaussian input. Each run must end in a model that passes the ONNX checker
by path and runs in onnxruntime with the original's output names, dtypes and shapes, with finite
outputs; SNP must reach the MAC target within 2 points (its own MAC model agreeing with the count);
CoB must either rotate and prune or change nothing and say why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import graphopt
from tests.passes.channels.test_prune_magnitude import assert_same_interface, zoo, zoo_path  # noqa: F401

NAMES = list(zoo.ZOO) if zoo is not None else []
EXPORTERS = ("legacy", "dynamo")
# (id, options): the default at both targets; the variants at the deeper one
VARIANTS = [("default", {}, 0.7), ("default", {}, 0.5), ("no_reconstruct", {"reconstruct": False}, 0.5),
            ("output_criterion", {"criterion": "output"}, 0.5), ("sequential", {"sequential": True}, 0.5)]


def _calibration(source: Path, samples: int = 16) -> dict[str, np.ndarray]:
    model = onnx.load(str(source), load_external_data=False)
    feeds = {}
    for index, value in enumerate(model.graph.input):
        dims = [d.dim_value if d.dim_value > 0 else samples for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = np.random.default_rng(index).standard_normal(dims).astype(np.float32)
    return feeds


def _optimize(source: Path, tmp_path: Path, **options: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    output = tmp_path / "out.onnx"
    report = graphopt.optimize(source, output=output, calib=_calibration(source), **options).report
    onnx.checker.check_model(str(output), full_check=True)
    pruned = onnx.load(str(output))
    assert_same_interface(onnx.load(str(source)), pruned)
    return pruned, report


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("variant,options,target", VARIANTS, ids=[f"{v[0]}-{v[2]}" for v in VARIANTS])
@pytest.mark.parametrize("name", NAMES)
def test_snp_reaches_the_target_on_every_architecture(name: str, variant: str, options: dict[str, Any],
                                                      target: float, exporter: str, zoo_path, tmp_path: Path) -> None:
    _, report = _optimize(zoo_path(name, exporter, 17, False), tmp_path, method="snp", target_macs=target, **options)
    stats = report["passes"][-1]["stats"]
    assert stats["channels_removed"] > 0
    assert abs(report["macs_ratio"] - target) <= 0.02, report["macs_ratio"]
    assert report["macs_ratio"] == pytest.approx(stats["estimated_macs_ratio"], abs=1e-9)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_cob_rotates_or_declines_with_reasons_on_every_architecture(name: str, exporter: str, zoo_path,
                                                                    tmp_path: Path) -> None:
    source = zoo_path(name, exporter, 17, False)
    _, report = _optimize(source, tmp_path, method="cob", target_macs=0.5)
    cob = report["passes"][-1]
    if cob["modified"]:
        assert cob["stats"]["channels_removed"] > 0 and report["macs_ratio"] < 1.0
    else:
        assert cob["skipped"] and report["macs_ratio"] == 1.0

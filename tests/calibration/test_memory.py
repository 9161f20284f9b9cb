"""The memory bound of calibration, measured as peak RSS in a subprocess (Linux: /proc/self)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1024**2
LIMIT = 64 * MIB

# A chain of 8 elementwise ops on [N, 16, 32, 32] (64 KiB per sample and tensor): capturing all eight
# tensors of a 256-sample batch at once would hold 128 MiB, twice the limit.
SCRIPT = r"""
import ctypes, gc, json, sys
import numpy as np, onnx.parser
from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import load_data
from graphopt.calibration.session import make_session
from graphopt.calibration.stats import StatRequest

def collect(model, data, requests, **options):
    return Calibrator(load_data(data, model), **options).statistics(model, requests)

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

def peak_delta(run):
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # freed heap goes back to the OS, so the next phase starts clean
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    base = status("VmRSS:")
    run()
    return status("VmHWM:") - base

limit = int(sys.argv[1])
body = "\n".join(f"t{i} = {'Sigmoid' if i % 2 else 'Neg'}(t{i - 1})" for i in range(1, 9))
model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                                'chain (float[N, 16, 32, 32] t0) => (float[N, 16, 32, 32] t8) {\n' + body + '\n}')
data = {"t0": np.random.default_rng(0).standard_normal((256, 16, 32, 32)).astype(np.float32)}
requests = [StatRequest(f"t{i}", frozenset({"mean", "var"})) for i in range(1, 9)]
collect(model, {"t0": data["t0"][:2]}, requests, batch_size=2, threads=1)  # load every code path first
session = make_session(model, optimize=True, threads=1)
print(json.dumps({
    "inference": peak_delta(lambda: session.run(None, data)),
    "bounded": peak_delta(lambda: collect(model, data, requests, batch_size=256, memory_limit=limit, threads=1)),
    "unbounded": peak_delta(lambda: collect(model, data, requests, batch_size=256, memory_limit=2**40, threads=1)),
}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_peak_memory_stays_within_the_limit_plus_what_inference_needs() -> None:
    # a fixed mmap threshold: large arrays are mapped and unmapped, never parked in malloc's free lists
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-c", SCRIPT, str(LIMIT)], capture_output=True, text=True,
                               timeout=120, env=environment)
    if completed.returncode != 0 and "clear_refs" in completed.stderr:
        pytest.skip("cannot reset peak RSS here: " + completed.stderr.strip().splitlines()[-1])
    assert completed.returncode == 0, completed.stderr
    peak = json.loads(completed.stdout.strip().splitlines()[-1])
    allowed = LIMIT + peak["inference"] + 8 * MIB  # onnxruntime's own working memory, allocator slack
    assert peak["bounded"] <= allowed, {k: v / MIB for k, v in peak.items()}
    assert peak["unbounded"] > allowed, {k: v / MIB for k, v in peak.items()}  # the bound is what held it down

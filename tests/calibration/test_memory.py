"""The memory bound of calibration, measured as peak RSS in subprocesses.

Each phase runs in a fresh process: after the same setup, the process records its resident set
(/proc/self/statm) and its peak so far (VmHWM in /proc/self/status, the high-water mark of its own
address space; getrusage's ru_maxrss where that is missing), runs the phase, and reads the peak again.
The phase's growth is at most peak_after - rss_before, and exactly that when the phase set a new peak;
a setup that leaves its peak well above its resident set would blur the measurement, so the test checks
that it does not. Nothing here needs a privileged /proc write (no clear_refs), so it works in containers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1024**2
LIMIT = 64 * MIB
SETUP_SLACK = 8 * MIB  # how far a phase's starting peak may sit above its starting resident set

# A chain of 8 elementwise ops on [N, 16, 32, 32] (64 KiB per sample and tensor): capturing all eight
# tensors of a 256-sample batch at once would hold 128 MiB, twice the limit.
SCRIPT = r"""
import ctypes, gc, json, os, resource, sys
import numpy as np, onnx.parser
from graphopt.calibration.collect import Calibrator
from graphopt.calibration.data import load_data
from graphopt.calibration.session import make_session
from graphopt.calibration.stats import StatRequest

def collect(model, data, requests, **options):
    return Calibrator(load_data(data, model), **options).statistics(model, requests)

def status(key):
    with open("/proc/self/status") as handle:
        return next((int(line.split()[1]) * 1024 for line in handle if line.startswith(key)), None)

def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak():
    # the address space's high-water mark; ru_maxrss (KiB) where /proc lacks it, which also counts the
    # parent's memory that fork copied, so the setup-slack check below refuses a blurred reading
    found = status("VmHWM:")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

phase, limit = sys.argv[1], int(sys.argv[2])
body = "\n".join(f"t{i} = {'Sigmoid' if i % 2 else 'Neg'}(t{i - 1})" for i in range(1, 9))
model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                                'chain (float[N, 16, 32, 32] t0) => (float[N, 16, 32, 32] t8) {\n' + body + '\n}')
data = {"t0": np.random.default_rng(0).standard_normal((256, 16, 32, 32), dtype=np.float32)}
requests = [StatRequest(f"t{i}", frozenset({"mean", "var"})) for i in range(1, 9)]
collect(model, {"t0": data["t0"][:2]}, requests, batch_size=2, threads=1)  # load every code path first
session = make_session(model, optimize=True, threads=1)
run = {
    "inference": lambda: session.run(None, data),
    "bounded": lambda: collect(model, data, requests, batch_size=256, memory_limit=limit, threads=1),
    "unbounded": lambda: collect(model, data, requests, batch_size=256, memory_limit=2**40, threads=1),
}[phase]
gc.collect()
try:
    ctypes.CDLL(None).malloc_trim(0)  # glibc: freed heap goes back to the OS, so the phase starts clean
except (AttributeError, OSError):
    pass
before, peak_before = resident(), peak()
run()
print(json.dumps({"rss_before": before, "peak_before": peak_before, "peak_after": peak()}))
"""


def _phase(name: str) -> dict[str, int]:
    # a fixed mmap threshold: large arrays are mapped and unmapped, never parked in malloc's free lists
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-c", SCRIPT, name, str(LIMIT)], capture_output=True, text=True,
                               timeout=120, env=environment)
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["peak_before"] - found["rss_before"] <= SETUP_SLACK, {k: v / MIB for k, v in found.items()}
    return found


def _growth(found: dict[str, int]) -> int:
    """An upper bound on the phase's peak growth (exact when the phase set a new peak)."""
    return found["peak_after"] - found["rss_before"]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from Linux /proc")
def test_peak_memory_stays_within_the_limit_plus_what_inference_needs() -> None:
    phases = {name: _phase(name) for name in ("inference", "bounded", "unbounded")}
    growth = {name: _growth(found) for name, found in phases.items()}
    allowed = LIMIT + growth["inference"] + 8 * MIB  # onnxruntime's own working memory, allocator slack
    assert growth["bounded"] <= allowed, {k: v / MIB for k, v in growth.items()}
    unbounded = phases["unbounded"]
    assert unbounded["peak_after"] > unbounded["peak_before"]  # a new peak: its growth is measured exactly
    assert growth["unbounded"] > allowed, {k: v / MIB for k, v in growth.items()}  # the bound is what held it down

"""What SNP's error-correcting refit costs: one model, one MAC target, three ways, times of graphopt.optimize.

  self       --reconstruct-target self (no refit; the earlier default)
  original   --reconstruct-target original (the default with data): each wave of refits resumes both models
             from the tensors the previous wave computed (graphopt.calibration.staged)
  full-runs  the same refit with every wave run from the model inputs (the staged runs switched off: an
             ablation that shows what resuming saves; the written model is the same)

All three use --criterion output (the default). The model and its calibration .npz are given as paths, e.g.
bench/transformers.py's cached MiniLM export:

    python bench/refit_cost.py bench/.cache/minilm_legacy.onnx bench/.cache/minilm_calib.npz --target 0.7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import graphopt
from graphopt.calibration.staged import Stages
from graphopt.passes.base import PassContext

WAYS = ("self", "original", "full-runs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--target", type=float, default=0.7, help="MAC target")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {', '.join(WAYS)}")
    args = parser.parse_args()
    from common import machine

    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    model, calib = onnx.load(str(args.model)), dict(np.load(args.calib))
    staged_runs = PassContext.staged_runs
    for way in args.ways.split(","):
        PassContext.staged_runs = (lambda self: Stages(0)) if way == "full-runs" else staged_runs
        start = time.perf_counter()
        result = graphopt.optimize(model, method="snp", target_macs=args.target, calib=calib, progress=False,
                                   reconstruct_target="self" if way == "self" else "original")
        print(f"{way:>9}: {time.perf_counter() - start:6.1f} s, MACs {result.report['macs_ratio']:.3f}, "
              f"consumers refitted {result.report['passes'][-1]['stats']['consumers_error_corrected']}", flush=True)
    PassContext.staged_runs = staged_runs
    return 0


if __name__ == "__main__":
    sys.exit(main())

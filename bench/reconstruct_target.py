"""SNP's reconstruction targets on an ImageNet-sized network: `--reconstruct-target self` against
`original`, time and held-out fidelity.

An architecture of bench/speed.py (seeded weights, BatchNorm statistics measured on random samples, legacy
exporter) is pruned by SNP to --target of its MACs with each target on --calib Gaussian samples; the
fidelity of the written model is measured on 16 other samples (relative L2 error of the output), and on the
calibration samples by the report. A fit far better on the calibration samples than on the held-out ones
is overfitting.

    python bench/reconstruct_target.py                          # resnet50, 64 samples, 0.7 of the MACs
    python bench/reconstruct_target.py --arch mobilenet_v2 --calib 256
    python bench/reconstruct_target.py --target 0.5 --budgets variance,sensitivity   # with --budget-by
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import graphopt
from graphopt.evaluate import verify

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ARCHS, _seeded, export  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--target", type=float, default=0.7, help="MAC target")
    parser.add_argument("--budgets", default="variance",
                        help="comma-separated --budget-by values, each run with both targets (variance, sensitivity)")
    args = parser.parse_args()
    module, sampler = _seeded(ARCHS[args.arch], False)
    with tempfile.TemporaryDirectory() as folder:
        model = export(module, sampler(1, 0), "legacy", Path(folder))
    calib, held_out = sampler(args.calib, 1), sampler(16, 2)
    print(f"{args.arch}, {args.calib} calibration samples, snp at {args.target} of the MACs")
    for budget in args.budgets.split(","):
        for target in ("self", "original"):
            start = time.perf_counter()
            result = graphopt.optimize(model, method="snp", calib=calib, target_macs=args.target,
                                       reconstruct_target=target, budget_by=budget, criterion="variance")
            seconds = time.perf_counter() - start
            held = verify(model, result.model, held_out, batch_size=8).first["rel_l2"]
            print(f"  {budget:>11} {target:>8}: {seconds:6.1f} s  MACs {result.report['macs_ratio']:.3f}, rel_l2 on "
                  f"calibration {result.report['fidelity']['rel_l2']:.3f}, held-out {held:.3f}", flush=True)


if __name__ == "__main__":
    main()

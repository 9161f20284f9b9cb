"""Magnitude and SNP on the zoo's CRNN (graphopt.torch.zoo "recurrent_recognizer": two Conv-BN-ReLU stages, a
bidirectional LSTM over the feature columns, a GRU and a per-column Linear; seeded weights), from both torch
exporters, at 0.7 and 0.5 of the MACs with each method's defaults: held-out fidelity of the written model to the
original on inputs that were not calibrated on, as `graphopt verify` measures a sequence output (cosine, relative
L2, per-position top-1 agreement and whole greedy-decoded sequences that match).
To measure an older package with this script: `git archive COMMIT graphopt | tar -x -C OLD` and run it with
`PYTHONPATH=OLD`.

    python bench/recurrent_quality.py        # about a minute on a 2-core VM
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import graphopt  # noqa: E402
from graphopt.api import verify  # noqa: E402
from graphopt.torch import export, zoo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (1, 16, 24)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration and held-out inputs, each")
    parser.add_argument("--out", type=Path, default=RESULTS / "recurrent_quality.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp"), help="where the exported models go")
    args = parser.parse_args()
    calib = np.random.default_rng(0).standard_normal((args.samples, *SHAPE)).astype(np.float32)
    held = np.random.default_rng(1).standard_normal((args.samples, *SHAPE)).astype(np.float32)
    rows = []
    for exporter in ("legacy", "dynamo"):
        module, example = zoo.ZOO["recurrent_recognizer"]()
        path = args.work / f"recurrent_quality_{exporter}.onnx"
        export.export_onnx(module, example, path, exporter=exporter, fold_bn=False)
        for method in ("magnitude", "snp"):
            for target in (0.7, 0.5):
                result = graphopt.optimize(path, method=method, target_macs=target, calib={"input": calib})
                report = verify(path, result.model, {"input": held}).to_json()
                found = {key: report[key] for key in ("cosine", "rel_l2", "position_agreement", "sequence_agreement")}
                hidden = {n.op_type: next(a.i for a in n.attribute if a.name == "hidden_size")
                          for n in result.model.graph.node if n.op_type in ("LSTM", "GRU")}
                rows.append({"exporter": exporter, "method": method, "target": target,
                             "macs_ratio": result.report["macs_ratio"], "hidden_size": hidden, **found})
                print(f"{exporter:7} {method:10} {target}: MACs {rows[-1]['macs_ratio']:.3f} hidden {hidden} "
                      f"cosine {found['cosine']:.4f} rel_l2 {found['rel_l2']:.3f} position "
                      f"{found['position_agreement']:.3f} sequence {found['sequence_agreement']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

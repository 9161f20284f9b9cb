"""Magnitude and SNP on the zoo's CRNN (graphopt.torch.zoo "recurrent_recognizer": two Conv-BN-ReLU stages, a
bidirectional LSTM over the feature columns, a GRU and a per-column Linear; seeded weights), from both torch
exporters, at 0.7 and 0.5 of the MACs with each method's defaults: held-out fidelity of the written model to the
original on inputs that were not calibrated on (mean cosine of each sample's outputs, relative L2 over all of
them, and per-column top-1 agreement of the 10 class scores).

    python bench/recurrent_quality.py        # about a minute on a 2-core VM
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import graphopt  # noqa: E402
from graphopt.torch import export, zoo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (1, 16, 24)
CLASSES = 10


def outputs(model, inputs: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0].reshape(len(inputs), -1)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    cosine = np.sum(reference * candidate, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    top1 = candidate.reshape(len(candidate), -1, CLASSES).argmax(-1) == reference.reshape(len(reference), -1,
                                                                                             CLASSES).argmax(-1)
    return {"cosine": float(np.mean(cosine)),
            "rel_l2": float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference)),
            "top1_agreement": float(np.mean(top1))}


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
        reference = outputs(path, held)
        for method in ("magnitude", "snp"):
            for target in (0.7, 0.5):
                result = graphopt.optimize(path, method=method, target_macs=target, calib={"input": calib})
                found = fidelity(reference, outputs(result.model, held))
                hidden = {n.op_type: next(a.i for a in n.attribute if a.name == "hidden_size")
                          for n in result.model.graph.node if n.op_type in ("LSTM", "GRU")}
                rows.append({"exporter": exporter, "method": method, "target": target,
                             "macs_ratio": result.report["macs_ratio"], "hidden_size": hidden, **found})
                print(f"{exporter:7} {method:10} {target}: MACs {rows[-1]['macs_ratio']:.3f} hidden {hidden} "
                      f"cosine {found['cosine']:.4f} rel_l2 {found['rel_l2']:.3f} top1 {found['top1_agreement']:.3f}",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Quantization after pruning: does INT8 QDQ compose with SNP in speed and in fidelity?

A ResNet-like CNN and a BERT-like encoder (bench/speed.py's resnet50 and bert_base builds: fixed seeded
weights, BatchNorm statistics measured on random samples, legacy exporter) are optimized four ways:
the original, pruned (snp at --target MACs), quantized (static INT8 QDQ, minmax, per-channel) and pruned +
quantized (snp,quantize), all calibrated on the same samples. The four models are timed in ONE run,
interleaved (each round times `runs` inferences of every model, the order rotating by round; full graph
optimisation, the same threads and inputs), at batch 1 and 8; speedup = median over rounds of original
time / model time. Fidelity of each model to the original is measured on held-out samples (rel_l2, cosine,
top-1 agreement). The goal checked:
- speedup(pruned+quantized) >= 0.9 x speedup(pruned) x speedup(quantized), at every batch;
- loss(pruned+quantized) <= 1.2 x (loss(pruned) + loss(quantized)), loss = rel_l2 of the output.
Results: a table on stdout and bench/results/quantize.json (with the machine).

    python bench/quantize.py            # full sizes (resnet50 widths at 3x160x160; 4 BERT-base layers)
    python bench/quantize.py --quick    # smoke run: tiny widths, few rounds (under 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.api import optimize
from graphopt.calibration.session import make_session
from graphopt.evaluate import verify

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SNP_EARLIER, machine  # noqa: E402
from speed import ARCHS, _seeded, export  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "pruned", "quantized", "pruned+quantized")


def build_models(arch: str, tiny: bool, calib_count: int, held_count: int, target: float, folder: Path,
                 activations: str = "uint8") -> tuple[dict[str, onnx.ModelProto], dict[str, np.ndarray], dict[str, float]]:
    """The four variants of `arch`, the held-out samples, and the seconds each optimize took."""
    module, sampler = _seeded(ARCHS[arch], tiny)
    original = export(module, sampler(2, 0), "legacy", folder)
    calib, heldout = sampler(calib_count, 1), sampler(held_count, 2)
    models, seconds = {"original": original}, {}
    for name, method in (("pruned", "snp"), ("quantized", "quantize"), ("pruned+quantized", "snp,quantize")):
        start = time.perf_counter()
        models[name] = optimize(original, method=method, calib=calib, target_macs=target, progress=False,
                                quant_activations=activations,
                                **(SNP_EARLIER if "snp" in method.split(",") else {})).model
        seconds[name] = time.perf_counter() - start
    return models, heldout, seconds


def interleaved(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], rounds: int, runs: int,
                threads: int) -> dict[str, dict[str, float]]:
    """Every model timed in the same rounds (rotating order); per model its median ms and its speedup over
    the original (median, p10, p90 of the per-round ratios)."""
    sessions = {name: make_session(model, optimize=True, threads=threads, spinning=False)
                for name, model in models.items()}
    names = list(sessions)
    for session in sessions.values():
        session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            start = time.perf_counter()
            for _ in range(runs):
                sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3 / runs)
    found = {}
    for name in names:
        ratios = sorted(ref / own for ref, own in zip(times["original"], times[name]))
        found[name] = {"ms": statistics.median(times[name]), "speedup": statistics.median(ratios),
                       "speedup_p10": ratios[int(0.1 * (len(ratios) - 1))],
                       "speedup_p90": ratios[int(0.9 * (len(ratios) - 1))]}
    return found


def goal(latency: dict[str, dict[str, dict[str, float]]], fidelity: dict[str, dict[str, Any]]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for batch, timing in latency.items():
        product = timing["pruned"]["speedup"] * timing["quantized"]["speedup"]
        checks[f"speedup_{batch}"] = {"combined": timing["pruned+quantized"]["speedup"], "bound": 0.9 * product,
                                      "met": timing["pruned+quantized"]["speedup"] >= 0.9 * product}
    bound = 1.2 * (fidelity["pruned"]["rel_l2"] + fidelity["quantized"]["rel_l2"])
    checks["fidelity"] = {"combined_loss": fidelity["pruned+quantized"]["rel_l2"], "bound": bound,
                          "met": fidelity["pruned+quantized"]["rel_l2"] <= bound}
    checks["met"] = all(check["met"] for check in checks.values())
    return checks


def run_arch(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        models, heldout, seconds = build_models(arch, args.quick, args.calib, args.heldout, args.target, Path(folder),
                                                args.quant_activations)
    fidelity = {name: verify(models["original"], model, heldout, batch_size=8).first
                for name, model in models.items() if name != "original"}
    latency = {}
    for batch in (1, 8):
        feed = {key: value[:batch] for key, value in heldout.items()}
        latency[f"batch_{batch}"] = interleaved(models, feed, args.rounds, args.runs, args.threads)
    return {"arch": arch, "size": "tiny" if args.quick else ARCHS[arch].size, "optimize_seconds": seconds,
            "bytes": {name: model.ByteSize() for name, model in models.items()},
            "fidelity": fidelity, "latency": latency, "goal": goal(latency, fidelity)}


def table(entries: list[dict[str, Any]]) -> str:
    rows = ["| model | variant | MB | speedup b1 | speedup b8 | rel_l2 | top-1 |", "|---|---|---|---|---|---|---|"]
    for entry in entries:
        for name in VARIANTS:
            fid = entry["fidelity"].get(name, {"rel_l2": 0.0, "top1_agreement": 1.0})
            cells = [f"{entry['latency'][b][name]['speedup']:.2f}x" for b in ("batch_1", "batch_8")]
            top1 = fid["top1_agreement"]
            rows.append(f"| {entry['arch']} | {name} | {entry['bytes'][name] / 1e6:.2f} | {cells[0]} | {cells[1]} | "
                        f"{fid['rel_l2']:.4f} | {'-' if top1 is None else f'{top1:.3f}'} |")
        rows.append(f"| {entry['arch']} | goal met | | | | | {entry['goal']['met']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths and few rounds: a smoke run")
    parser.add_argument("--archs", default="resnet50,bert_base")
    parser.add_argument("--target", type=float, default=0.7, help="snp's MAC target")
    parser.add_argument("--calib", type=int, default=None, help="calibration samples (default 64; quick 16)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out samples (default 64; quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20; quick 5)")
    parser.add_argument("--runs", type=int, default=3, help="inferences per model per round")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--quant-activations", choices=("uint8", "int8"), default="uint8",
                        help="activation type of the quantized models (int8: S8S8)")
    parser.add_argument("--output", type=Path, default=RESULTS / "quantize.json")
    args = parser.parse_args(argv)
    args.calib = args.calib or (16 if args.quick else 64)
    args.heldout = args.heldout or (16 if args.quick else 64)
    args.rounds = args.rounds or (5 if args.quick else 20)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    entries = [run_arch(arch, args) for arch in args.archs.split(",")]
    print(table(entries))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"machine": info, "settings": settings, "results": entries}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Models over 2 GB: SNP on a generated decoder-like model stored with external data, with its peak memory.

The model is written here without torch and without holding it in memory: `--layers` pre-norm residual MLP
blocks of width `--width` (LayerNorm, MatMul up to `--ffn`, ReLU, MatMul down, Add), tokens [N, T, width] in
and out, float32 weights with seeded random values whose spectrum decays (so that pruning has something to
keep), every weight streamed into one external data file beside the model. Then, in a fresh process,
`graphopt optimize MODEL --method snp --target-macs F --calib CALIB.npz` writes the pruned model, and this
script reports the child's peak RSS (getrusage of the child) against the model's size, the time, and the
pruned model's fidelity on held-out tokens (run in a third process, so that the peak above is the
optimizer's alone).

    python bench/large_model.py                       # 12 layers, width 4096, FFN 7680: 3.0 GB
    python bench/large_model.py --layers 2 --width 512 --ffn 1024   # a quick run

The goal of the large-model work: peak RSS of the optimizer at most 1.5x the model's size plus
onnxruntime's own use.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


def _weight(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A rows x cols float32 matrix with a decaying singular spectrum (rank-structured plus noise), made in
    column blocks so that generating it never holds more than the matrix itself."""
    rank = max(8, min(rows, cols) // 8)
    left = rng.standard_normal((rows, rank), dtype=np.float32) / np.sqrt(rank)
    scale = (1.0 / np.sqrt(1.0 + np.arange(rank, dtype=np.float32)))[:, None]
    out = np.empty((rows, cols), dtype=np.float32)
    for start in range(0, cols, 1024):
        stop = min(cols, start + 1024)
        right = rng.standard_normal((rank, stop - start), dtype=np.float32) * scale
        out[:, start:stop] = left @ right + 0.05 * rng.standard_normal((rows, stop - start), dtype=np.float32)
    out /= np.float32(np.sqrt(rows))
    return out


def write_model(folder: Path, layers: int, width: int, ffn: int, seed: int = 0) -> Path:
    """The decoder-like model at folder/model.onnx with its weights in folder/model.onnx.data."""
    rng = np.random.default_rng(seed)
    path, data_name = folder / "model.onnx", "model.onnx.data"
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    with open(folder / data_name, "wb") as stream:
        def external(name: str, values: np.ndarray) -> None:
            nonlocal offset
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=values.shape,
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(values.nbytes))):
                tensor.external_data.add(key=key, value=value)
            stream.write(values.tobytes())
            offset += values.nbytes
            initializers.append(tensor)

        hidden = "x"
        for layer in range(layers):
            p = f"layer{layer}"
            initializers.append(helper.make_tensor(f"{p}.ln.g", TensorProto.FLOAT, [width],
                                                   (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)))
            initializers.append(helper.make_tensor(f"{p}.ln.b", TensorProto.FLOAT, [width],
                                                   (0.1 * rng.standard_normal(width)).astype(np.float32)))
            external(f"{p}.up", _weight(rng, width, ffn))
            external(f"{p}.down", _weight(rng, ffn, width))
            nodes += [helper.make_node("LayerNormalization", [hidden, f"{p}.ln.g", f"{p}.ln.b"], [f"{p}.n"], axis=-1),
                      helper.make_node("MatMul", [f"{p}.n", f"{p}.up"], [f"{p}.h"]),
                      helper.make_node("Relu", [f"{p}.h"], [f"{p}.a"]),
                      helper.make_node("MatMul", [f"{p}.a", f"{p}.down"], [f"{p}.f"]),
                      helper.make_node("Add", [hidden, f"{p}.f"], [f"{p}.y"])]
            hidden = f"{p}.y"
        nodes.append(helper.make_node("Identity", [hidden], ["y"]))
    graph = helper.make_graph(nodes, "decoder_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     ["batch", "tokens", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", width])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def tokens(count: int, length: int, width: int, seed: int) -> np.ndarray:
    """Token activations with a low-dimensional structure (what a trained model's embeddings have)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(1234).standard_normal((64, width)).astype(np.float32)
    codes = rng.standard_normal((count, length, 64)).astype(np.float32)
    return codes @ basis / 8.0 + 0.1 * rng.standard_normal((count, length, width)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=7680)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--calib-memory", default="2GB")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "large_model.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as name:
        folder = Path(name)
        started = time.perf_counter()
        model = write_model(folder, args.layers, args.width, args.ffn)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"model: {args.layers} layers, width {args.width}, FFN {args.ffn}: {size / 2**30:.2f} GiB "
              f"written in {time.perf_counter() - started:.0f} s", flush=True)
        np.savez(folder / "calib.npz", x=tokens(args.samples, args.tokens, args.width, seed=1))
        np.savez(folder / "heldout.npz", x=tokens(8, args.tokens, args.width, seed=2))
        command = [sys.executable, "-m", "graphopt.cli", "optimize", str(model), "-o", str(folder / "pruned.onnx"),
                   "--method", "snp", "--target-macs", str(args.target), "--calib", str(folder / "calib.npz"),
                   "--calib-memory", args.calib_memory, "--report", str(folder / "report.json"),
                   "--criterion", "variance", "--reconstruct-target", "self"]  # the settings its table measured
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(completed.stdout[-3000:], completed.stderr[-3000:], sep="\n")
        found = {"layers": args.layers, "width": args.width, "ffn": args.ffn, "model_bytes": size,
                 "target": args.target, "calib_samples": args.samples, "tokens": args.tokens,
                 "calib_memory": args.calib_memory, "returncode": completed.returncode, "optimize_s": seconds,
                 "peak_rss_bytes": peak, "peak_over_model": peak / size}
        if completed.returncode == 0:
            report = json.loads((folder / "report.json").read_text())
            found.update(macs_ratio=report["macs_ratio"], calibration_fidelity=report["fidelity"]["rel_l2"],
                         pruned_bytes=sum(p.stat().st_size for p in folder.glob("pruned.onnx*")))
            check = subprocess.run([sys.executable, "-m", "graphopt.cli", "verify", str(model),
                                    str(folder / "pruned.onnx"), "--data", str(folder / "heldout.npz"), "--json",
                                    "--quiet"], capture_output=True, text=True)
            if check.returncode == 0:
                verified = json.loads(check.stdout)
                found.update(heldout_rel_l2=verified["rel_l2"], heldout_cosine=verified["cosine"])
        print(json.dumps(found, indent=1))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(found, indent=1))
        if completed.returncode != 0:
            sys.exit(1)


if __name__ == "__main__":
    main()

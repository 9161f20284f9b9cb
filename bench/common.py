"""Pieces the benchmark scripts share: the machine and versions they print with their numbers, thread
options and the run header, training of the small torch models they build (and a ResNet basic block for
them), and accuracy of exported models in onnxruntime."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime
import sklearn
import torch
from threadpoolctl import threadpool_limits
from torch import nn

import graphopt


# SNP's settings before the output ordering and the error-correcting reconstruction became its defaults
# (--criterion variance --reconstruct-target self): the benchmarks whose README tables were measured with them
# pass them, so that their commands still reproduce those tables.
SNP_EARLIER: dict[str, str] = {"criterion": "variance", "reconstruct_target": "self"}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "scikit-learn": sklearn.__version__,
            "graphopt": graphopt.__version__, "graphopt_tree": _source_tree(),
            "onnxruntime_providers": onnxruntime.get_available_providers(), "gpu": _gpu_name()}


def _gpu_name() -> str | None:
    """The NVIDIA GPU's name and driver (nvidia-smi), None where there is none."""
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found.splitlines()[0] if found else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _source_tree() -> str | None:
    """The commit the package was run from, with '+dirty' when its working tree has changes."""
    root = Path(graphopt.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(root)], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


class BasicBlock(nn.Module):
    """ResNet basic block with BatchNorm; a strided 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.down = None if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def add_thread_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training (1 is steadiest on a shared machine)")
    parser.add_argument("--ort-threads", type=int, default=1,
                        help="onnxruntime threads for calibration (optimize's `threads`; 0 = all cores)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads (0 = library default); multithreaded BLAS on small matrices stalls on a "
                             "busy machine")


def methods_and_targets(methods: str, targets: str, known: Iterable[str]) -> tuple[list[str], list[float]]:
    """The comma-separated --methods (refused when one is not in `known`) and --targets of a benchmark."""
    chosen, known = methods.split(","), list(known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown methods {unknown} (choose from {', '.join(known)})")
    return chosen, [float(t) for t in targets.split(",")]


def start_run(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the thread options and print the run header (machine, command, threads); returns the machine."""
    torch.set_num_threads(args.threads)
    if args.blas_threads:
        threadpool_limits(args.blas_threads, user_api="blas")
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"threads: torch training {args.threads}, onnxruntime calibration {args.ort_threads or 'default'}, "
          f"BLAS {args.blas_threads or 'default'}")
    return info


def train(module: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int, lr: float,
          seed: int, weight_decay: float = 0.0) -> float:
    """AdamW with cosine decay and cross-entropy; returns the seconds it took. Leaves `module` in eval mode."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for first in range(0, len(x), batch):
            chosen = order[first:first + batch]
            loss = nn.functional.cross_entropy(module(inputs[chosen]), targets[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    module.eval()
    return time.perf_counter() - start


def predict(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of `model` on `inputs` in onnxruntime (one thread), as float64."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0].astype(np.float64)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def interleaved_speed(original: onnx.ModelProto, result: onnx.ModelProto, name: str, x: np.ndarray,
                      batches: Iterable[int], rounds: int, threads: int) -> dict[str, dict[str, float]]:
    """`result` against `original` at each batch size, timed in one interleaved run each
    (graphopt.evaluate.compare_latency) on the first samples of `x` fed as input `name`."""
    from graphopt.evaluate import compare_latency

    out = {}
    for batch in batches:
        timing = compare_latency(original, result, data={name: x[:batch]}, batch=batch, rounds=rounds, threads=threads)
        out[f"batch_{batch}"] = {k: timing[k] for k in ("reference_ms", "candidate_ms", "speedup", "speedup_p10",
                                                         "speedup_p90")}
    return out


def optimized_row(method: str, target: float, model: onnx.ModelProto, calib: dict[str, np.ndarray],
                  threads: int, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`graphopt.optimize` of one benchmark row: (the result, its row: method, target, MAC and parameter
    ratios, seconds), or (None, a row with the error) when it fails, so that the run goes on."""
    start = time.perf_counter()
    try:
        result = graphopt.optimize(model, target_macs=target, calib=calib, threads=threads, progress=False,
                                   **options)
    except Exception as error:
        return None, {"method": method, "target": target, "error": f"{type(error).__name__}: {error}"}
    return result, {"method": method, "target": target, "macs_ratio": result.report["macs_ratio"],
                    "params_ratio": result.report.get("params_ratio"), "seconds": time.perf_counter() - start}


def add_speed(row: dict[str, Any], original: onnx.ModelProto, result: onnx.ModelProto, name: str, x: np.ndarray,
              batches: Iterable[int], rounds: int, threads: int) -> dict[str, Any]:
    """`row` with its interleaved speed against the original (`interleaved_speed`) and, per batch, the
    efficiency = speedup x MAC ratio."""
    row["latency"] = interleaved_speed(original, result, name, x, batches, rounds, threads)
    for timing in row["latency"].values():
        timing["efficiency"] = timing["speedup"] * row["macs_ratio"]
    return row


def rotation(methods: list[str], targets: list[float]) -> Iterator[tuple[str, float]]:
    """Every (method, target), each target's methods starting one further along the list, so that no method
    always runs first (on a machine that warms up or slows down during a run)."""
    for index, target in enumerate(targets):
        for method in methods[index % len(methods):] + methods[:index % len(methods)]:
            yield method, target

"""What bounds calibration's cost on this machine, measured: the price of capturing intermediates per batch size,
whether two BLAS threads run a Gram update faster than one, and how much Gram arithmetic SNP asks for.

On ResNet-50 at 224 px (bench/zoo_architectures, as bench/zoo.py's cost measurement) with `--samples` random images:
- capture: plain inference at batch 32 against the session exposing every Conv/Gemm input (what SNP
  requests) at batches 32, 16 and 8, each in a fresh session over all samples (first-batch costs included);
- threads: 40 Gram updates of (8192 x 256) float64 blocks on one worker thread and on two, by scipy's dsyrk
  (which holds the GIL) and by graphopt's syrk_update (numpy's syrk, which releases it);
- arithmetic: the Gram multiply-adds Σ rows · C² over the requested tensors, against the network's MACs, with
  every position and with the positions `--rows-per-channel` keeps (graphopt.calibration.stats.sampled_positions).

    python bench/calibration_costs.py [--samples 256] [--rows-per-channel 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import threadpoolctl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_architectures import build  # noqa: E402
from graphopt.calibration.shapes import count_cost  # noqa: E402
from graphopt.calibration.blas import scipy_blas, syrk_update  # noqa: E402
from graphopt.calibration.capture import exposing_model, linear_inputs  # noqa: E402
from graphopt.calibration.collect import DEFAULT_ROWS_PER_CHANNEL  # noqa: E402
from graphopt.calibration.session import make_session  # noqa: E402
from graphopt.calibration.stats import sampled_positions  # noqa: E402
from graphopt.ir.shapes import tensor_shapes, with_fixed_inputs  # noqa: E402
from graphopt.torch import export  # noqa: E402


def timed_run(model: onnx.ModelProto, names: list[str] | None, x: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    session = make_session(model, optimize=True)
    feed = session.get_inputs()[0].name
    for first in range(0, x.shape[0], batch):
        session.run(names, {feed: x[first:first + batch]})
    return time.perf_counter() - start


def thread_scaling() -> dict[str, dict[int, float]]:
    """Seconds for 8 x 5 Gram updates of (8192 x 256) float64 blocks on one and two worker threads: scipy's
    dsyrk (holds the GIL) and graphopt's syrk_update (numpy's product, which releases it)."""
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((8192, 256)) for _ in range(8)]
    squares = [np.zeros((256, 256), order="F") for _ in blocks]
    kernels = {"scipy dsyrk": lambda i: scipy_blas.dsyrk(1.0, blocks[i].T, beta=1.0, c=squares[i], trans=0, lower=0,
                                                          overwrite_c=1),
               "graphopt syrk_update": lambda i: syrk_update(squares[i], blocks[i])}
    found: dict[str, dict[int, float]] = {}
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        for name, kernel in kernels.items():
            if scipy_blas is None and name.startswith("scipy"):
                continue
            found[name] = {}
            for workers in (1, 2):
                with ThreadPoolExecutor(workers) as pool:
                    start = time.perf_counter()
                    list(pool.map(lambda i: [kernel(i) for _ in range(5)], range(len(blocks))))
                    found[name][workers] = time.perf_counter() - start
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rows-per-channel", type=int, default=DEFAULT_ROWS_PER_CHANNEL,
                        help="--calib-rows-per-channel of the sampled count")
    args = parser.parse_args()
    module, example = build("resnet50")
    with tempfile.TemporaryDirectory() as folder:
        path = export.export_onnx(module, example, Path(folder) / "resnet50.onnx", exporter="legacy", opset=17,
                                  fold_bn=False)
        model = onnx.load(str(path))
    x = np.random.default_rng(3).standard_normal((args.samples, 3, 224, 224)).astype(np.float32)
    names = [r.tensor for r in linear_inputs(model) if r.tensor != model.graph.input[0].name]
    exposed = exposing_model(model, names, {n: onnx.TensorProto.FLOAT for n in names})
    print(f"capture, {args.samples} samples: plain inference (batch 32) {timed_run(model, None, x, 32):.2f} s")
    for batch in (32, 16, 8):
        print(f"  exposing {len(names)} consumer inputs, batch {batch}: {timed_run(exposed, names, x, batch):.2f} s")
    for kernel, seconds in thread_scaling().items():
        print(f"threads: 40 {kernel} updates on one worker {seconds[1]:.2f} s, on two workers {seconds[2]:.2f} s")
    shapes = tensor_shapes(with_fixed_inputs(model, {model.graph.input[0].name: (1, 3, 224, 224)}))
    gram = sum(args.samples * int(np.prod(shapes[n][2:])) * shapes[n][1] ** 2 for n in names)
    sampled = sum(args.samples * (sampled_positions((1, *shapes[n][1:]), 1, args.samples, args.rows_per_channel)
                                  or int(np.prod(shapes[n][2:]))) * shapes[n][1] ** 2 for n in names)
    macs = count_cost(model, {model.graph.input[0].name: (1, 3, 224, 224)}).macs * args.samples
    print(f"arithmetic: Gram multiply-adds {gram / 1e9:.0f} G (full C x C) against {macs / 1e9:.0f} G network MACs; "
          f"{sampled / 1e9:.0f} G from the positions --calib-rows-per-channel {args.rows_per_channel} keeps")


if __name__ == "__main__":
    main()

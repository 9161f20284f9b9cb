"""Command-line interface: argument parsing and printing only; the work lives in the library.

Exit codes: 0 success; 2 bad usage or bad input (one line on stderr, nothing written); 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from graphopt._version import __version__
from graphopt.errors import GraphoptError

log = logging.getLogger("graphopt")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def _method(text: str) -> str:
    from graphopt.api import parse_methods

    try:
        return ",".join(parse_methods(text)) or "none"
    except GraphoptError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tolerance(text: str) -> str:
    from graphopt.calibration.heldout import Tolerance

    try:
        return str(Tolerance.parse(text))
    except GraphoptError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass did and skipped")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _add_shapes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="resolve dynamic input dimensions (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from graphopt.api import methods

    parser = _Parser(prog="graphopt", description="Structured compression of ONNX models.")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="MACs, parameters, op histogram, inputs and outputs")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--groups", action="store_true",
                         help="list channel groups: size, members, prunable or why not")
    _add_shapes(inspect)
    _add_common(inspect)

    verify = commands.add_parser("verify", help="compare a candidate model with a reference on data")
    verify.add_argument("reference", type=Path)
    verify.add_argument("candidate", type=Path)
    verify.add_argument("--data", type=Path, required=True, help=".npz with one array per input")
    verify.add_argument("--batch-size", type=int, default=32)
    _add_common(verify)

    bench = commands.add_parser("bench", help="latency in onnxruntime (full graph optimisation)")
    bench.add_argument("model", type=Path)
    bench.add_argument("--data", type=Path, help="inputs to time on (default: seeded random inputs)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--repeat", type=int, default=50)
    bench.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _add_common(bench)

    optimize = commands.add_parser("optimize", help="run the pre-passes and a compression method")
    optimize.add_argument("model", type=Path)
    optimize.add_argument("-o", "--output", type=Path, required=True)
    optimize.add_argument("--method", type=_method, required=True, metavar="|".join(methods()),
                          help="'none' runs only the normalising pre-passes; a comma-separated list runs "
                               "methods in order (snp,exprune: static then dynamic pruning)")
    optimize.add_argument("--calib", type=Path, help="calibration .npz (also used to report fidelity)")
    optimize.add_argument("--target-macs", type=float, help="keep about this fraction of per-sample MACs")
    optimize.add_argument("--report", type=Path, help="write a JSON report here")
    optimize.add_argument("--batch-size", type=int, default=32)
    optimize.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of N")
    optimize.add_argument("--norm", choices=["l1", "l2"], default="l1", help="magnitude importance norm")
    optimize.add_argument("--seed", type=int, default=0, help="seed for --method random")
    optimize.add_argument("--keep-variance", type=float,
                          help="snp: keep this fraction of every group's unique variance (instead of --target-macs); "
                               "cob: of every subspace's rotated energy")
    optimize.add_argument("--criterion", choices=["variance", "output"], default="variance",
                          help="snp unit ordering: the paper's unnormalised ZCA, or the consumers' output error")
    optimize.add_argument("--sequential", action="store_true",
                          help="snp: prune group by group, re-measuring statistics on the partly pruned model")
    optimize.add_argument("--cob-reconstruct", action="store_true",
                          help="cob: fold SNP's least-squares reconstruction of the pruned rotated coordinates")
    optimize.add_argument("--no-reconstruct", action="store_true",
                          help="snp: prune in the SNP order without folding the least-squares reconstruction")
    optimize.add_argument("--sparsity", type=float, help="omp: fraction of weights to zero")
    optimize.add_argument("--omp-scope", choices=["global", "layer"], default="global",
                          help="omp: one magnitude threshold over all layers, or the same sparsity in each")
    optimize.add_argument("--keep-first-last", action="store_true",
                          help="omp: leave the first and last weighted layers dense")
    optimize.add_argument("--sparse-storage", action="store_true",
                          help="save weights as ONNX sparse initializers where that makes the file smaller")
    optimize.add_argument("--rotation", choices=["pca", "l1pca"], default="pca",
                          help="cob: rotation from calibration data (PCA of the Gram, or L1-PCA by sign-power iteration)")
    optimize.add_argument("--zscore", type=float, metavar="Z",
                          help="cob: keep rotated coordinates whose amplitude z-score within their subspace is >= Z")
    optimize.add_argument("--stats", type=Path, help="statistics from `graphopt calibrate` (else measured on --calib)")
    optimize.add_argument("--exprune-probe", type=float, metavar="F",
                          help="exprune: probe length as a fraction of each layer's input size "
                               "(default: chosen per layer from 1/16, 1/8, 1/4, 1/2)")
    optimize.add_argument("--exprune-fnr", type=float, metavar="R",
                          help="exprune: false-negative rate allowed per neuron on calibration data "
                               "(default: the largest rate within --tolerance on held-out calibration samples)")
    optimize.add_argument("--exprune-rule", choices=["threshold", "sequential"], default="threshold",
                          help="exprune: one test on the probe, or tests at doubling probe lengths")
    optimize.add_argument("--tolerance", type=_tolerance, metavar="top1=A|rel_l2=E",
                          help="exprune: fidelity to keep on held-out calibration samples "
                               "(default top1=0.99 for class scores, else rel_l2=0.01)")
    optimize.add_argument("--exprune-layers", choices=["all", "linear", "conv"], default="all",
                          help="exprune: which ReLU layers to replace (conv ops have no native kernel yet)")
    optimize.add_argument("--exprune-rows", type=int, default=4096, metavar="N",
                          help="exprune: sampled input rows per linear layer for calibration (default 4096)")
    optimize.add_argument("--exprune-maps", type=int, default=64, metavar="N",
                          help="exprune: input maps per convolution scored at every position (default 64)")
    optimize.add_argument("--exprune-held-out", type=float, default=0.25, metavar="F",
                          help="exprune: fraction of the calibration samples held out for --tolerance (default 0.25)")
    _add_calibration(optimize)
    _add_shapes(optimize)
    _add_common(optimize)

    calibrate = commands.add_parser("calibrate", help="activation statistics for optimize --stats")
    calibrate.add_argument("model", type=Path)
    calibrate.add_argument("--data", type=Path, required=True, help=".npz with one array per input")
    calibrate.add_argument("-o", "--output", type=Path, required=True, help="statistics file (.npz)")
    calibrate.add_argument("--tensors", nargs="+", metavar="NAME",
                           help="tensors to measure (default: the input of every Conv/Gemm/MatMul with a "
                                "constant weight)")
    calibrate.add_argument("--batch-size", type=int, default=32)
    _add_calibration(calibrate)
    _add_shapes(calibrate)
    _add_common(calibrate)

    ops = commands.add_parser("ops", help="graphopt's custom ops: build the native kernels")
    ops_commands = ops.add_subparsers(dest="ops_command", required=True, parser_class=_Parser)
    build = ops_commands.add_parser("build", help="compile the native kernels into a shared library (g++)")
    build.add_argument("-o", "--output", type=Path, help="library path (default: the user cache directory)")
    build.add_argument("--ort-include", type=Path, metavar="DIR",
                       help="onnxruntime headers (default: $ORT_INCLUDE_DIR, else Debian's libonnxruntime-dev)")
    _add_common(build)
    return parser


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-memory", default="2GB", metavar="SIZE",
                        help="bound on what calibration holds at once, e.g. 512MB (default 2GB)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="onnxruntime device for calibration")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--mask-input", metavar="NAME", help="attention-mask input: token statistics skip padding")


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    from graphopt.ir.shapes import parse_input_shape

    return dict(parse_input_shape(text) for text in args.input_shape)


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, sort_keys=False, default=str))


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_inspect(args: argparse.Namespace) -> None:
    from graphopt.inspect import inspect_model

    info = inspect_model(args.model, input_shapes=_shapes(args), groups=args.groups)
    if args.json:
        _print_json(info)
        return
    print(f"{args.model}: opset {info['opsets']}, {info['nodes']} nodes")
    print(f"  MACs/sample {info['macs']:,}   params {info['params']:,}")
    for io in ("inputs", "outputs"):
        for entry in info[io]:
            print(f"  {io[:-1]:6s} {entry['name']}: {entry['dtype']} {entry['shape']}")
    print("  ops: " + ", ".join(f"{op} x{count}" for op, count in info["op_histogram"].items()))
    if info["metadata_props"]:
        print("  metadata: " + ", ".join(sorted(info["metadata_props"])))
    for group in info.get("groups", []):
        status = "prunable" if group["prunable"] else f"blocked: {group['reason']}"
        print(f"  group {group['id']}: {group['size']} channels, {status}")
        print("    " + ", ".join(group["members"]))


def cmd_verify(args: argparse.Namespace) -> None:
    from graphopt.api import as_model
    from graphopt.evaluate import verify

    report = verify(as_model(args.reference), as_model(args.candidate), args.data,
                    batch_size=args.batch_size, progress=not args.quiet).to_json()
    if args.json:
        _print_json(report)
        return
    print(f"max_abs {_fmt(report['max_abs'])}  rel_l2 {_fmt(report['rel_l2'])}  "
          f"cosine {_fmt(report['cosine'], '.6f')}  top1_agreement {_fmt(report['top1_agreement'], '.4f')}"
          f"  ({report['samples']} samples)")


def cmd_bench(args: argparse.Namespace) -> None:
    from graphopt.api import as_model
    from graphopt.evaluate import bench

    result = bench(as_model(args.model), data=args.data, batch=args.batch, repeat=args.repeat,
                   threads=args.threads, device=args.device, progress=not args.quiet)
    if args.json:
        _print_json(result)
        return
    print(f"median {result['median_ms']:.3f} ms  p10 {result['p10_ms']:.3f}  p90 {result['p90_ms']:.3f}  "
          f"(batch {result['batch']}, {result['repeat']} runs, {', '.join(result['providers'])})")


def cmd_optimize(args: argparse.Namespace) -> None:
    from graphopt.api import optimize
    from graphopt.calibration.collect import parse_bytes

    if args.report is not None:  # checked before anything is written
        from graphopt.ir.io import input_files

        if args.report.resolve() in input_files(args.model) | {args.output.resolve()}:
            raise GraphoptError(f"refusing to overwrite the input model or the output with the report: {args.report}")
        if not args.report.parent.is_dir():
            raise GraphoptError(f"report directory does not exist: {args.report.parent}")
    result = optimize(args.model, method=args.method, calib=args.calib, target_macs=args.target_macs,
                      input_shapes=_shapes(args), output=args.output, batch_size=args.batch_size,
                      progress=not args.quiet, round_to=args.round_to, norm=args.norm, seed=args.seed,
                      stats=args.stats, calib_memory=parse_bytes(args.calib_memory), device=args.device,
                      threads=args.threads, mask_input=args.mask_input, keep_variance=args.keep_variance,
                      criterion=args.criterion, reconstruct=not args.no_reconstruct, sequential=args.sequential,
                      cob_reconstruct=args.cob_reconstruct,
                      sparsity=args.sparsity, omp_scope=args.omp_scope, keep_first_last=args.keep_first_last,
                      sparse_storage=args.sparse_storage, rotation=args.rotation, zscore=args.zscore,
                      exprune_probe=args.exprune_probe, exprune_fnr=args.exprune_fnr,
                      exprune_rule=args.exprune_rule, tolerance=args.tolerance, exprune_layers=args.exprune_layers,
                      exprune_rows=args.exprune_rows, exprune_maps=args.exprune_maps,
                      exprune_held_out=args.exprune_held_out)
    report = result.report
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2, default=str))
    if args.json:
        _print_json(report)
        return
    fidelity = report["fidelity"]
    print(f"MACs   {report['macs_before']:,} -> {report['macs_after']:,} ({report['macs_ratio']:.1%})")
    print(f"params {report['params_before']:,} -> {report['params_after']:,}")
    print(f"fidelity on {fidelity['samples']} {fidelity['data']} samples: rel_l2 {_fmt(fidelity['rel_l2'])}  "
          f"cosine {_fmt(fidelity['cosine'], '.6f')}  top1_agreement {_fmt(fidelity['top1_agreement'], '.4f')}")
    if "exprune_macs_skipped" in report:
        dynamic = report["exprune_macs_skipped"]
        print(f"exprune skips {dynamic['fraction_of_model']:.1%} of the remaining MACs per input "
              f"(measured on the {dynamic['data']} samples)")
        convs = next((p["stats"].get("conv_layers", 0) for p in report["passes"] if p["pass"] == "exprune"), 0)
        if convs:
            print(f"note: {convs} Conv+ReLU layer(s) became graphopt.ExPruneConvRelu, which has no native kernel "
                  "yet: they skip MACs but run slower than the convolutions they replace "
                  "(--exprune-layers linear leaves them alone)")
    sparsity = report["weight_sparsity"]["overall"]
    print((f"weight sparsity {sparsity:.1%}   " if sparsity else "")
          + f"file {report['bytes_before']:,} -> {report['bytes_after']:,} bytes")
    if "sparse_storage" in report:
        sparse = report["sparse_storage"]
        print("sparse storage: " + ("used" if sparse["used"] else f"not used ({sparse['reason']})"))
    methods_run = report["method"].split(",")
    for method_pass in report["passes"]:
        if method_pass["pass"] in methods_run and not method_pass["modified"]:
            reasons = method_pass["skipped"]
            print(f"{method_pass['pass']} changed nothing"
                  + (f": {reasons[0]}" + (f" (+{len(reasons) - 1} more in --report or -v)" if len(reasons) > 1
                                          else "") if reasons else ""))
    print(f"wrote {report['output']}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    import time

    from graphopt.api import calibrate
    from graphopt.calibration.collect import parse_bytes

    start = time.perf_counter()
    stats_file = calibrate(args.model, args.data, output=args.output, tensors=args.tensors,
                           batch_size=args.batch_size, memory_limit=parse_bytes(args.calib_memory),
                           device=args.device, threads=args.threads, mask_input=args.mask_input,
                           input_shapes=_shapes(args), progress=not args.quiet)
    seconds = time.perf_counter() - start
    report = {"output": str(args.output), "tensors": len(stats_file.stats), "samples": stats_file.samples,
              "seconds": seconds, "model_fingerprint": stats_file.model_fingerprint,
              "data_fingerprint": stats_file.data_fingerprint}
    if args.json:
        _print_json(report)
        return
    print(f"statistics of {report['tensors']} tensors over {report['samples']} samples in {seconds:.1f} s")
    print(f"wrote {args.output}")


def cmd_ops(args: argparse.Namespace) -> None:
    from graphopt.ops.build import build_library

    built = build_library(output=args.output, ort_include=args.ort_include)
    if args.json:
        _print_json(built.to_json())
        return
    if built.library is None:
        print(f"native kernels not built: {built.reason}")
        return
    print(f"built {built.library} (headers: {built.include_dir})")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "inspect": cmd_inspect, "verify": cmd_verify, "bench": cmd_bench, "optimize": cmd_optimize,
    "calibrate": cmd_calibrate, "ops": cmd_ops,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="graphopt: %(levelname)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line, traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"graphopt: internal error: {type(exc).__name__}: {exc}"
              + ("" if args.debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

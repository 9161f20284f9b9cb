"""Command-line interface: argument parsing and printing only; the work lives in the library.

Exit codes: 0 success; 2 bad usage or bad input (one line on stderr, nothing written); 1 internal error.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Callable

from graphopt._version import __version__
from graphopt.errors import GraphoptError
from graphopt.passes.methods import CalibrationOptions, Option, options_of

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


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its `GraphoptError` becomes the usage error, in one line."""

    @functools.wraps(parse)
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except GraphoptError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _text_type(declared: Option) -> Callable[[str], Any] | None:
    """What turns a declared option's text into its value: its parser, else int or float where the
    annotation is one of them (or None); other options stay text."""
    if declared.parse is not None:
        return _checked(declared.parse)
    kinds = [kind for kind in typing.get_args(declared.type) or (declared.type,) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None


def _add_option(parser: argparse.ArgumentParser, declared: Option) -> None:
    """A declared method option as a flag (graphopt.passes.methods); bool options are switches."""
    if declared.type is bool:
        parser.add_argument(declared.flag, dest=declared.name, help=declared.help,
                            action="store_false" if declared.default else "store_true")
        return
    settings = {"type": _text_type(declared), "choices": declared.choices, "metavar": declared.metavar,
                "help": declared.help}
    parser.add_argument(declared.flag, dest=declared.name, default=declared.default,
                        **{key: value for key, value in settings.items() if value is not None})


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass did and skipped")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _add_shapes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="resolve dynamic input dimensions (repeatable)")


def build_parser() -> argparse.ArgumentParser:

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

    _add_optimize(commands)

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


# where the method options have always stood in `graphopt optimize --help` (the CLI is a contract); an
# option declared later follows them in declaration order, before the calibration flags
_OPTIMIZE_LAYOUT = ("round_to", "norm", "seed", "keep_variance", "criterion", "sequential", "cob_reconstruct",
                    "reconstruct", "sparsity", "omp_scope", "keep_first_last", "sparse_storage", "rotation", "zscore",
                    "stats", "exprune_probe", "exprune_fnr", "exprune_rule", "tolerance", "exprune_layers",
                    "exprune_rows", "exprune_maps", "exprune_held_out")


def _add_optimize(commands: Any) -> None:
    """The optimize command: its own arguments, then a flag for every option a method declares."""
    from graphopt.api import method_options, methods

    declared = {name: found for name, found in method_options().items() if found.flag is not None}
    optimize = commands.add_parser("optimize", help="run the pre-passes and a compression method")
    optimize.add_argument("model", type=Path)
    optimize.add_argument("-o", "--output", type=Path, required=True)
    optimize.add_argument("--method", type=_method, required=True, metavar="|".join(methods()),
                          help="'none' runs only the normalising pre-passes; a comma-separated list runs "
                               "methods in order (snp,exprune: static then dynamic pruning)")
    optimize.add_argument("--calib", type=Path, help="calibration .npz (also used to report fidelity)")
    _add_option(optimize, declared["target_macs"])
    optimize.add_argument("--report", type=Path, help="write a JSON report here")
    placed = {"target_macs", "batch_size", *options_of(CalibrationOptions)}
    rest = [name for name in declared if name not in _OPTIMIZE_LAYOUT and name not in placed]
    for name in ["batch_size", *(name for name in _OPTIMIZE_LAYOUT if name in declared), *rest]:
        _add_option(optimize, declared[name])
    _add_calibration(optimize)
    _add_shapes(optimize)
    _add_common(optimize)


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    """How statistics are measured: the same flags for optimize and calibrate."""
    for declared in options_of(CalibrationOptions).values():
        _add_option(parser, declared)


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


def _check_report_path(args: argparse.Namespace) -> None:
    """Refuse a --report path that is an input (model, its external data, --calib, --stats) or the output,
    by path, symlink or hard link, before anything is written."""
    from graphopt.ir.io import input_files, same_file

    guarded = [*input_files(args.model), args.output, *(p for p in (args.calib, args.stats) if p is not None)]
    clash = next((p for p in guarded if same_file(args.report, p)), None)
    if clash is not None:
        raise GraphoptError(f"refusing to overwrite the input model, data or output with the report: {args.report} "
                            f"(the same file as {clash})")
    if not args.report.parent.is_dir():
        raise GraphoptError(f"report directory does not exist: {args.report.parent}")


def cmd_optimize(args: argparse.Namespace) -> None:
    from graphopt.api import method_options, optimize

    if args.report is not None:
        _check_report_path(args)
    options = {name: getattr(args, name) for name, declared in method_options().items() if declared.flag is not None}
    result = optimize(args.model, method=args.method, calib=args.calib, input_shapes=_shapes(args),
                      output=args.output, progress=not args.quiet, **options)
    report = result.report
    if args.report is not None:
        from graphopt.ir.io import write_atomic

        text = json.dumps(report, indent=2, default=str).encode()
        write_atomic(args.report, lambda stream: stream.write(text))
    if args.json:
        _print_json(report)
        return
    _print_optimized(report)


def _print_optimized(report: dict[str, Any]) -> None:
    fidelity = report["fidelity"]
    print(f"MACs   {report['macs_before']:,} -> {report['macs_after']:,} ({report['macs_ratio']:.1%})")
    print(f"params {report['params_before']:,} -> {report['params_after']:,}")
    print(f"fidelity on {fidelity['samples']} {fidelity['data']} samples: rel_l2 {_fmt(fidelity['rel_l2'])}  "
          f"cosine {_fmt(fidelity['cosine'], '.6f')}  top1_agreement {_fmt(fidelity['top1_agreement'], '.4f')}")
    if "exprune_macs_skipped" in report:
        _print_exprune(report)
    sparsity = report["weight_sparsity"]["overall"]
    print((f"weight sparsity {sparsity:.1%}   " if sparsity else "")
          + f"file {report['bytes_before']:,} -> {report['bytes_after']:,} bytes")
    if "sparse_storage" in report:
        sparse = report["sparse_storage"]
        print("sparse storage: " + ("used" if sparse["used"] else f"not used ({sparse['reason']})"))
    _print_unchanged(report)
    print(f"wrote {report['output']}")


def _print_exprune(report: dict[str, Any]) -> None:
    dynamic = report["exprune_macs_skipped"]
    print(f"exprune skips {dynamic['fraction_of_model']:.1%} of the remaining MACs per input "
          f"(measured on the {dynamic['data']} samples)")
    convs = next((p["stats"].get("conv_layers", 0) for p in report["passes"] if p["pass"] == "exprune"), 0)
    if convs:
        print(f"note: {convs} Conv+ReLU layer(s) became graphopt.ExPruneConvRelu, which has no native kernel "
              "yet: they skip MACs but run slower than the convolutions they replace "
              "(--exprune-layers linear leaves them alone)")


def _print_unchanged(report: dict[str, Any]) -> None:
    """One line for every method of the run that changed nothing, with its first reason."""
    methods_run = report["method"].split(",")
    for method_pass in report["passes"]:
        if method_pass["pass"] in methods_run and not method_pass["modified"]:
            reasons = method_pass["skipped"]
            print(f"{method_pass['pass']} changed nothing"
                  + (f": {reasons[0]}" + (f" (+{len(reasons) - 1} more in --report or -v)" if len(reasons) > 1
                                          else "") if reasons else ""))


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

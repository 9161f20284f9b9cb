"""Command-line interface: argument parsing and printing only; the work lives in the library.

Exit codes: 0 success; 2 bad usage or bad input (one line on stderr, nothing written, inputs untouched);
1 internal error (one line; `--debug` prints the traceback, with the exceptions it was raised from);
3 `optimize --strict` missed `--target-macs` by more than 2% (relative), or measured more than 10% above
`--target-latency` (the output is still written).
Without `--strict` a missed target is a warning on stderr and exit code 0. Every command that writes
checks all its outputs against all its inputs, and against each other, before any work
(`_check_outputs`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
import traceback
import typing
from pathlib import Path
from typing import Any, Callable

from graphopt._version import __version__
from graphopt.errors import GraphoptError
from graphopt.passes.methods import CalibrationOptions, Option, options_of

log = logging.getLogger("graphopt")
BELOW_TARGET = 0.01  # a MAC ratio this far (relative) under --target-macs gets a note saying why


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
        if declared.on_flag:  # the earlier spelling of a switch that is now on by default
            parser.add_argument(declared.on_flag, dest=declared.name, action="store_true", default=declared.default,
                                help=f"the default; {declared.flag} turns it off")
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
                        help="resolve dynamic input dimensions (repeatable): INPUT=1x3x224x224 for one input, "
                             "or DIM=N for a dimension symbol wherever it appears (sequence=128)")


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
    verify.add_argument("--batch-size", type=int, default=None,
                        help="samples per run (default 32; below the row count from which a candidate's ExPrune "
                             "layers run dense, so that their skipping is what is measured)")
    verify.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="onnxruntime device both models run on (cuda: onnxruntime-gpu's CUDA provider)")
    _add_fidelity(verify)
    _add_common(verify)

    bench = commands.add_parser("bench", help="latency in onnxruntime (full graph optimisation); with two models, "
                                              "the speedup of the second over the first, timed side by side")
    bench.add_argument("model", type=Path)
    bench.add_argument("candidate", type=Path, nargs="?",
                       help="a second model: both are timed in interleaved rounds and the ratio is reported")
    bench.add_argument("--data", type=Path, help="inputs to time on (default: seeded random inputs)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--repeat", type=int, default=50, help="timed runs (with two models: interleaved rounds, "
                                                              "3 runs of each model per round)")
    bench.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _add_shapes(bench)
    _add_common(bench)

    _add_optimize(commands)
    _add_sweep(commands)

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
    optimize.add_argument("--strict", action="store_true",
                          help="exit with code 3 when the model misses --target-macs by more than 2%% "
                               "(relative), or its measured latency lies more than 10%% above --target-latency; "
                               "the output is still written")
    optimize.add_argument("--report", type=Path, help="write a JSON report here")
    placed = {"target_macs", "batch_size", *options_of(CalibrationOptions)}
    rest = [name for name in declared if name not in _OPTIMIZE_LAYOUT and name not in placed]
    for name in ["batch_size", *(name for name in _OPTIMIZE_LAYOUT if name in declared), *rest]:
        _add_option(optimize, declared[name])
    _add_calibration(optimize)
    _add_shapes(optimize)
    _add_common(optimize)


def _add_sweep(commands: Any) -> None:
    """The sweep command: methods x targets, one table (graphopt.sweep)."""
    from graphopt.api import method_options
    from graphopt.sweep import parse_alternatives, parse_targets

    declared = method_options()
    sweep = commands.add_parser("sweep", help="compare methods over a range of targets: MACs, size, measured "
                                              "speedup and held-out fidelity in one table, JSON and plot")
    sweep.add_argument("model", type=Path)
    sweep.add_argument("--calib", type=Path, required=True, help="calibration .npz (a held-out part scores fidelity)")
    sweep.add_argument("--method", type=_checked(parse_alternatives), required=True, metavar="M[,M...]",
                       help="the methods compared, separated by commas; a pipeline joins methods with '+' "
                            "(snp,magnitude,snp+exprune)")
    targets = sweep.add_mutually_exclusive_group(required=True)
    targets.add_argument("--targets", type=_checked(parse_targets), metavar="F[,F...]",
                         help="fractions of the original's MACs, e.g. 0.9,0.8,0.7,0.6,0.5")
    if "target_latency" in declared:
        targets.add_argument("--latency-targets", type=_checked(parse_targets), metavar="F[,F...]",
                             help="fractions of the original's latency at --bench-batch (--target-latency)")
    sweep.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                       help="folder for sweep.json and sweep.png (created if missing)")
    sweep.add_argument("--held-out", type=float, default=0.25, metavar="F",
                       help="fraction of the calibration samples held out to score fidelity (default 0.25)")
    sweep.add_argument("--repeat", type=int, default=30, help="interleaved timing rounds per batch (default 30)")
    sweep.add_argument("--no-bench", action="store_true", help="skip the timings (a quick sweep)")
    sweep.add_argument("--resume", action="store_true",
                       help="keep the runs OUTDIR/sweep.json already holds (it is written after every run) and run "
                            "only the rest; refused when that file was written with other settings")
    for name in ("bench_batch", "threads", "round_to", *(["tolerance"] if "tolerance" in declared else [])):
        _add_option(sweep, declared[name])
    _add_fidelity(sweep)
    _add_shapes(sweep)
    _add_common(sweep)


def _add_fidelity(parser: argparse.ArgumentParser) -> None:
    """--metric and --ctc-blank, as optimize declares them, for the commands that measure fidelity."""
    from graphopt.api import method_options

    declared = method_options()
    for name in ("metric", "ctc_blank"):
        _add_option(parser, declared[name])


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    """How statistics are measured: the same flags for optimize and calibrate."""
    for declared in options_of(CalibrationOptions).values():
        _add_option(parser, declared)


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    from graphopt.ir.shapes import parse_input_shape

    return dict(parse_input_shape(text) for text in args.input_shape)


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, sort_keys=False, default=str))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_inspect(args: argparse.Namespace) -> None:
    from graphopt.inspect import inspect_model

    info = inspect_model(args.model, input_shapes=_shapes(args), groups=args.groups)
    if args.json:
        _print_json(info)
        return
    print(f"{args.model}: opset {info['opsets']}, {info['nodes']} nodes")
    macs = f"{info['macs']:,}" if info["macs"] is not None else f"unknown ({info['macs_unknown']})"
    print(f"  MACs/sample {macs}   params {info['params']:,}")
    for io in ("inputs", "outputs"):
        for entry in info[io]:
            print(f"  {io[:-1]:6s} {entry['name']}: {entry['dtype']} {entry['shape']}")
    print("  ops: " + ", ".join(f"{op} x{count}" for op, count in info["op_histogram"].items()))
    if info["metadata_props"]:
        print("  metadata: " + ", ".join(sorted(info["metadata_props"])))
    for group in info.get("groups", []):
        status = "prunable" if group["prunable"] else f"blocked: {group['reason']}"
        runs = f" (in whole runs of {group['whole_runs_of']})" if "whole_runs_of" in group else ""
        print(f"  group {group['id']}: {group['size']} channels{runs}, {status}")
        print("    " + ", ".join(group["members"]))
    for block in info.get("head_blocks", []):
        status = "prunable" if block["prunable"] else f"blocked: {block['reason']}"
        print(f"  heads of {block['name']}: {block['heads']} heads in {block['units']} units of {block['unit']}, "
              f"{status}")


def cmd_verify(args: argparse.Namespace) -> None:
    from graphopt.api import verify

    report = verify(args.reference, args.candidate, args.data, batch_size=args.batch_size, metric=args.metric,
                    ctc_blank=args.ctc_blank, progress=not args.quiet, device=args.device).to_json()
    if args.json:
        _print_json(report)
        return
    print(f"max_abs {_fmt(report['max_abs'])}  rel_l2 {_fmt(report['rel_l2'])}  "
          f"cosine {_fmt(report['cosine'], '.6f')}  top1_agreement {_fmt(report['top1_agreement'], '.4f')}"
          f"{_agreements(report)}  ({report['samples']} samples)")


def _agreements(fidelity: dict[str, Any]) -> str:
    """The sequence agreements and the user's metric of a fidelity report, as the end of its line."""
    text = ""
    if fidelity.get("kind") == "sequence":
        text += (f"  position_agreement {_fmt(fidelity['position_agreement'], '.4f')}  "
                 f"sequence_agreement {_fmt(fidelity['sequence_agreement'], '.4f')}")
    for key, value in (fidelity.get("metric") or {}).items():
        text += f"  {key} {_fmt(value, '.4g')}"
    return text


def cmd_bench(args: argparse.Namespace) -> None:
    from graphopt.api import as_model
    from graphopt.evaluate import bench

    if args.candidate is not None:
        _bench_pair(args)
        return
    model = as_model(args.model)
    result = bench(model, data=args.data, batch=args.batch, repeat=args.repeat, threads=args.threads,
                   device=args.device, shapes=_bench_shapes(args, model), progress=not args.quiet)
    if args.json:
        _print_json(result)
        return
    print(f"median {result['median_ms']:.3f} ms  p10 {result['p10_ms']:.3f}  p90 {result['p90_ms']:.3f}  "
          f"(batch {result['batch']}, {result['repeat']} runs, {', '.join(result['providers'])})")


def _bench_pair(args: argparse.Namespace) -> None:
    from graphopt.api import as_model
    from graphopt.evaluate import compare_latency

    if args.batch < 1 or args.repeat < 2:
        raise GraphoptError("--batch must be >= 1 and --repeat >= 2")
    reference = as_model(args.model)
    result = compare_latency(reference, as_model(args.candidate), data=args.data, batch=args.batch,
                             rounds=args.repeat, threads=args.threads, device=args.device,
                             shapes=_bench_shapes(args, reference), progress=not args.quiet)
    result = {"reference": str(args.model), "candidate": str(args.candidate), **result}
    if args.json:
        _print_json(result)
        return
    print(f"{args.candidate} vs {args.model}: {_speedup(result)}  ({result['candidate_ms']:.3f} ms vs "
          f"{result['reference_ms']:.3f} ms median, batch {result['batch']}, {result['rounds']} interleaved rounds, "
          f"{', '.join(result['providers'])})")


def _bench_shapes(args: argparse.Namespace, model: Any) -> dict[str, tuple[int, ...]] | None:
    """The inputs' batch-1 shapes with the dynamic dims `--input-shape` resolves (None: the model's own)."""
    from graphopt.ir.shapes import resolve_input_shapes

    return resolve_input_shapes(model, _shapes(args)) if args.input_shape else None


def _speedup(timing: dict[str, Any]) -> str:
    """'1.32x faster (p10 1.25x, p90 1.40x)' from a side-by-side timing."""
    ratio = timing["speedup"]
    word = "faster" if ratio >= 1.0 else "SLOWER"
    return f"{ratio:.2f}x {word} (p10 {timing['speedup_p10']:.2f}x, p90 {timing['speedup_p90']:.2f}x)"


def _check_outputs(outputs: list[Path], inputs: list[Path | None], model: Path) -> None:
    """Refuse, before any work, an input file that is not a regular file, and an output that is the same
    file as an input (the model, its external data files, the other inputs) or as another output, by path,
    symlink or hard link, or that cannot be written (graphopt.ir.files.check_outputs)."""
    from graphopt.errors import DataError
    from graphopt.ir.io import check_outputs, input_files, not_regular

    given = [path for path in inputs if path is not None]
    refused = next((reason for reason in map(not_regular, given) if reason), None)
    if refused:
        raise DataError(refused)
    check_outputs(outputs, [*input_files(model), *given])


def cmd_optimize(args: argparse.Namespace) -> int:
    from graphopt.api import method_options, optimize
    from graphopt.ir.io import model_outputs

    _check_outputs([*model_outputs(args.output), *([args.report] if args.report is not None else [])],
                   [args.calib, args.stats], args.model)
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
    else:
        _print_optimized(report)
    for batch in report.get("latency", {}).get("slower", []):
        timing = report["latency"][f"batch_{batch}"]
        print(f"graphopt: warning: the optimized model is slower than the original at batch {batch}: "
              f"{_speedup(timing)}", file=sys.stderr)
    for warning in (_quantized_slower(report), _fidelity_lost(report.get("fidelity"))):
        if warning is not None:
            print(f"graphopt: warning: {warning}", file=sys.stderr)
    missed = _target_missed(report)
    if missed is None:
        return 0
    if args.strict:
        print(f"graphopt: error: {missed}; the output was still written to {report['output']}", file=sys.stderr)
        return 3
    print(f"graphopt: warning: {missed} (--strict makes this exit code 3)", file=sys.stderr)
    return 0


def _quantized_slower(report: dict[str, Any]) -> str | None:
    """Why quantization did not pay (the quantize pass's side-by-side timing slower in 9 rounds of 10), or None."""
    stats = next((p.get("stats", {}) for p in report["passes"] if p["pass"] == "quantize"), {})
    if stats.get("speedup_b1_p90", 1.0) >= 1.0:
        return None
    return (f"the quantized model ran {stats['speedup_b1']:.2f}x as fast as the float model it came from at batch 1 "
            f"(p10 {stats['speedup_b1_p10']:.2f}, p90 {stats['speedup_b1_p90']:.2f}): onnxruntime's integer kernels "
            "do not pay on this graph; the float model is the faster one")


def _fidelity_lost(fidelity: dict[str, Any] | None) -> str | None:
    """Why the result no longer computes what the original did (its first output's error on the fidelity data
    at least as large as the output itself: rel_l2 >= 1, no closer than an output of zeros), or None."""
    if not fidelity or fidelity.get("rel_l2") is None or not fidelity["rel_l2"] >= 1.0:
        return None
    cosine = f", cosine {fidelity['cosine']:.3f}" if fidelity.get("cosine") is not None else ""
    return (f"the optimized model's first output differs from the original's by more than the output itself "
            f"(rel_l2 {fidelity['rel_l2']:.3g}{cosine} on {fidelity.get('samples', '?')} {fidelity.get('data', '')} "
            "samples): it no longer computes what the original did")


def _latency_missed(latency: dict[str, Any] | None) -> str | None:
    """Why the written model misses --target-latency (measured more than 10% above it), or None."""
    if latency is None or latency.get("reached") is not False or latency["measured"] is None:
        return None
    tried = ", ".join(_percent(a["measured"]) for a in latency["attempts"] if a["measured"] is not None)
    return (f"--target-latency {latency['target']} not reached: the result measures {_percent(latency['measured'])} "
            f"of the original's latency at batch {latency['batch']}, more than 10% above the "
            f"{_percent(latency['target'])} asked (measured results: {tried})")


def _target_missed(report: dict[str, Any]) -> str | None:
    """Why the written model misses --target-macs (report["target_reached"] is False), in one line with the
    main reasons the methods gave, or its measured latency lies more than 10% (relative) above
    --target-latency; None when the target was reached or none was asked."""
    latency = _latency_missed(report.get("latency_target"))
    if latency is not None:
        return latency
    if report.get("target_reached") is not False:
        return None
    methods_run = report["method"].split(",")
    target = report["options"]["target_macs"]
    text = (f"--target-macs {target} not reached: the model keeps {_percent(report['macs_ratio'])} of its MACs, "
            f"more than 2% above the {_percent(target)} asked")
    floors = [found["stats"]["min_macs_ratio"] for found in report["passes"] if "min_macs_ratio" in found["stats"]]
    if floors:
        text += f"; the smallest reachable is {_percent(min(floors))}"
    reasons = [f"{found['pass']}: {reason}" for found in report["passes"] if found["pass"] in methods_run
               for reason in found["skipped"]]
    if report["method"] == "none":
        text += "; --method none runs only the pre-passes"
    elif reasons:
        more = len(reasons) - 2
        text += "; " + "; ".join(reasons[:2]) + (f" (+{more} more in --report or -v)" if more > 0 else "")
    return text


def _padding_note(report: dict[str, Any]) -> str:
    padding = report.get("padding")
    if not padding:
        return ""
    if padding["trimmed"]:
        return f"; batches cut after their last token ({padding['positions_run']:.1%} of positions run)"
    return f"; batches run whole ({padding['reason']})"


def _uncounted(report: dict[str, Any]) -> str:
    count = len(report.get("macs_uncounted") or ())
    return f"   {count} layer{'s' if count > 1 else ''} not counted: shapes unknown inside control-flow bodies" \
        if count else ""


def _print_optimized(report: dict[str, Any]) -> None:
    fidelity = report["fidelity"]
    print(f"MACs   {report['macs_before']:,} -> {report['macs_after']:,} ({report['macs_ratio']:.1%})"
          + _uncounted(report))
    print(f"params {report['params_before']:,} -> {report['params_after']:,}")
    print(f"fidelity on {fidelity['samples']} {fidelity['data']} samples: rel_l2 {_fmt(fidelity['rel_l2'])}  "
          f"cosine {_fmt(fidelity['cosine'], '.6f')}  top1_agreement {_fmt(fidelity['top1_agreement'], '.4f')}"
          f"{_agreements(fidelity)}")
    if len(report.get("steps", [])) > 1:
        for step in report["steps"]:
            print(f"  after {step['step']}: MACs {step['macs_ratio']:.1%}  {step['bytes']:,} bytes  rel_l2 "
                  f"{_fmt(step['fidelity']['rel_l2'])}  top1_agreement {_fmt(step['fidelity']['top1_agreement'], '.4f')}")
    if "exprune_macs_skipped" in report:
        _print_exprune(report)
    mask = report.get("mask_input") or {}
    if mask.get("name") is not None:
        print(f"token statistics masked by input '{mask['name']}' ({mask['how']})" + _padding_note(report))
    if "latency_target" in report:
        _print_latency_target(report["latency_target"])
    _print_relaxed_rounding(report)
    _print_below_target(report)
    _print_half_precision_quantized(report)
    _print_repair(report)
    latency = report.get("latency")
    if latency:
        print("latency: " + ", ".join(f"{_speedup(timing)} at batch {timing['batch']}"
                                      for key, timing in latency.items() if key.startswith("batch_")))
    sparsity = report["weight_sparsity"]["overall"]
    print((f"weight sparsity {sparsity:.1%}   " if sparsity else "")
          + f"file {report['bytes_before']:,} -> {report['bytes_after']:,} bytes")
    if "sparse_storage" in report:
        sparse = report["sparse_storage"]
        print("sparse storage: " + ("used" if sparse["used"] else f"not used ({sparse['reason']})"))
    _print_unchanged(report)
    print(f"wrote {report['output']}")


def _print_repair(report: dict[str, Any]) -> None:
    """--repair's cost and gain: the relative output error on the held-out calibration slice and the training part."""
    repair = report.get("repair")
    if not repair:
        return
    kept = f"best at step {repair['best_step']}" if repair["best_step"] else "the starting weights kept"
    print(f"repair: {repair['steps']} steps in {repair['seconds']:.1f} s ({kept}), error held-out "
          f"{_fmt(repair['loss_held_out_before'])} -> {_fmt(repair['loss_held_out_after'])}, train "
          f"{_fmt(repair['loss_train_before'])} -> {_fmt(repair['loss_train_after'])} "
          f"({repair['samples']['held_out']} / {repair['samples']['train']} samples; matched "
          f"{', '.join(repair['tensors'])})")
    if repair.get("lr_used") is not None and repair["lr_used"] != repair["lr"]:
        print(f"  the held-out error rose at learning rate {repair['lr']:g}: trained at {repair['lr_used']:g}")
    if repair.get("masked_by"):
        print(f"  padded tokens left out of the distillation (mask input '{repair['masked_by']}')")


def _print_relaxed_rounding(report: dict[str, Any]) -> None:
    """One note when auto rounding left the provider's blocks to reach the target (see alignment.py)."""
    relaxed = [p["stats"] for p in report["passes"] if p.get("stats", {}).get("rounding_relaxed")]
    if relaxed:
        print(f"note: to reach the target, channel counts were rounded to multiples of "
              f"{min(stats['channel_multiple_min'] for stats in relaxed)} instead of the execution provider's "
              "blocks; such counts can run slower than the original (measure with --bench)")


def _print_below_target(report: dict[str, Any]) -> None:
    """One note when the model lands more than BELOW_TARGET (relative) under --target-macs because keeping
    one more unit of any group the budget cut would exceed the target (the passes' `cheapest_restore`)."""
    target = report["options"].get("target_macs")
    steps = [p["stats"]["cheapest_restore"] for p in report["passes"] if "cheapest_restore" in p.get("stats", {})]
    if target is None or not steps or report["macs_ratio"] >= float(target) * (1.0 - BELOW_TARGET):
        return
    print(f"note: the model keeps {_percent(report['macs_ratio'])} of its MACs for the {_percent(float(target))} "
          f"asked: keeping one more unit of any group it cut would exceed the target (the cheapest adds "
          f"{_percent(min(steps))}), and the budget keeps the most importance within the target rather than "
          "the ratio nearest to it")


def _print_half_precision_quantized(report: dict[str, Any]) -> None:
    if any(p.get("stats", {}).get("half_precision") for p in report["passes"] if p["pass"] == "quantize"):
        print("note: the model computes in float16; onnxruntime's CPU provider has integer kernels for QDQ around "
              "float32 ops only, so the quantized model can run several times slower there (measure with --bench; "
              "quantize the float32 model for CPU speed)")


def _print_latency_target(target: dict[str, Any]) -> None:
    cached = (f"{target['table_cache_hits']} of {target['table_entries']} layer tables cached, "
              f"built in {target['table_build_s']:.1f} s")
    print(f"latency target {_percent(target['target'])} at batch {target['batch']}: predicted "
          f"{_percent(target['predicted']) if target['predicted'] is not None else 'n/a'}, measured "
          f"{_percent(target['measured']) if target['measured'] is not None else 'n/a'} of the original ({cached})")
    first, *retried = target.get("attempts", [])
    if retried:
        measured = [_percent(a["measured"]) if a["measured"] is not None else "n/a" for a in (first, *retried)]
        again = ", ".join(f"{_percent(a['solved_for'])} (measured {m})" for a, m in zip(retried, measured[1:]))
        print(f"  the first result measured {measured[0]}, so the budget was solved again for a predicted {again}; "
              f"kept the one solved for {_percent(target['solved_for'])}")


def _print_exprune(report: dict[str, Any]) -> None:
    dynamic = report["exprune_macs_skipped"]
    rows = dynamic.get("dense_from_rows")
    dense = f"; calls of {rows} rows or more run the dense layers and skip nothing (--exprune-dense-rows)" if rows \
        else ""
    print(f"exprune skips {dynamic['fraction_of_model']:.1%} of the remaining MACs per input "
          f"(measured on the {dynamic['data']} samples){dense}")
    stats = next((p["stats"] for p in report["passes"] if p["pass"] == "exprune"), {})
    layers, convs = stats.get("layers", 0), stats.get("conv_layers", 0)
    if not layers:
        return
    from graphopt.calibration.session import native_conv_kernel

    if convs and not native_conv_kernel():
        print(f"note: {convs} Conv+ReLU layer(s) became graphopt.ExPruneConvRelu and the native kernels are not "
              "built (graphopt ops build): they skip MACs but run slower than the convolutions they replace "
              "(the default, --exprune-layers auto, leaves them dense)")
    elif not any(key.endswith(".speedup") for key in stats):
        kinds = " and ".join([f"{convs} Conv+ReLU layer(s)"] * bool(convs) +
                             [f"{layers - convs} linear layer(s)"] * bool(layers - convs))
        print(f"note: {kinds} became ExPrune ops without being timed (--exprune-layers all, linear or conv): where "
              "few of their units are skipped, or their zeros scatter, they can run slower than the dense layers; "
              "the default, --exprune-layers auto, keeps only those measured faster")


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

    _check_outputs([args.output], [args.data], args.model)
    start = time.perf_counter()
    stats_file = calibrate(args.model, args.data, output=args.output, tensors=args.tensors,
                           batch_size=args.batch_size, memory_limit=parse_bytes(args.calib_memory),
                           device=args.device, threads=args.threads, mask_input=args.mask_input,
                           input_shapes=_shapes(args), progress=not args.quiet, workers=args.workers,
                           ray_address=args.ray_address, rows_per_channel=args.calib_rows_per_channel,
                           trim_padding=args.trim_padding)
    seconds = time.perf_counter() - start
    report = {"output": str(args.output), "tensors": len(stats_file.stats), "samples": stats_file.samples,
              "seconds": seconds, "model_fingerprint": stats_file.model_fingerprint,
              "data_fingerprint": stats_file.data_fingerprint, "mask_input": stats_file.mask_input,
              "mask_found_automatically": args.mask_input is None and stats_file.mask_input is not None}
    if args.json:
        _print_json(report)
        return
    print(f"statistics of {report['tensors']} tensors over {report['samples']} samples in {seconds:.1f} s")
    if report["mask_input"] is not None:
        print(f"token rows masked by input '{report['mask_input']}'"
              + (" (found automatically)" if report["mask_found_automatically"] else ""))
    print(f"wrote {args.output}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from graphopt.sweep import sweep, table

    latency = getattr(args, "latency_targets", None)
    started = time.time()
    try:
        report = sweep(args.model, args.calib, methods=args.method, targets=latency or args.targets,
                       kind="latency" if latency else "macs", output_dir=args.output, held_out=args.held_out,
                       bench=not args.no_bench, bench_batch=args.bench_batch, threads=args.threads,
                       repeat=args.repeat, input_shapes=_shapes(args), progress=not args.quiet,
                       round_to=args.round_to, resume=args.resume, **_fidelity_options(args))
    except KeyboardInterrupt:
        written = args.output / "sweep.json"
        if written.exists() and written.stat().st_mtime >= started:
            print(f"graphopt: the runs finished so far are in {written}; the same command with --resume runs "
                  f"the rest", file=sys.stderr)
        raise
    if args.json:
        _print_json(report)
    else:
        print("\n".join(table(report)))
        if report["resumed"]:
            print(f"resumed: {report['resumed']} of {report['runs']} runs taken from the earlier {report['output']}")
        print(f"wrote {report['output']}" + (f" and {report['plot']}" if report["plot"] else ""))
    return _sweep_warnings(report)


def _sweep_warnings(report: dict[str, Any]) -> int:
    """A sweep's warnings and errors on stderr (a skipped plot, results slower than the original, failed runs);
    the exit code: 1 where a run failed."""
    from graphopt.sweep import slower_than_original

    if report.get("plot_skipped"):
        print(f"graphopt: warning: plot skipped: {report['plot_skipped']}", file=sys.stderr)
    for row in report["rows"]:
        slower = slower_than_original(row)
        if slower is not None:
            print(f"graphopt: warning: {row['method']} at {row['target']:g} is {slower}", file=sys.stderr)
    failed = [row for row in report["rows"] if row["failed"]]
    for row in failed:
        print(f"graphopt: error: {row['method']} at {row['target']:g} failed: {row['reason']}", file=sys.stderr)
    return 1 if failed else 0


def _fidelity_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fidelity options a sweep hands to every run: --metric, --ctc-blank and --tolerance where given."""
    given = {"metric": args.metric, "tolerance": getattr(args, "tolerance", None), "ctc_blank": args.ctc_blank or None}
    return {name: value for name, value in given.items() if value is not None}


def cmd_ops(args: argparse.Namespace) -> int | None:
    from graphopt.ops.build import build_library

    built = build_library(output=args.output, ort_include=args.ort_include)
    if args.json:
        _print_json(built.to_json())
        return 1 if built.library is None else None
    if built.library is None:  # a failed build is an error (exit 1): scripts and CI must see it
        print(f"graphopt: error: native kernels not built: {built.reason}", file=sys.stderr)
        return 1
    print(f"built {built.library} (headers: {built.include_dir})")
    return None


COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "inspect": cmd_inspect, "verify": cmd_verify, "bench": cmd_bench, "optimize": cmd_optimize,
    "calibrate": cmd_calibrate, "ops": cmd_ops, "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="graphopt: %(levelname)s: %(message)s")
    try:
        code = COMMANDS[args.command](args)
    except GraphoptError as exc:
        if args.debug:
            traceback.print_exc()
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
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

"""Compression methods, each declared once: its name, whether it reads calibration data, its passes and
its options.

A method's options are a dataclass (a subclass of `Options`) whose fields are declared with `option(...)`:
the default, the help text and how the option reads on the command line (flag, choices, metavar, a
parser for the text). `graphopt optimize`'s flags, the keyword options of `graphopt.api.optimize` and
the report's "options" are all built from these declarations. A name means one thing everywhere: the
options several methods read are declared once below and composed into each method's dataclass by
inheritance (`CalibrationOptions` and `RunOptions` hold what every run reads; `Rounding`, `Seeded`,
`KeepVariance`, `Reconstruction` and `StatisticsOptions` what some methods share; `QuantizeOptions` the
quantize method's), and registering a method that declares a known name differently is refused, as is a
second method of the same name.

Validation lives in the dataclasses (`__post_init__` raises `OptionError`, one line); the choices an
option declares are checked for every option. A run validates the options of the methods it runs and
`RunOptions` (the "none" method's, read by every run); an option only another method declares is
accepted and ignored, a name no method declares is refused. Checks that relate options to each other
or to the model stay with the passes.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, get_type_hints

from graphopt.calibration.collect import DEFAULT_ROWS_PER_CHANNEL, parse_bytes
from graphopt.calibration.metric import Metric, as_metric, load_metric
from graphopt.calibration.quantize import ACTIVATIONS, CALIBRATIONS
from graphopt.calibration.store import StatsFile
from graphopt.errors import OptionError
from graphopt.passes.base import REGISTRY
from graphopt.passes.channels.alignment import parse_round_to

_SPEC = "graphopt.option"  # the dataclass field metadata key `option` writes


@dataclass(frozen=True)
class _Spec:
    help: str | None
    flag: str | None
    choices: tuple[str, ...] | None
    metavar: str | None
    parse: Callable[[str], Any] | None
    cli: bool
    on_flag: str | None = None


def option(default: Any, *, help: str | None = None, flag: str | None = None, choices: Iterable[str] | None = None,
           metavar: str | None = None, parse: Callable[[str], Any] | None = None, cli: bool = True,
           on_flag: str | None = None) -> Any:
    """A field of an options dataclass. `flag` defaults to --the-name. On the command line a bool option is
    a switch (a True default: the flag turns it off, and `on_flag`, where given, turns it on: the switch's
    spelling from before its default became True), an int or float one (with None allowed) is converted,
    and `parse` turns the text into the value, raising a `GraphoptError` for bad text. `cli=False` keeps a
    tuning knob to the API."""
    spec = _Spec(help, flag, tuple(choices) if choices is not None else None, metavar, parse, cli, on_flag)
    return field(default=default, metadata={_SPEC: spec})


@dataclass(frozen=True)
class Option:
    """One declared option as the CLI, the API and the report see it."""

    name: str
    default: Any
    type: Any  # the field's annotation, resolved
    help: str | None
    flag: str | None  # None: API only
    choices: tuple[str, ...] | None
    metavar: str | None
    parse: Callable[[str], Any] | None
    on_flag: str | None = None  # a True-default switch: the flag that turns it on (see `option`)

    @property
    def label(self) -> str:
        """How messages name the option: its flag, else its keyword."""
        return self.flag or self.name


def _option(owner: type, spec_field: Field[Any], hints: dict[str, Any]) -> Option:
    spec = spec_field.metadata.get(_SPEC)
    if not isinstance(spec, _Spec) or spec_field.default is MISSING:
        raise ValueError(f"option '{spec_field.name}' of {owner.__qualname__} is not declared with option(default, ...)")
    flag = (spec.flag or "--" + spec_field.name.replace("_", "-")) if spec.cli else None
    return Option(spec_field.name, spec_field.default, hints[spec_field.name], spec.help, flag, spec.choices,
                  spec.metavar, spec.parse, spec.on_flag if spec.cli else None)


def options_of(cls: type[Options]) -> dict[str, Option]:
    """The options a dataclass declares (its own and inherited), in field order."""
    hints = get_type_hints(cls)
    return {spec_field.name: _option(cls, spec_field, hints) for spec_field in fields(cls)}


def _one_of(choices: tuple[str, ...]) -> str:
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


@dataclass
class Options:
    """Base of every method's options: checks the declared choices (None means "not given")."""

    def __post_init__(self) -> None:
        for declared in options_of(type(self)).values():
            value = getattr(self, declared.name)
            if declared.choices is not None and value is not None and value not in declared.choices:
                raise OptionError(f"{declared.label} must be {_one_of(declared.choices)}, got '{value}'")


@dataclass
class CalibrationOptions(Options):
    """How activation statistics are measured, by whichever method of the run measures them; `graphopt
    calibrate` takes the same flags."""

    calib_memory: int | str = option("2GB", metavar="SIZE",
                                     help="bound on what calibration holds at once, e.g. 512MB (default 2GB)")
    calib_rows_per_channel: int = option(
        DEFAULT_ROWS_PER_CHANNEL, metavar="K",
        help="Gram matrices of wide feature maps from a fixed sample of each sample's positions, about K rows per "
             f"channel in all (default {DEFAULT_ROWS_PER_CHANNEL}; 0: every position)")
    device: str = option("cpu", choices=("cpu", "cuda"), help="onnxruntime device for calibration")
    threads: int = option(0, help="intra-op threads (0: onnxruntime's default)")
    mask_input: str | None = option(None, metavar="NAME|none", help="attention-mask input: token statistics skip "
                                    "padding (default: found in the model; none: no mask)")
    trim_padding: bool = option(True, flag="--no-trim-padding",
                                help="run token batches whole: by default each batch runs only up to the last position "
                                     "the attention mask counts, where the model's outputs show that cutting the "
                                     "padding after it changes nothing (graphopt.calibration.trim)")
    workers: int | None = option(None, metavar="N", help="shard calibration over N Ray tasks on a local Ray "
                                 "instance graphopt starts and stops (with --ray-address: N shards on that "
                                 "cluster); --calib-memory then bounds each task; needs graphopt[ray]")
    ray_address: str | None = option(None, metavar="ADDR", help="run the calibration shards on an existing Ray "
                                     "cluster (host:port, ray://host:port or auto), which is left running; "
                                     "needs graphopt[ray]")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calib_memory = parse_bytes(self.calib_memory)  # bytes; a bad size is refused here, in one line
        if int(self.calib_rows_per_channel) < 0:
            raise OptionError(f"--calib-rows-per-channel must be 0 (every position) or more, "
                              f"got {self.calib_rows_per_channel}")
        if self.workers is not None and int(self.workers) < 1:
            raise OptionError(f"--workers must be at least 1, got {self.workers}")


def parse_tensor_names(text: str | Iterable[str]) -> str:
    """Tensor names, comma-separated or a list, as comma-separated text for the report."""
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    if not names:
        raise OptionError(f"--repair-tensors expects tensor names separated by commas, got '{text}'")
    return ",".join(names)


def check_repair(options: RunOptions) -> None:
    """--repair's options; asking for a repair needs torch (graphopt.torch.repair trains with it)."""
    if int(options.repair) < 0 or not float(options.repair_lr) > 0.0:
        raise OptionError(f"--repair must be >= 0 and --repair-lr > 0, got {options.repair} and {options.repair_lr}")
    if options.repair_tensors is not None:
        options.repair_tensors = parse_tensor_names(options.repair_tensors)
        if not options.repair:
            raise OptionError("--repair-tensors needs --repair STEPS")
    if options.repair:
        try:
            import torch  # noqa: F401  (only when a repair is asked for)
        except ImportError as exc:
            raise OptionError("--repair trains with torch, which is not installed: pip install 'graphopt[torch]'") \
                from exc


@dataclass
class RunOptions(CalibrationOptions):
    """What every run reads, whatever its methods: the "none" method's options."""

    target_macs: float | None = option(None, help="keep about this fraction of per-sample MACs")
    target_latency: float | None = option(None, metavar="F", help="keep about this fraction of the original's "
                                          "latency measured in onnxruntime at --bench-batch with --threads "
                                          "(per-layer latency tables, cached; instead of --target-macs)")
    batch_size: int = option(32)
    sparse_storage: bool = option(False, help="save weights as ONNX sparse initializers where that makes the "
                                              "file smaller")
    bench: bool = option(False, help="time the original and the result side by side in onnxruntime "
                                     "(interleaved rounds, --threads) at batch 1 and --bench-batch; the speedup "
                                     "goes into the report")
    bench_batch: int = option(8, metavar="N", help="the second batch size --bench times (default 8)")
    metric: Metric | None = option(None, metavar="MODULE:FUNCTION", parse=load_metric,
                                   help="your own fidelity metric, function(reference_outputs, candidate_outputs, "
                                        "inputs) -> dict of name -> number: reported with the fidelity, and "
                                        "--tolerance KEY=V reads its keys")
    ctc_blank: int = option(0, metavar="N", help="blank label of sequence outputs [N, T, C] for the greedy CTC "
                                                 "decoding whose agreement fidelity reports (default 0)")
    repair: int = option(0, metavar="STEPS", help="after pruning, fine-tune the weights for STEPS Adam steps to "
                                                  "match the original's outputs on --calib (distillation; a tenth held "
                                                  "out picks the weights kept; default 0: off); needs "
                                                  "graphopt[torch]")
    repair_lr: float = option(1e-3, metavar="LR", help="--repair's Adam learning rate (default 0.001)")
    repair_schedule: str = option("constant", choices=("constant", "cosine"),
                                  help="--repair's learning rate over the steps: constant (default) or cosine "
                                       "(from --repair-lr down to 0 at the last step)")
    repair_tensors: str | None = option(None, metavar="NAME[,NAME...]", parse=parse_tensor_names,
                                        help="--repair also matches these intermediate tensors (by name, where "
                                             "both models compute them with the same shape); 'auto': the "
                                             "outputs of the normalisation layers")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_repair(self)
        self.metric = as_metric(self.metric)
        if int(self.ctc_blank) < 0:
            raise OptionError(f"--ctc-blank must be >= 0, got {self.ctc_blank}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise OptionError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise OptionError(f"--target-latency must be in (0, 1], got {self.target_latency}")
        if self.target_latency is not None and self.target_macs is not None:
            raise OptionError("give one of --target-macs or --target-latency, not both")
        if int(self.bench_batch) < 1:
            raise OptionError(f"--bench-batch must be >= 1, got {self.bench_batch}")


@dataclass
class Rounding(Options):
    round_to: str | int = option("auto", metavar="auto|N", parse=parse_round_to,
                                 help="keep channel counts a multiple of N; auto (default): the block the "
                                      "execution provider computes in (16 on AVX-512 CPUs, 8 on AVX2 and CUDA; "
                                      "4 for groups under one block); 1: exact counts")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.round_to = parse_round_to(str(self.round_to))


@dataclass
class Seeded(Options):
    seed: int = option(0, help="seed for --method random")


@dataclass
class KeepVariance(Options):
    keep_variance: float | None = option(
        None, help="snp: keep this fraction of every group's unique variance (instead of --target-macs); "
                   "cob: of every subspace's rotated energy")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_variance is not None and not 0.0 < float(self.keep_variance) <= 1.0:
            raise OptionError(f"--keep-variance must be in (0, 1], got {self.keep_variance}")


SNP_MAX_FEATURES = 12288  # a Gram of this many features takes 1.1 GiB in float64


@dataclass
class Reconstruction(Options):
    """SNP's least-squares reconstruction, which CoB folds too."""

    reconstruct_target: str | None = option(
        None, choices=("original", "self"),
        help="snp, cob: what the reconstruction reproduces. original (the default with --calib, unless "
             "--sequential, --no-reconstruct or --no-cob-reconstruct): refit every consumer, in topological order, "
             "to the original model's pre-activation from the pruned model's input, correcting what pruning "
             "upstream changed (about twice the time); self (the default otherwise): each consumer's own "
             "activations")

    snp_max_features: int = option(SNP_MAX_FEATURES, cli=False,
                                   help="consumers reading more input features than this are pruned without "
                                        "reconstruction (a Gram of 12288 features takes 1.1 GiB)")


@dataclass
class StatisticsOptions(Options):
    """Methods that read activation statistics: measured on the calibration data, or read from a file."""

    stats: Path | str | StatsFile | None = option(None, parse=Path, help="statistics from `graphopt calibrate` "
                                                                         "(else measured on --calib)")


def parse_op_types(text: str) -> str:
    """A comma-separated list of ONNX op types ("Softmax,Add"), checked; kept as text for the report."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    bad = [name for name in names if not name.isidentifier()]
    if bad or not names:
        raise OptionError(f"--quant-exclude expects op types such as Softmax,Add, got '{text}'")
    return ",".join(names)


@dataclass
class QuantizeOptions(Options):
    """Static INT8 QDQ quantization (graphopt.calibration.quantize), calibrated on --calib."""

    quant_calibration: str = option("minmax", choices=CALIBRATIONS,
                                    help="quantize: how activation ranges are calibrated (default minmax)")
    quant_per_channel: bool = option(True, flag="--no-quant-per-channel",
                                     help="quantize: one weight scale per tensor instead of per output channel")
    quant_activations: str = option("uint8", choices=ACTIVATIONS,
                                    help="quantize: activation type; int8 weights always (default uint8: U8S8, "
                                         "the fast integer kernels on x86: about 3x faster than int8 activations "
                                         "measured on a ResNet-50)")
    quant_reduce_range: bool = option(False, help="quantize: 7-bit weights (for x86 CPUs without VNNI, where "
                                                  "int8 per-channel weights can saturate)")
    quant_exclude: str | None = option(None, metavar="OP[,OP...]", parse=parse_op_types,
                                       help="quantize: op types left in float, e.g. Softmax,Add")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_exclude is not None:
            self.quant_exclude = parse_op_types(self.quant_exclude)


@dataclass(frozen=True)
class Method:
    """A compression method: `passes` run in order after the normalising pre-passes."""

    name: str
    description: str
    needs_data: bool  # reads calibration data (or, where it reads statistics, a statistics file)
    passes: tuple[str, ...]
    options: type[Options] = Options


METHODS: dict[str, Method] = {}


def declared_options() -> dict[str, Option]:
    """Every option the registered methods declare, in the order they were first declared."""
    found: dict[str, Option] = {}
    for method in METHODS.values():
        for name, declared in options_of(method.options).items():
            found.setdefault(name, declared)
    return found


def _refuse_conflicts(method: Method) -> None:
    known = declared_options()
    flags = {declared.flag: name for name, declared in known.items() if declared.flag}
    for name, declared in options_of(method.options).items():
        if name in known and known[name] != declared:
            first = next(m.name for m in METHODS.values() if name in options_of(m.options))
            differ = (f"default {declared.default!r} vs {known[name].default!r}" if declared.default != known[name].default
                      else "its type, help or command-line form differs")
            raise ValueError(f"method '{method.name}' declares option '{name}' differently from method '{first}' "
                             f"({differ}): declare it once and share it")
        if declared.flag in flags and flags[declared.flag] != name:
            raise ValueError(f"method '{method.name}': option '{name}' takes flag {declared.flag} of option "
                             f"'{flags[declared.flag]}'")


def register_method(method: Method) -> Method:
    """Add a method to the registry; a known name, an unknown pass or a conflicting option is refused."""
    if method.name in METHODS:
        raise ValueError(f"a method named '{method.name}' is already registered")
    unknown = [name for name in method.passes if name not in REGISTRY]
    if unknown:
        raise ValueError(f"method '{method.name}' runs passes that are not registered: {', '.join(unknown)}")
    _refuse_conflicts(method)
    METHODS[method.name] = method
    return method


def resolve_options(pipeline: Iterable[str], given: Mapping[str, Any]) -> dict[str, Any]:
    """The validated value of every option the run reads (`RunOptions` and the options of the methods in
    `pipeline`), defaults filled in. A name no registered method declares is refused."""
    known = declared_options()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise OptionError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    resolved: dict[str, Any] = {}
    for method in [NONE, *(METHODS[name] for name in pipeline)]:
        names = options_of(method.options)
        values = method.options(**{name: value for name, value in given.items() if name in names})
        resolved.update({name: getattr(values, name) for name in names})
    return resolved


def json_value(value: Any) -> Any:
    """An option value as the report holds it: JSON scalars as they are, paths as strings, a statistics
    file by its source."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, StatsFile):  # statistics handed over in memory: where they came from
        return value.source
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


NONE = register_method(Method("none", "only the normalising pre-passes", needs_data=False, passes=(),
                              options=RunOptions))

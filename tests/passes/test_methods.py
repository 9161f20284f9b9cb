"""Method declarations: one registration per method, options declared once and shared, and the CLI flags,
the API keywords and the report built from them."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import methods as api_methods  # the front door's list
from graphopt.api import method_options
from graphopt.calibration.store import StatsFile
from graphopt.cli import build_parser, main
from graphopt.errors import OptionError
from graphopt.passes import METHODS, REGISTRY, Method, Options, Pass, option, register_method
from graphopt.passes.methods import (CalibrationOptions, KeepVariance, Reconstruction, Rounding, RunOptions, Seeded,
                                     StatisticsOptions, json_value, options_of, resolve_options)
from tests.conftest import init, tiny, weights

# what every run reads, defaults filled in (the "none" method's options)
RUN = {"target_macs": None, "target_latency": None, "batch_size": 32, "sparse_storage": False, "bench": False, "bench_batch": 8,
       "calib_memory": 2 * 1024**3, "calib_rows_per_channel": 1024, "device": "cpu", "threads": 0, "mask_input": None,
       "trim_padding": True, "workers": None,
       "ray_address": None, "metric": None,
       "ctc_blank": 0, "repair": 0, "repair_lr": 1e-3, "repair_schedule": "constant", "repair_tensors": None}
SHARED = (RunOptions, Rounding, Seeded, KeepVariance, Reconstruction, CalibrationOptions, StatisticsOptions)

# the optimize flags in the order --help has always listed them (new options may come in between)
HISTORICAL_FLAGS = [
    "-o", "--method", "--calib", "--target-macs", "--report", "--batch-size", "--round-to", "--norm", "--seed",
    "--keep-variance", "--criterion", "--sequential", "--cob-reconstruct", "--no-reconstruct", "--sparsity",
    "--omp-scope", "--keep-first-last", "--sparse-storage", "--rotation", "--zscore", "--stats", "--exprune-probe",
    "--exprune-fnr", "--exprune-rule", "--tolerance", "--exprune-layers", "--exprune-rows", "--exprune-maps",
    "--exprune-held-out", "--calib-memory", "--device", "--threads", "--mask-input", "--input-shape", "--json",
    "--quiet", "--verbose", "--debug"]


def _mlp() -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm; the first layer's unit 2 has zero outgoing weights (dead-units removes it)."""
    second = weights(3, 5, seed=2)
    second[:, 2] = 0.0
    return tiny("h = Gemm <transB = 1> (x, w1)\nr = Relu (h)\ny = Gemm <transB = 1> (r, w2)",
                inputs="float[N, 4] x", outputs="float[N, 3] y",
                inits=", ".join([init("w1", weights(5, 4, seed=1)), init("w2", second)]))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


@dataclass
class _Throwaway(Rounding):
    """A method option nobody has declared before, next to a shared one."""

    test_strength: float = option(0.5, metavar="S", help="test: how hard to try")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.test_strength <= 1.0:
            raise OptionError(f"--test-strength must be in [0, 1], got {self.test_strength}")


@pytest.fixture
def throwaway() -> Iterator[Method]:
    method = register_method(Method("test-throwaway", "dead units, with a test option", needs_data=False,
                                    passes=("dead-units",), options=_Throwaway))
    try:
        yield method
    finally:
        del METHODS[method.name]


def test_methods_come_from_the_registry() -> None:
    assert api_methods() == ["none", "cob", "dead-units", "exprune", "magnitude", "omp", "quantize", "random",
                             "snp"]
    assert {name: METHODS[name].needs_data for name in api_methods()} == {
        "none": False, "cob": True, "dead-units": False, "exprune": True, "magnitude": False, "omp": False,
        "quantize": True, "random": False, "snp": True}
    assert all(REGISTRY[p].kind == "method" for name in api_methods() for p in METHODS[name].passes)
    assert METHODS["none"].passes == () and METHODS["snp"].passes == ("snp",)


def test_registration_refuses_a_second_method_of_a_name() -> None:
    before = dict(METHODS)
    with pytest.raises(ValueError, match="a method named 'snp' is already registered"):
        register_method(Method("snp", "another snp", needs_data=True, passes=("snp",)))
    assert METHODS == before


@dataclass
class _RoundsToTwo(Options):
    round_to: int = option(2, help="keep channel counts a multiple of N")


@dataclass
class _RoundsWithOtherHelp(Options):
    round_to: int = option("auto", help="round channel counts")


@dataclass
class _StealsAFlag(Options):
    no_reconstruct: bool = option(False, help="the flag of snp's `reconstruct`")


@dataclass
class _Undeclared(Options):
    strength: float = 0.5


@pytest.mark.parametrize("options, passes, message", [
    (_RoundsToTwo, ("dead-units",), "declares option 'round_to' differently from method 'magnitude' \\(default 2 vs 'auto'\\)"),
    (_RoundsWithOtherHelp, ("dead-units",), "declares option 'round_to' differently .*help or command-line form"),
    (_StealsAFlag, ("dead-units",), "option 'no_reconstruct' takes flag --no-reconstruct of option 'reconstruct'"),
    (_Undeclared, ("dead-units",), "option 'strength' of _Undeclared is not declared with option"),
    (Options, ("no-such-pass",), "runs passes that are not registered: no-such-pass"),
])
def test_registration_refuses_conflicting_declarations(options: type[Options], passes: tuple[str, ...],
                                                       message: str) -> None:
    before = dict(METHODS)
    with pytest.raises(ValueError, match=message):
        register_method(Method("test-conflict", "conflicting", needs_data=False, passes=passes, options=options))
    assert METHODS == before


def test_an_option_several_methods_read_is_declared_once_in_a_shared_dataclass() -> None:
    readers: dict[str, list[str]] = {}
    for method in METHODS.values():
        for name in options_of(method.options):
            readers.setdefault(name, []).append(method.name)
    shared = {name for cls in SHARED for name in options_of(cls)}
    assert {name for name, methods in readers.items() if len(methods) > 1} <= shared
    assert sorted(readers["round_to"]) == ["cob", "magnitude", "random", "snp"]
    assert sorted(readers["stats"]) == ["cob", "snp"]


def test_every_declared_option_is_an_optimize_flag_with_its_settings() -> None:
    flags = _flags(_subparser(build_parser(), "optimize"))
    declared = method_options()
    api_only = {name for name, found in declared.items() if found.flag is None}
    assert api_only == {"snp_max_features", "l1pca_rows", "l1pca_iterations", "probe_samples"}
    assert not api_only & set(flags)
    for name, found in declared.items():
        if found.flag is None:
            continue
        action = flags[name]
        assert action.option_strings == [found.flag] and action.help == found.help, name
        if found.type is bool:
            assert isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            assert action.default is found.default, name
        else:
            assert action.default == found.default and action.metavar == found.metavar, name
            assert (tuple(action.choices) if action.choices else None) == found.choices, name
    assert flags["reconstruct"].option_strings == ["--no-reconstruct"] and flags["reconstruct"].default is True


def test_the_flags_keep_their_historical_order() -> None:
    strings = [s for a in _subparser(build_parser(), "optimize")._actions for s in a.option_strings
               if s.startswith("--") or s == "-o"]
    positions = [strings.index(flag) for flag in HISTORICAL_FLAGS]
    assert positions == sorted(positions)


def test_the_parsed_defaults_are_the_declared_defaults() -> None:
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--method", "none"])
    declared = {name: found for name, found in method_options().items() if found.flag is not None}
    assert {name: getattr(args, name) for name in declared} == {name: found.default for name, found in declared.items()}
    pipeline = [name for name in api_methods() if name not in ("none", "omp")]  # omp has no default --sparsity
    assert resolve_options(pipeline, {name: getattr(args, name) for name in declared}) == resolve_options(pipeline, {})


def test_calibrate_shares_the_calibration_flags() -> None:
    parser = build_parser()
    optimize, calibrate = (_flags(_subparser(parser, name)) for name in ("optimize", "calibrate"))
    for name in options_of(CalibrationOptions):
        mine, theirs = optimize[name], calibrate[name]
        assert (mine.option_strings, mine.default, mine.choices, mine.metavar, mine.help) == \
            (theirs.option_strings, theirs.default, theirs.choices, theirs.metavar, theirs.help)
    assert "stats" not in calibrate


def test_a_new_option_declared_once_reaches_the_parser_the_api_and_the_report(throwaway: Method, tmp_path: Path,
                                                                             capfd: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    flag = _flags(_subparser(parser, "optimize"))["test_strength"]
    assert flag.option_strings == ["--test-strength"] and flag.default == 0.5 and flag.metavar == "S"
    assert flag.help == "test: how hard to try" and flag.type is float
    assert "test-throwaway" in _subparser(parser, "optimize")._option_string_actions["--method"].metavar

    model_path, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save_model(_mlp(), str(model_path))
    code = main(["optimize", str(model_path), "-o", str(out), "--method", "test-throwaway", "--test-strength", "0.25",
                 "--round-to", "2", "--json", "--quiet"])
    report = json.loads(capfd.readouterr().out)
    assert code == 0
    assert report["options"] == {**RUN, "round_to": 2, "test_strength": 0.25}
    assert report["passes"][-1]["pass"] == "dead-units" and report["passes"][-1]["modified"]
    assert report["params_after"] == report["params_before"] - 4 - 3  # one hidden unit: its row of w1, column of w2

    with pytest.raises(OptionError, match="--test-strength must be in \\[0, 1\\], got 2.0"):
        graphopt.optimize(_mlp(), method="test-throwaway", test_strength=2.0)
    assert graphopt.optimize(_mlp(), method="none", test_strength=2.0).report["options"] == RUN  # not run: not read


def test_an_unknown_option_is_refused_naming_it_and_the_known_ones() -> None:
    with pytest.raises(OptionError, match="unknown option 'sparsty' \\(known: .*sparsity.*\\)") as info:
        graphopt.optimize(_mlp(), method="omp", sparsity=0.5, sparsty=0.5)
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(OptionError, match="unknown options 'a', 'b'"):
        resolve_options([], {"b": 1, "a": 2})


def test_the_report_carries_the_resolved_options(tmp_path: Path) -> None:
    result = graphopt.optimize(_mlp(), method="magnitude", target_macs=0.8, norm="l2", output=tmp_path / "out.onnx")
    assert result.report["options"] == {**RUN, "target_macs": 0.8, "round_to": "auto", "norm": "l2"}
    pipeline = graphopt.optimize(_mlp(), method="omp,dead-units", sparsity=0.5, keep_first_last=True).report
    assert pipeline["options"] == {**RUN, "sparsity": 0.5, "omp_scope": "global", "keep_first_last": True}
    resolved = resolve_options(["snp"], {"stats": Path("stats/run.npz"), "calib_memory": "1MB"})
    assert resolved["calib_memory"] == 1024**2
    options = {name: json_value(value) for name, value in resolved.items()}
    assert options["stats"] == str(Path("stats/run.npz")) and json.loads(json.dumps(options)) == options


def test_json_values() -> None:
    in_memory = StatsFile({}, {}, "model", "data", source="calibrated.npz")
    assert [json_value(v) for v in (None, True, 3, 0.5, "l1", Path("a/b"), np.float64(0.25), in_memory)] == \
        [None, True, 3, 0.5, "l1", str(Path("a/b")), 0.25, "calibrated.npz"]


@pytest.mark.parametrize("pipeline, given, message", [
    ([], {"target_macs": 0.0}, "--target-macs must be in \\(0, 1\\], got 0.0"),
    (["magnitude"], {"round_to": 0}, "--round-to must be >= 1, got 0"),
    (["magnitude"], {"norm": "l3"}, "--norm must be l1 or l2, got 'l3'"),
    (["snp"], {"keep_variance": 1.5}, "--keep-variance must be in \\(0, 1\\], got 1.5"),
    (["snp"], {"criterion": "loss"}, "--criterion must be variance or output"),
    (["cob"], {"rotation": "svd"}, "--rotation must be pca or l1pca"),
    ([], {"calib_memory": "lots"}, "--calib-memory expects a size"),
    ([], {"device": "tpu"}, "--device must be cpu or cuda"),
    (["omp"], {}, "--method omp needs --sparsity in \\[0, 1\\), got None"),
    (["omp"], {"sparsity": 0.5, "omp_scope": "tensor"}, "--omp-scope must be global or layer"),
    (["exprune"], {"tolerance": "top1=2"}, "--tolerance must be top1=A"),
    (["exprune"], {"exprune_layers": "gemm"}, "--exprune-layers must be one of auto, all, linear, conv"),
    (["exprune"], {"exprune_rows": 0}, "--exprune-rows must be at least 1, got 0"),
    (["exprune"], {"exprune_held_out": 1.0}, "--exprune-held-out must be in \\(0, 1\\)"),
])
def test_the_declarations_validate(pipeline: list[str], given: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        resolve_options(pipeline, given)


def test_only_the_methods_that_run_validate_their_options() -> None:
    resolved = resolve_options(["magnitude"], {"sparsity": 1.5, "tolerance": "nonsense"})
    assert "sparsity" not in resolved and "tolerance" not in resolved
    assert resolve_options(["exprune"], {"tolerance": "top1=0.990"})["tolerance"] == "top1=0.99"


def _reads(method: Method) -> set[str]:
    """Every option name the method's pass modules read with ctx.option("..."), other passes' classes aside;
    a module that asks for statistics also reads what the calibrator is built from."""
    found: set[str] = set()
    for pass_name in method.passes:
        cls = REGISTRY[pass_name]
        module = sys.modules[cls.__module__]
        others = {name for name, value in vars(module).items()
                  if isinstance(value, type) and issubclass(value, Pass) and value not in cls.__mro__}
        source = inspect.getsource(module)
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and node.name in others:
                continue
            found |= {call.args[0].value for call in ast.walk(node)
                      if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                      and call.func.attr == "option" and isinstance(call.func.value, ast.Name)
                      and call.func.value.id == "ctx" and call.args and isinstance(call.args[0], ast.Constant)}
        if "statistics(" in source:
            found |= {"stats", "batch_size", *options_of(CalibrationOptions)}
    return found


def test_every_option_a_pass_reads_is_declared_by_its_method() -> None:
    run = set(options_of(RunOptions))
    for name in api_methods():
        method = METHODS[name]
        undeclared = _reads(method) - run - set(options_of(method.options))
        assert not undeclared, f"method '{name}' reads undeclared options {sorted(undeclared)}"
    assert {"norm", "round_to", "target_macs"} <= _reads(METHODS["magnitude"]) and "seed" not in \
        _reads(METHODS["magnitude"])


@pytest.mark.parametrize("method", ["snp", "cob", "exprune", "magnitude,snp"])
def test_a_method_that_reads_data_is_refused_before_any_work_without_data(method: str, tmp_path) -> None:
    from graphopt.api import optimize
    from graphopt.errors import DataError

    first_hungry = next(name for name in method.split(",") if METHODS[name].needs_data)
    missing_model = tmp_path / "not_there.onnx"  # refused before the model is even opened
    with pytest.raises(DataError, match=f"--method {first_hungry} needs calibration data: give --calib"):
        optimize(missing_model, method=method, target_macs=0.5)


@pytest.mark.parametrize("pipeline", ["magnitude,snp", "random,magnitude"])
def test_a_mac_target_in_a_pipeline_is_a_fraction_of_the_model_given(pipeline: str) -> None:
    """The second pruning method spends only what the first left: magnitude,snp at 0.6 kept 0.36 of the MACs
    (each method cut to 0.6 of what it was handed) and its pass stats planned 0.6."""
    samples = Path(__file__).resolve().parents[2] / "samples"
    result = graphopt.optimize(samples / "digits_cnn.onnx", method=pipeline, target_macs=0.6, round_to=1,
                               calib=samples / "digits_calib.npz", progress=False)
    assert result.report["macs_ratio"] == pytest.approx(0.6, abs=0.02)
    assert result.report["target_reached"]


@pytest.mark.parametrize("flags,want", [([], True), (["--cob-reconstruct"], True), (["--no-cob-reconstruct"], False)])
def test_a_switch_on_by_default_keeps_its_earlier_spelling(flags: list[str], want: bool) -> None:
    """--cob-reconstruct became the default: the flag is still accepted, and --no-cob-reconstruct turns it off."""
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--method", "cob", *flags])
    assert args.cob_reconstruct is want

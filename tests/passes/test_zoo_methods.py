"""Every method on every kind of graph: each run ends in a valid model with the original interface that
reaches its target, or in a clean refusal that names the reason. Nothing else is acceptable.

`outcome` runs one method on one model file and says which of these it was:

- ``pruned-on-target``: the written model passes `onnx.checker` (full check, by path), has the original's
  input and output names, dtypes and declared dims, runs in onnxruntime (graph optimisations disabled)
  with finite outputs of the original's dtypes and shapes, and reaches the target: MACs as the report's
  `target_reached` counts it (at most 2% above `--target-macs`, relative; a smaller model is fine, and
  the detail says when it is more than 2% smaller), weight sparsity within 2 points of `--sparsity`
  (omp). Methods without a target (exprune, dead-units) are ``pruned`` (changed) or ``unchanged``
  (nothing to remove; the reasons the passes give are in the detail).
- ``refused-with-reason``: a `GraphoptError` with a message, or a valid model that stops short of the
  target while the method's passes say why (what they skipped or declined; a pass that reports the floor
  its prunable groups allow, `min_macs_ratio`, must put that floor above the target).
- ``FAIL:<kind>``: an internal error (``crash``), an empty refusal (``silent-refusal``), a model the
  checker rejects (``invalid``), onnxruntime cannot run (``ort``) or load while the run measures it
  (``load``: every model of the zoo loads, so a load error comes from what a pass wrote), a changed
  interface (``interface``),
  non-finite outputs (``nonfinite``), a pass whose MAC estimate disagrees with the count of the written
  model (``mac-model``), or a target missed without a reason (``missed-target``).

The CI slice: every architecture of the torch zoo (residual, bottleneck, depthwise, SE with hard-swish,
dense concat, inception, channel shuffle, UNet, C2f split, flatten into Gemm, attention, MLP, grouped ResNeXt,
post-norm attention, timm-style attention with its q/k/v split at once into [3, heads, head_dim], depthwise
ConvTranspose upsampling, bias-free per-token MatMuls, a Llama-style grouped-query decoder whose heads go query
by query, a CRNN whose feature columns a bidirectional LSTM and a GRU read, torch's own nn.TransformerEncoder whose
nn.MultiheadAttention folds the heads into the batch axis, a diffusion-style GroupNorm residual block whose
channels go in whole groups) runs every method, each pair from one exporter at one target, both rotating so
that each architecture meets both exporters and both targets and each method every exporter-target pair;
every method on the committed samples
at both targets; every method on an encoder written by onnxruntime's transformers optimizer; a few runs on
the onnx package's light model zoo. `bench/zoo.py` runs the full sweep (every architecture x method x target,
the light zoo whole, ImageNet-sized architectures) and prints the table the README holds.
"""

from __future__ import annotations

import glob
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.passes.methods import METHODS
from tests.conftest import init, quantize_dynamic, quantize_qdq, run_ort, tiny, weights
from tests.passes.channels.test_prune_magnitude import zoo

TOLERANCE = 0.02  # MACs: relative, above the target; sparsity: absolute, either side
TARGETS = (0.7, 0.5)
CALIBRATION_SAMPLES = 16
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    """One method configuration: `target` says what the run's target sets (MACs, sparsity or nothing)."""

    id: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    target: str = "macs"  # "macs" | "sparsity" | "none"

    def keywords(self, target: float | None) -> dict[str, Any]:
        if self.target == "macs":
            return {"target_macs": target, **self.options}
        if self.target == "sparsity":  # the same share of the model: 0.7 of the MACs kept -> 0.3 sparsity
            return {"sparsity": round(1.0 - float(target), 6), **self.options}  # type: ignore[arg-type]
        return dict(self.options)


def output_gap(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
               inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """A user's metric for any model: the largest absolute difference of the first float output."""
    name = next(n for n, v in reference.items() if np.issubdtype(np.asarray(v).dtype, np.floating))
    return {"gap": float(np.max(np.abs(np.asarray(candidate[name], np.float64) - reference[name])))}


RUNS = {run.id: run for run in (
    Run("magnitude", "magnitude"),
    Run("random", "random"),
    Run("snp", "snp"),  # the defaults with data: output ordering, error-correcting reconstruction
    Run("snp-self", "snp", {"criterion": "variance", "reconstruct_target": "self"}),  # the paper's one-shot SNP
    Run("snp-no-reconstruct", "snp", {"reconstruct": False}),
    Run("snp-output", "snp", {"criterion": "output", "reconstruct_target": "self"}),
    Run("snp-sequential", "snp", {"sequential": True}),
    Run("snp-original", "snp", {"criterion": "variance", "reconstruct_target": "original"}),
    Run("snp-sensitivity", "snp", {"budget_by": "sensitivity"}),
    Run("snp-sensitivity-metric", "snp", {"budget_by": "sensitivity", "metric": output_gap}),  # probes weigh it
    Run("snp-repair", "snp", {"repair": 20}),
    Run("snp-qk", "snp", {"qk_dims": True}),
    # the defaults with Grams and paired moments from sampled positions, over several batches (both halves)
    Run("snp-sampled", "snp", {"calib_rows_per_channel": 16, "batch_size": 4}),
    Run("cob", "cob"),  # readers refitted to the original model
    Run("cob-self", "cob", {"reconstruct_target": "self"}),  # each reader of a cut coordinate fitted on its own
    Run("cob-l1pca", "cob", {"rotation": "l1pca"}),
    Run("cob,snp", "cob,snp"),
    Run("cob,snp-sequential", "cob,snp", {"sequential": True}),  # groups re-found by their piece of a producer
    Run("magnitude,snp", "magnitude,snp"),  # the second method spends what the first left of the target
    Run("omp", "omp", target="sparsity"),
    Run("dead-units", "dead-units", target="none"),
    # the default (each linear and Conv+ReLU layer whose op measured faster alone and in the model), and after
    # SNP every layer
    Run("exprune", "exprune", target="none"),
    Run("snp,exprune", "snp,exprune", {"exprune_layers": "all"}),
    Run("quantize", "quantize", target="none"),
    Run("snp,quantize", "snp,quantize"),
)}


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    macs_ratio: float | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.kind.startswith("FAIL")


def calibration(model: onnx.ModelProto, samples: int = CALIBRATION_SAMPLES, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded feeds of `samples` samples: Gaussian floats, small non-negative integers (ids), random bools.
    Axis 0 holds the samples (`samples` times a fixed batch); other symbolic dims are `samples` too."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [samples * (dim.dim_value or 1) if axis == 0 else dim.dim_value or samples
                 for axis, dim in enumerate(tensor.shape.dim)]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        feeds[value.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else
                             rng.random(shape) < 0.5 if dtype.kind == "b" else rng.integers(0, 3, shape).astype(dtype))
    return feeds


def _declared(values: Any) -> list[tuple[str, int, tuple[int | str, ...]]]:
    return [(v.name, v.type.tensor_type.elem_type,
             tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim))
            for v in values]


def _interface_change(original: onnx.ModelProto, written: onnx.ModelProto) -> str | None:
    initializers = {t.name for t in original.graph.initializer}
    inputs = [v for v in original.graph.input if v.name not in initializers]
    kept = {t.name for t in written.graph.initializer}
    for kind, before, after in (("inputs", _declared(inputs),
                                 _declared(v for v in written.graph.input if v.name not in kept)),
                                ("outputs", _declared(original.graph.output), _declared(written.graph.output))):
        if before != after:
            return f"{kind} {before} became {after}"
    return None


def _run_difference(original: onnx.ModelProto, written: onnx.ModelProto,
                    feeds: dict[str, np.ndarray] | None = None) -> tuple[str, str] | None:
    """(FAIL kind, detail) when `written` does not run like `original` on the same feeds, else None."""
    fixed = any(v.type.tensor_type.shape.dim[:1] and v.type.tensor_type.shape.dim[0].dim_value
                for v in original.graph.input)
    feeds = calibration(original, samples=1 if fixed else 2, seed=2) if feeds is None else feeds
    expected = run_ort(original, feeds)
    try:
        actual = run_ort(written, feeds)
    except Exception as error:  # onnxruntime refusing the written model is the finding
        return "FAIL:ort", f"{type(error).__name__}: {str(error)[:300]}"
    if list(actual) != list(expected):
        return "FAIL:interface", f"outputs {list(expected)} became {list(actual)}"
    for name, value in expected.items():
        if (actual[name].dtype, actual[name].shape) != (value.dtype, value.shape):
            return "FAIL:interface", f"{name}: {value.dtype}{value.shape} became {actual[name].dtype}{actual[name].shape}"
        if actual[name].dtype.kind == "f" and np.isfinite(value).all() and not np.isfinite(actual[name]).all():
            return "FAIL:nonfinite", name
    return None


def _reached(run: Run, target: float, report: dict[str, Any], records: list[dict[str, Any]]) -> tuple[bool, float, float]:
    """(reached, what was reached, what was asked). MACs: the report's `target_reached` (at most 2% above
    the target, relative; a smaller model is fine); sparsity (before dead units are removed): within 2 points."""
    if run.target == "macs":
        reached = report.get("target_reached")
        if reached is None:  # a report without the key: the same rule
            reached = report["macs_ratio"] <= target * (1 + TOLERANCE)
        return bool(reached), report["macs_ratio"], target
    sparsity = float(records[0]["stats"].get("sparsity_all_layers", 0.0))
    return abs(sparsity - (1.0 - target)) <= TOLERANCE, sparsity, 1.0 - target


def _target_outcome(run: Run, target: float | None, report: dict[str, Any]) -> Outcome:
    methods = {name for method in run.method.split(",") for name in METHODS[method].passes}
    records = [record for record in report["passes"] if record["pass"] in methods]
    reasons = [reason for record in records for reason in record["skipped"]]
    if run.target == "none":
        changed = any(record["modified"] for record in records)
        return Outcome("pruned" if changed else "unchanged", "; ".join(reasons[:3]))
    estimates = [record["stats"]["estimated_macs_ratio"] for record in records if "estimated_macs_ratio" in record["stats"]]
    if estimates and abs(estimates[-1] - report["macs_ratio"]) > 1e-6:  # the pass planned on wrong MACs
        return Outcome("FAIL:mac-model", f"planned {estimates[-1]:.6f}, counted {report['macs_ratio']:.6f}")
    reached, value, wanted = _reached(run, float(target), report, records)  # type: ignore[arg-type]
    if reached:
        below = f"below the target ({value:.3f}); " if value < wanted * (1 - TOLERANCE) else ""
        return Outcome("pruned-on-target", below + "; ".join(reasons[:3]))
    floors = [record["stats"]["min_macs_ratio"] for record in records if "min_macs_ratio" in record["stats"]]
    if reasons and all(floor > wanted * (1 + TOLERANCE) for floor in floors):
        return Outcome("refused-with-reason", f"reached {value:.3f}: " + "; ".join(reasons[:3]))
    return Outcome("FAIL:missed-target", f"reached {value:.3f} for {wanted:.3f}, floors {floors}, "
                                         f"reasons {reasons[:3]}")


def outcome(source: Path | str, run: Run, target: float | None, folder: Path,
            samples: int = CALIBRATION_SAMPLES, calib: dict[str, np.ndarray] | None = None,
            check_feeds: dict[str, np.ndarray] | None = None) -> Outcome:
    """Run `run` on the model file `source` at `target` (a MAC fraction; None for untargeted runs) with
    `samples` calibration samples (or `calib`, for a model whose inputs need real values), write the result
    into `folder` and classify what came out (run on `check_feeds` where given)."""
    original = onnx.load(str(source))
    written = folder / f"{Path(source).stem}-{run.id}-{target}.onnx"
    start = time.perf_counter()
    try:
        result = graphopt.optimize(source, method=run.method, output=written,
                                   calib=calibration(original, samples) if calib is None else calib,
                                   **run.keywords(target))
    except ModelLoadError as error:  # every zoo model loads: a load error comes from what a pass wrote
        return Outcome("FAIL:load", f"{type(error).__name__}: {str(error)[:300]}", seconds=time.perf_counter() - start)
    except GraphoptError as refusal:
        kind = "refused-with-reason" if str(refusal).strip() else "FAIL:silent-refusal"
        return Outcome(kind, f"{type(refusal).__name__}: {refusal}", seconds=time.perf_counter() - start)
    except Exception as error:  # an internal error: the finding this sweep exists for
        where = traceback.extract_tb(error.__traceback__)[-1]
        cause = error.__cause__ or error
        return Outcome("FAIL:crash", f"{type(cause).__name__}: {str(cause)[:300]} ({Path(where.filename).name}:"
                                     f"{where.lineno})", seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    found = _check_written(original, written, check_feeds)
    if found is None:
        found = _target_outcome(run, target, result.report)
    found.macs_ratio, found.seconds = result.report["macs_ratio"], seconds
    return found


def _check_written(original: onnx.ModelProto, written: Path,
                   feeds: dict[str, np.ndarray] | None = None) -> Outcome | None:
    try:
        onnx.checker.check_model(str(written), full_check=True)
    except Exception as error:  # the checker's own exception types vary
        return Outcome("FAIL:invalid", f"{type(error).__name__}: {str(error)[:300]}")
    model = onnx.load(str(written))
    change = _interface_change(original, model)
    if change is not None:
        return Outcome("FAIL:interface", change)
    difference = _run_difference(original, model, feeds)
    return None if difference is None else Outcome(*difference)


# -- the classifier says FAIL when it should ---------------------------------------------------------

def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_the_classifier_names_each_failure(tmp_path: Path) -> None:
    original = tiny("y = Relu(x)", outputs="float[N, 3, 8, 8] y")
    assert _check_written(original, _saved(original, tmp_path / "same.onnx")) is None
    renamed = tiny("z = Relu(x)", outputs="float[N, 3, 8, 8] z")
    fixed = tiny("y = Relu(x)", outputs="float[2, 3, 8, 8] y")
    nan = tiny("y = Log(x)", outputs="float[N, 3, 8, 8] y")
    broken = tiny("y = Relu(x)", outputs="float[N, 3, 8, 8] y")
    broken.graph.node[0].input[0] = "missing"
    found = {label: _check_written(original, _saved(model, tmp_path / f"{label}.onnx"))
             for label, model in (("renamed", renamed), ("fixed", fixed), ("nan", nan), ("broken", broken))}
    assert {label: o.kind for label, o in found.items() if o is not None} == {
        "renamed": "FAIL:interface", "fixed": "FAIL:interface", "nan": "FAIL:nonfinite", "broken": "FAIL:invalid"}
    assert found["fixed"].detail.startswith("outputs") and "2, 3, 8, 8" in found["fixed"].detail


def test_a_target_out_of_reach_is_a_refusal_with_its_reason(tmp_path: Path) -> None:
    # one convolution writing the graph output: no channel can go, and the pass says why
    model = tiny("y = Conv(x, w)", inits=init("w", weights(4, 3, 1, 1)), outputs="float[N, 4, 8, 8] y")
    found = outcome(_saved(model, tmp_path / "single.onnx"), RUNS["magnitude"], 0.5, tmp_path)
    assert found.kind == "refused-with-reason" and "graph output" in found.detail
    missing = outcome(_saved(model, tmp_path / "single.onnx"), Run("omp-without-sparsity", "omp", target="none"),
                      None, tmp_path)
    assert missing.kind == "refused-with-reason" and "--sparsity" in missing.detail


# -- the CI slice ----------------------------------------------------------------------------------

EXPORTERS = ("legacy", "dynamo")
NAMES = list(zoo.ZOO) if zoo is not None else []
CHANNELS = ("magnitude", "random", "snp", "snp-self", "snp-no-reconstruct", "snp-output", "snp-sequential",
            "snp-original", "snp-sensitivity", "snp-sensitivity-metric", "snp-repair", "snp-qk", "snp-sampled",
            "cob,snp", "cob,snp-sequential", "magnitude,snp", "snp,exprune", "snp,quantize")
# what each run may end in on graphs it applies to; FAIL is never acceptable
EXPECTED = {**{run: {"pruned-on-target"} for run in CHANNELS}, "omp": {"pruned-on-target"},
            "cob": {"pruned-on-target", "refused-with-reason"}, "cob-self": {"pruned-on-target", "refused-with-reason"},
            "cob-l1pca": {"pruned-on-target", "refused-with-reason"}, "dead-units": {"pruned", "unchanged"},
            "exprune": {"pruned", "unchanged"}, "quantize": {"pruned"}}
ACCEPTABLE = {"pruned-on-target", "refused-with-reason", "pruned", "unchanged"}


def _rotation() -> list[Any]:
    """Every architecture runs every method once, from one exporter at one target. The exporter alternates with
    the architecture and the method, the target with the method and every second architecture, so every
    architecture meets both exporters and both targets, and every method meets each (exporter, target) pair.
    `bench/zoo.py --sets tiny` runs the whole product."""
    cases = []
    for a, name in enumerate(NAMES):
        for r, run in enumerate(RUNS.values()):
            exporter = EXPORTERS[(a + r) % 2]
            target = None if run.target == "none" else TARGETS[(a // 2 + r) % 2]
            cases.append(pytest.param(name, exporter, run.id, target, id=f"{name}-{exporter}-{run.id}-{target}"))
    return cases


def _assert(found: Outcome, expected: set[str]) -> None:
    assert found.kind in expected, f"{found.kind}: {found.detail}"


@pytest.mark.parametrize("name,exporter,run_id,target", _rotation())
def test_every_method_on_every_zoo_architecture(name: str, exporter: str, run_id: str, target: float | None,
                                                zoo_path, tmp_path: Path) -> None:
    _assert(outcome(zoo_path(name, exporter, 17, False), RUNS[run_id], target, tmp_path), EXPECTED[run_id])


QUANTIZED_RUNS = ("magnitude", "snp", "random", "snp-self", "cob,snp", "omp", "dead-units")


def _quantized_slice() -> list[Any]:
    """Every architecture quantized by onnxruntime both ways, statically (QDQ) and dynamically (integer ops), each
    from another exporter; the methods that prune through quantized layers take turns, so every architecture
    meets both exporters and both forms, and every method each (form, exporter) pair and both targets.
    `bench/zoo.py --sets qdq dynamic` runs every method on each."""
    cases = []
    for a, name in enumerate(NAMES):
        for f, form in enumerate(("qdq", "dynamic")):
            run_id, exporter = QUANTIZED_RUNS[(2 * a + f) % len(QUANTIZED_RUNS)], EXPORTERS[(a + f) % 2]
            run = RUNS[run_id]
            target = None if run.target == "none" else TARGETS[(a // 2 + f) % 2]
            cases.append(pytest.param(name, exporter, form, run_id, target,
                                      id=f"{name}-{exporter}-{form}-{run_id}-{target}"))
    return cases


@pytest.mark.parametrize("name,exporter,form,run_id,target", _quantized_slice())
def test_pruning_methods_on_every_zoo_architecture_quantized(name: str, exporter: str, form: str, run_id: str,
                                                             target: float | None, zoo_path, tmp_path: Path) -> None:
    source = zoo_path(name, exporter, 17, False)
    path = tmp_path / f"{name}_{form}.onnx"
    if form == "qdq":
        feeds = calibration(onnx.load(str(source)), 8, seed=5)
        quantize_qdq(source, path, [{key: value[i:i + 1] for key, value in feeds.items()} for i in range(8)])
    else:
        quantize_dynamic(source, path)
    found = outcome(path, RUNS[run_id], target, tmp_path)
    _assert(found, EXPECTED[run_id])
    assert "left alone" not in found.detail


SAMPLES = sorted(glob.glob(str(REPO / "samples" / "*.onnx")))


@pytest.mark.parametrize("run_id", list(RUNS))
@pytest.mark.parametrize("path", SAMPLES, ids=[Path(p).stem for p in SAMPLES])
def test_every_method_on_the_shipped_samples(path: str, run_id: str, tmp_path: Path) -> None:
    run = RUNS[run_id]
    for target in TARGETS if run.target != "none" else (None,):
        _assert(outcome(path, run, target, tmp_path), EXPECTED[run_id])


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# the light zoo's weights are constant fills; the small topologies keep this under a few seconds a run
LIGHT_SLICE = [("light_squeezenet.onnx", "snp"), ("light_squeezenet.onnx", "omp"),
               ("light_shufflenet.onnx", "snp-output"), ("light_inception_v1.onnx", "cob"),
               ("light_squeezenet.onnx", "snp,exprune")]  # opset 9: exprune raises it to 15


@pytest.mark.parametrize("file,run_id", LIGHT_SLICE, ids=[f"{f.removesuffix('.onnx')}-{r}" for f, r in LIGHT_SLICE])
def test_methods_on_the_light_model_zoo(file: str, run_id: str, tmp_path: Path) -> None:
    if not (LIGHT / file).exists():
        pytest.skip(f"onnx {onnx.__version__} does not ship {file}")
    _assert(outcome(LIGHT / file, RUNS[run_id], 0.5, tmp_path), ACCEPTABLE)
    if run_id == "snp,exprune":  # opset 9: ExPrune raised it to 15 to write its ops
        written = onnx.load(str(tmp_path / f"{Path(file).stem}-{run_id}-0.5.onnx"))
        assert any(node.op_type == "ExPruneConvRelu" for node in written.graph.node)
        assert [o.version for o in written.opset_import if o.domain in ("", "ai.onnx")] == [15]


@pytest.mark.parametrize("run_id", list(RUNS))
def test_every_method_on_an_onnxruntime_fused_encoder(run_id: str, tmp_path: Path) -> None:
    """A post-norm encoder run through onnxruntime's transformers optimizer (com.microsoft Attention with a packed
    q/k/v weight, SkipLayerNormalization, BiasGelu), the graph a user gets from that optimizer, at 0.7 of the
    MACs (its fused norms keep the stream from every method but CoB, and FFN units and heads alone stop near
    0.56). `--repair` refuses it with the reason: torch cannot run onnxruntime's contrib ops."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    from tests.passes.heads.test_heads import DIM, HEADS, _build, _export

    _export(_build(), "legacy", tmp_path / "plain.onnx")
    path = tmp_path / "fused.onnx"  # written as the optimizer writes it (its save adds the com.microsoft opset)
    optimizer.optimize_model(str(tmp_path / "plain.onnx"), model_type="bert", num_heads=HEADS, hidden_size=DIM,
                             opt_level=0).save_model_to_file(str(path))
    run = RUNS[run_id]
    expected = {"refused-with-reason"} if run_id == "snp-repair" else EXPECTED[run_id]
    _assert(outcome(path, run, None if run.target == "none" else TARGETS[0], tmp_path), expected)


@pytest.mark.parametrize("run_id", list(RUNS))
@pytest.mark.parametrize("variant", ["separate", "packed", "cache"])
def test_every_method_on_onnxruntime_grouped_query_attention(variant: str, run_id: str, tmp_path: Path) -> None:
    """A pre-LN decoder written with onnxruntime's GroupQueryAttention (separate or packed q/k/v, or with a
    key/value cache as inputs and outputs), at 0.7 of the MACs, on token data whose masks count tokens from the
    start (the op reads their counts). `--repair` refuses it with the reason: torch cannot run the op."""
    from tests.passes.heads.test_grouped_attention import _cache_feeds, _data, _model, _weights

    model = _model(_weights(0), packed=variant == "packed", cache=variant == "cache")
    path = _saved(model, tmp_path / f"gqa-{variant}.onnx")
    feeds = (_cache_feeds if variant == "cache" else dict)(_data(CALIBRATION_SAMPLES * 2, 12, seed=1))
    check = (_cache_feeds if variant == "cache" else dict)(_data(2, 9, seed=2))
    run = RUNS[run_id]
    expected = {"refused-with-reason"} if run_id == "snp-repair" else EXPECTED[run_id]
    _assert(outcome(path, run, None if run.target == "none" else TARGETS[0], tmp_path, calib=feeds,
                    check_feeds=check), expected)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_the_latency_probe_cuts_every_zoo_architecture(name: str, exporter: str, zoo_path) -> None:
    """--target-latency's probe (graphopt.passes.channels.latency._cut_copy) on every architecture: a copy of
    the analysed graph, its groups found again by key and each prunable one cut to half its channels, is a
    valid model with the original outputs' shapes that onnxruntime runs, at fewer MACs."""
    from graphopt.calibration.shapes import count_cost
    from graphopt.evaluate import random_feed
    from graphopt.ir import graph as ir
    from graphopt.ir.shapes import resolve_input_shapes
    from graphopt.passes import PassContext, PassManager, normalising_passes
    from graphopt.passes.channels.latency import _cut_copy
    from graphopt.passes.channels.magnitude import analyse

    model = onnx.load(str(zoo_path(name, exporter, 17, False)))
    shapes = resolve_input_shapes(model)
    graph = ir.import_graph(model)
    ctx = PassContext(template=model, input_shapes=shapes, progress=False)
    PassManager(normalising_passes()).run(graph, ctx)
    analysis, _ = analyse(graph, ctx)
    counts = {group.root: group.size // 2 for group in analysis.groups() if group.prunable and group.size >= 2}
    assert counts, "no prunable group"
    source = ir.export_model(graph, ctx.template, infer=False)
    cut = _cut_copy(source, ctx, analysis, counts)
    onnx.checker.check_model(cut, full_check=True)
    feed = random_feed(source, shapes, batch=2)
    before, after = run_ort(source, feed), run_ort(cut, feed)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert count_cost(cut, shapes).macs < count_cost(source, shapes).macs

"""Shared test helpers: tiny models from ONNX text, reference runs in onnxruntime, pass runners.

Reference runs disable every onnxruntime graph optimisation, so a rewritten model is compared with
the original on exactly the arithmetic each graph states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from graphopt.ir import graph as ir
from graphopt.passes import PassContext, PassManager, PassRecord, get_pass

RTOL = 1e-4
ATOL = 1e-5


def parse(text: str, *, check: bool = True) -> onnx.ModelProto:
    """A model from ONNX text; checked by the ONNX checker unless `check` is False."""
    model = onnx.parser.parse_model(text)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def tiny(body: str, *, inputs: str = "float[N, 3, 8, 8] x", outputs: str = "float[N, 4, 8, 8] y",
         inits: str = "", opset: int = 17, ir_version: int = 8, functions: str = "") -> onnx.ModelProto:
    """A one-graph model: `body` holds the node lines, `inits` the `<...>` initializer list."""
    header = f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>'
    init_block = f"<{inits}>" if inits else ""
    return parse(f"{header}\ng ({inputs}) => ({outputs}) {init_block} {{\n{body}\n}}\n{functions}")


def init(name: str, values: np.ndarray | list[float], dtype: str = "float") -> str:
    """ONNX text declaring initializer `name` with `values` (for the `inits` of `tiny`)."""
    array = np.asarray(values, dtype=np.float64 if dtype in ("float", "double") else np.int64)
    dims = ",".join(str(d) for d in array.shape)
    return f"{dtype}[{dims}] {name} = {{{', '.join(repr(v.item()) for v in array.reshape(-1))}}}"


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal float32 values (exactly representable in ONNX text)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def bn_params(prefix: str, channels: int, seed: int = 1) -> str:
    """Initializers `{prefix}_scale/_bias/_mean/_var` of a non-trivial BatchNormalization."""
    rng = np.random.default_rng(seed)
    values = {"scale": rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels),
              "bias": rng.uniform(-0.5, 0.5, channels), "mean": rng.uniform(-0.5, 0.5, channels),
              "var": rng.uniform(0.5, 2.0, channels)}
    return ", ".join(init(f"{prefix}_{key}", value.astype(np.float32)) for key, value in values.items())


def bn_inputs(prefix: str) -> str:
    return ", ".join(f"{prefix}_{key}" for key in ("scale", "bias", "mean", "var"))


def with_raw_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers stored as raw_data, as exporters write them (onnx moves only raw_data to external files)."""
    for tensor in model.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
    return model


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                  dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded standard-normal feeds for every real input; symbolic axis 0 -> `batch`, others from `dims`."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dims and dim.dim_param in dims:
                shape.append(dims[dim.dim_param])
            elif axis == 0:
                shape.append(batch)
            else:
                raise AssertionError(f"give dims for {value.name} axis {axis} ({dim.dim_param})")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.dtype(dtype).kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif np.dtype(dtype).kind == "b":
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 3, size=shape).astype(dtype)
    return feeds


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of `model` on `feeds`, by name, with graph optimisations disabled."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    accepted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in accepted})))


def assert_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      rtol: float = RTOL, atol: float = ATOL) -> None:
    """Same output names (in order), dtypes and shapes, values within rtol/atol."""
    assert [o.name for o in candidate.graph.output] == [o.name for o in reference.graph.output]
    expected, actual = run_ort(reference, feeds), run_ort(candidate, feeds)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if want.dtype.kind in "fc":
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def run_passes(model: onnx.ModelProto, *names: str, **ctx_fields: object) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run the named passes through the manager; return the exported model (ONNX-checked) and records."""
    graph = ir.import_graph(model)
    ctx = PassContext(template=model, progress=False, **ctx_fields)  # type: ignore[arg-type]
    records = PassManager([get_pass(name) for name in names]).run(graph, ctx)
    result = ir.export_model(graph, model)
    onnx.checker.check_model(result, full_check=True)
    return result, records


def run_pass(model: onnx.ModelProto, name: str, **ctx_fields: object):
    """One pass: (model, PassResult)."""
    result, records = run_passes(model, name, **ctx_fields)
    return result, records[0].result


def quantize_qdq(source: Path, path: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """`source` quantized statically by onnxruntime in QDQ form, as users ship it (int8 weights per output
    channel, uint8 activations), calibrated on `batches`; written to `path`."""
    from onnxruntime import quantization

    feeds = iter(batches)
    reader = type("Reader", (quantization.CalibrationDataReader,), {"get_next": lambda self: next(feeds, None)})()
    quantization.quantize_static(str(source), str(path), reader, quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True)
    return path


def quantize_dynamic(source: Path, path: Path) -> Path:
    """`source` quantized dynamically by onnxruntime (DynamicQuantizeLinear, ConvInteger and MatMulInteger)."""
    from onnxruntime import quantization

    quantization.quantize_dynamic(str(source), str(path))
    return path


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


# --- torch-exported models (optional: only where torch and graphopt.torch exist) -----------------

TorchExport = Callable[[str, str], onnx.ModelProto]


@pytest.fixture(scope="session")
def torch_export(tmp_path_factory: pytest.TempPathFactory) -> TorchExport:
    """`torch_export(name, exporter)` exports a small test module once per session (with BN unfused).

    "legacy" and "dynamo" go through graphopt.torch.export; "legacy_raw" (no constant folding,
    initializers listed as inputs) and "dynamo_raw" (no onnxscript optimisation) call torch directly,
    so Constant nodes, Identity and shape arithmetic are left for the pre-passes.
    """
    torch = pytest.importorskip("torch")
    from tests.torch_models import BUILDERS

    cache: dict[tuple[str, str], onnx.ModelProto] = {}
    folder = tmp_path_factory.mktemp("torch_export")

    def get(name: str, exporter: str) -> onnx.ModelProto:
        key = (name, exporter)
        if key in cache:
            return cache[key]
        module, example = BUILDERS[name]()
        path = folder / f"{name}_{exporter}.onnx"
        names = {"input_names": ["input"], "output_names": ["output"]}
        if exporter == "legacy_raw":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=13, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE, keep_initializers_as_inputs=True,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **names)
        elif exporter == "dynamo_raw":
            program = torch.onnx.export(module, (example,), dynamo=True, optimize=False, verbose=False,
                                        dynamic_shapes=({0: "batch"},), **names)
            onnx.save_model(program.model_proto, str(path))
        else:
            export = pytest.importorskip("graphopt.torch.export")
            export.export_onnx(module, example, path, exporter=exporter, opset=17, fold_bn=False)
        cache[key] = onnx.load(str(path))
        return cache[key]

    return get


ZooPath = Callable[..., Path]  # (name, exporter, opset, fold_bn, strict=False)
# the architectures the tests also export at opsets 13 and 20 (the export tests, the magnitude zoo test)
OPSET_SAMPLE = ("resnet_basic", "mobilenetv2", "shufflenet", "unet", "transformer")


@pytest.fixture(scope="session")
def zoo_path(tmp_path_factory: pytest.TempPathFactory) -> ZooPath:
    """`zoo_path(name, exporter, opset, fold_bn)`: each model of graphopt.torch.zoo exported once per session,
    shared by every test module (the pruning, zoo-methods, head-latency and interpreter tests read the same
    files); an opset the exporter cannot write skips the test with the exporter's reason (fails it with
    `strict=True`)."""
    pytest.importorskip("torch")
    from graphopt.torch import export, zoo

    folder = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple[str, str, int, bool], object] = {}

    def get(name: str, exporter: str, opset: int, fold_bn: bool, strict: bool = False) -> Path:
        key = (name, exporter, opset, fold_bn)
        if key not in cache:
            model, example = zoo.ZOO[name]()
            path = folder / f"{name}_{exporter}_{opset}_{int(fold_bn)}.onnx"
            try:
                cache[key] = export.export_onnx(model, example, path, exporter=exporter, opset=opset, fold_bn=fold_bn)
            except ValueError as error:  # the exporter cannot write this opset (e.g. LayerNormalization < 17)
                cache[key] = str(error)
        found = cache[key]
        if isinstance(found, str) and strict:  # a test of the export itself: its failure is the finding
            pytest.fail(f"{exporter} exporter, opset {opset}: {found}")
        if isinstance(found, str):
            pytest.skip(f"{exporter} exporter, opset {opset}: {found}")
        return found

    return get


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs, started once per test session (starting one takes seconds) and
    shut down at its end; graphopt's --workers uses a Ray runtime the process already started as it is."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'graphopt[ray]')")
    import logging

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()

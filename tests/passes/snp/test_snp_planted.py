"""SNP removes planted redundancy exactly in every structure the channel analysis couples.

Each small torch module (exported by both torch exporters) plants, in the activations its consumers
read, zero units, constant units (a zero weight row whose bias goes through the activation, or
act(0) != 0 itself, as with Sigmoid), copies (scaled ones through positively homogeneous activations
and on linear paths) and, on linear paths, combinations of two other units (tests/planting.py). The
structures: residual streams joined by Adds (a linear one and a ResNet-style one with ReLUs), a
Concat of branches (a DenseNet-style one read by two consumers), a depthwise convolution,
squeeze-excitation (GlobalAveragePool -> 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid -> Mul) and
multi-head attention (Q/K/V MatMuls with Reshape/Transpose into heads, an FFN with GELU).

With `keep_variance=1` SNP must remove exactly one unit of every planted relation and nothing else,
and with `target_macs` set to the MACs of that model it must make the same cut, under the variance
and the output criterion and sequentially. Every pruned model agrees with the original in
onnxruntime (graph optimisations disabled) to 1e-4 on inputs other than the calibration inputs: the
reconstruction makes copies and combinations exact and the bias compensation constants. A constant
unit read by a zero-padded conv is not redundant (it is 0 in the padding) and must stay. What SNP
legitimately leaves alone (single channels of a grouped convolution, whose unit is one channel of every
group; query/key dimensions read only bilinearly) keeps its planted units, with the reason in the report
where there is one. CoB removes
planted zero-variance directions exactly where a rotatable chain exists (value heads, a conv read
through global pooling by a Gemm) and names the op that ends each chain elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import pytest

import graphopt
from tests.conftest import run_ort
from tests.planting import (Combination, Constant, Copy, Relation, Zero, assert_removes_one_unit_per_relation,
                            entry_of, output_channels, plant, producer_name)

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graphopt.torch.export import export_onnx  # noqa: E402

EXPORTERS = ("legacy", "dynamo")
TOLERANCE = 1e-4
CALIBRATION, CHECK = 64, 8  # samples


@dataclass
class Planted:
    """A module with planted groups: for each planted producer, the relations its group must lose."""

    module: nn.Module
    input_shape: tuple[int, ...]
    groups: list[tuple[nn.Module, tuple[Relation, ...]]] = field(default_factory=list)
    # planted producers SNP leaves alone: a skipped line holds the reason and names every one of them
    refused: list[tuple[tuple[nn.Module, ...], str]] = field(default_factory=list)
    untouched: list[nn.Module] = field(default_factory=list)  # further producers that keep every output channel
    cob_removes: int = 0  # zero-variance directions CoB removes (where a rotatable chain reads them)
    cob_chains: int = 1   # the chains (residual streams included) that CoB rotates to remove them

    def add(self, layer: nn.Module, relations: tuple[Relation, ...], period: int = 0, repeat: int = 1) -> None:
        plant(layer, relations, period, repeat)
        self.groups.append((layer, relations))


# -- the structures -------------------------------------------------------------------------------

class Residual(nn.Module):
    """A linear residual stream (stem + two expand/ReLU/project blocks joined by Adds) read by a 1x1
    conv, global average pooling and a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.ModuleList(nn.Conv2d(16, 10, 3, padding=1) for _ in range(2))
        self.project = nn.ModuleList(nn.Conv2d(10, 16, 1) for _ in range(2))
        self.head = nn.Conv2d(16, 12, 1)
        self.classifier = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for expand, project in zip(self.expand, self.project):
            x = x + project(F.relu(expand(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1))


def _residual() -> Planted:
    module = Residual().eval()
    planted = Planted(module, (3, 8, 8))
    stream = (Zero(3), Copy(9, 1), Copy(12, 5, -2.5), Combination(14, 6, 7, 0.5, -1.5))
    for producer in (module.stem, *module.project):  # every producer of the stream, alike
        plant(producer, stream)
    planted.groups.append((module.stem, stream))
    planted.add(module.expand[0], (Zero(0), Copy(4, 2), Copy(6, 3, 2.0), Constant(8, 0.7)))  # after ReLU
    planted.add(module.head, (Zero(10), Combination(11, 0, 1, 1.0, -0.5)))
    # the linear stream is one rotatable group (stem and both projections write it, the expands, the next
    # Add and the head read it): its zero, two copies and combination go; head -> GlobalAveragePool ->
    # Flatten -> Gemm is a rotatable chain too
    planted.cob_removes, planted.cob_chains = 4 + 2, 2
    return planted


class ResidualRelu(nn.Module):
    """ResNet-style stream: ReLU(stem), then ReLU(x + conv(ReLU(conv(x)))) twice, read by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.first = nn.ModuleList(nn.Conv2d(12, 8, 3, padding=1) for _ in range(2))
        self.second = nn.ModuleList(nn.Conv2d(8, 12, 3, padding=1) for _ in range(2))
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for first, second in zip(self.first, self.second):
            x = F.relu(x + second(F.relu(first(x))))
        return self.head(x)


def _residual_relu() -> Planted:
    module = ResidualRelu().eval()
    planted = Planted(module, (3, 8, 8))
    stream = (Zero(2), Copy(7, 4), Copy(10, 0, 0.5))  # ReLU(c·u) = c·ReLU(u) for c > 0
    for producer in (module.stem, *module.second):
        plant(producer, stream)
    planted.groups.append((module.stem, stream))
    planted.add(module.first[1], (Zero(3), Copy(6, 1, 2.0)))
    return planted


class Dense(nn.Module):
    """Concat of a ReLU stem (also read by a 3x3 conv), that conv's ReLU output and a Sigmoid branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dense = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(22, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = F.relu(self.stem(x))
        return self.head(torch.cat([stem, F.relu(self.dense(stem)), torch.sigmoid(self.side(x))], dim=1))


def _concat() -> Planted:
    module = Dense().eval()
    planted = Planted(module, (3, 8, 8))
    planted.add(module.stem, (Zero(2), Copy(6, 1), Copy(7, 3, 0.5)))
    # constant on the map but 0 in the padding the 3x3 conv reads: not redundant, it must stay
    plant(module.stem, (Constant(5, 0.5),))
    planted.add(module.dense, (Zero(0), Constant(5, 0.3), Copy(7, 4)))
    planted.add(module.side, (Zero(1), Copy(4, 2), Constant(5, -0.7)))  # sigmoid(0) = 0.5: a constant
    return planted


class Depthwise(nn.Module):
    """1x1 expand -> ReLU6 -> 3x3 depthwise -> ReLU6 -> 1x1 projection."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.relu6(self.depthwise(F.relu6(self.expand(x)))))


def _depthwise() -> Planted:
    module = Depthwise().eval()
    with torch.no_grad():  # a non-negative filter and bias on non-negative inputs: no unit is dead after ReLU6
        module.depthwise.weight.abs_()
        module.depthwise.bias.abs_()
    planted = Planted(module, (3, 8, 8))
    relations = (Zero(0), Copy(5, 2))
    plant(module.expand, relations)
    plant(module.depthwise, (*relations, Constant(8, 0.4)))  # the unit is constant after the depthwise
    planted.groups.append((module.expand, (*relations, Constant(8, 0.4))))
    return planted


class Grouped(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> ReLU -> grouped 3x3 conv (2 groups) -> ReLU -> depthwise conv with
    channel multiplier 2 -> ReLU -> 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 1)
        self.second = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.multiplier = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.second(F.relu(self.first(x))))
        return self.head(F.relu(self.multiplier(F.relu(self.grouped(x)))))


def _grouped() -> Planted:
    module = Grouped().eval()
    planted = Planted(module, (3, 8, 8))
    planted.add(module.first, (Zero(2), Copy(5, 1)))
    # one channel of one group each: a grouped conv prunes a unit (that channel in every group) or nothing, so
    # these relations remove nothing (the grouped convs read them, each group with its own fit)
    for layer in (module.second, module.grouped, module.multiplier):
        plant(layer, (Zero(0), Copy(3, 1)))
    planted.untouched += [module.second, module.grouped, module.multiplier]
    return planted


class SqueezeExcitation(nn.Module):
    """Conv -> ReLU -> x * sigmoid(expand(relu(reduce(GlobalAveragePool(x))))) -> 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.reduce = nn.Conv2d(12, 6, 1)
        self.expand = nn.Conv2d(6, 12, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * gate)


def _squeeze_excitation() -> Planted:
    module = SqueezeExcitation().eval()
    with torch.no_grad():  # every squeezed unit active: none is dead after the ReLU on the inputs
        module.reduce.bias.add_(0.5)
    planted = Planted(module, (3, 8, 8))
    trunk = (Zero(0), Copy(7, 3), Copy(9, 4, 2.0))
    plant(module.conv, trunk)
    plant(module.expand, (Copy(7, 3), Copy(9, 4)))  # gated alike: the gated copies stay copies
    planted.groups.append((module.conv, trunk))
    planted.add(module.reduce, (Zero(0), Copy(3, 1, 1.5), Constant(5, 0.6)))
    return planted


DIM, HEADS, TOKENS, HIDDEN = 16, 2, 6, 24
HEAD_DIM = DIM // HEADS


class Attention(nn.Module):
    """x + attention(x), then + FFN (Linear -> GELU -> Linear), on [N, TOKENS, DIM]."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(batch, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        mixing = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5, dim=-1)
        x = x + self.o((mixing @ v).transpose(1, 2).reshape(batch, TOKENS, DIM))
        return x + self.fc2(F.gelu(self.fc1(x)))


VALUE_RELATIONS = (Zero(0), Copy(3, 1, -2.0), Combination(6, 2, 4, 0.5, -1.0), Constant(7, 0.25))


def _attention() -> Planted:
    module = Attention().eval()
    planted = Planted(module, (TOKENS, DIM))
    # every head alike: the value group is one head's dimensions, shared by all heads
    planted.add(module.v, VALUE_RELATIONS, period=HEAD_DIM, repeat=HEADS)
    planted.add(module.fc1, (Zero(0), Copy(9, 2), Constant(15, 0.8)))  # GELU(0) = 0, GELU(0.8) constant
    for layer in (module.q, module.k):  # read only by q·kᵀ: no linear consumer
        plant(layer, (Zero(5),), period=HEAD_DIM, repeat=HEADS)
    planted.refused.append(((module.q, module.k), "no linear consumer with statistics"))
    planted.cob_removes = HEADS * 3  # per head: the zero, the copy, the combination (the constant has energy)
    return planted


STRUCTURES: dict[str, Callable[[], Planted]] = {
    "residual": _residual, "residual_relu": _residual_relu, "concat": _concat, "depthwise": _depthwise,
    "grouped": _grouped, "squeeze_excitation": _squeeze_excitation, "attention": _attention,
}


# -- running and checking -------------------------------------------------------------------------

def _build(name: str) -> Planted:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return STRUCTURES[name]()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[onnx.ModelProto, Planted]]:
    folder = tmp_path_factory.mktemp("planted")
    cache: dict[tuple[str, str], tuple[onnx.ModelProto, Planted]] = {}

    def get(name: str, exporter: str) -> tuple[onnx.ModelProto, Planted]:
        if (name, exporter) not in cache:
            planted = _build(name)
            example = torch.randn((2, *planted.input_shape), generator=torch.Generator().manual_seed(0))
            path = export_onnx(planted.module, example, folder / f"{name}_{exporter}.onnx", exporter=exporter)
            cache[name, exporter] = onnx.load(str(path)), planted
        return cache[name, exporter]

    return get


def _inputs(shape: tuple[int, ...], count: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)}


def _max_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    expected = run_ort(reference, feeds)["output"]
    assert np.abs(expected).max() > 0.1  # the bound below is small against the outputs
    return float(np.abs(run_ort(candidate, feeds)["output"] - expected).max())


def _snp(model: onnx.ModelProto, planted: Planted, **options: Any) -> graphopt.api.OptimizeResult:
    """SNP on the planted channels; whole heads stay (with heads, the attention block's per-head value
    channels are planned as heads: tests/passes/heads)."""
    return graphopt.optimize(model, method="snp", calib=_inputs(planted.input_shape, CALIBRATION, 0), round_to=1,
                             heads=False, **options)


def _assert_planted_cut(model: onnx.ModelProto, planted: Planted, result: graphopt.api.OptimizeResult,
                        label: str) -> None:
    """One unit of every planted relation removed, in the planted groups only; refused producers kept
    with their reasons."""
    snp = result.report["passes"][-1]
    history = snp["history"]
    assert len(history) == len(planted.groups), (label, history)
    for layer, relations in planted.groups:
        entry = entry_of(history, producer_name(model, layer))
        assert entry is not None, (label, layer)
        assert_removes_one_unit_per_relation(entry["removed"], relations)
        assert max(entry["scores"]) < 1e-6, (label, entry)  # they added no unique variance
    assert snp["stats"]["channels_removed"] == sum(len(relations) for _, relations in planted.groups)
    for layers, reason in planted.refused:
        names = [producer_name(model, layer) for layer in layers]
        assert any(reason in line and all(n in line for n in names) for line in snp["skipped"]), (label, snp["skipped"])
    for layer in [layer for layers, _ in planted.refused for layer in layers] + planted.untouched:
        name = producer_name(model, layer)  # every planted output row is still there
        assert output_channels(result.model, name) == output_channels(model, name), (label, name)


VARIANTS = [("target", {}), ("target, output criterion", {"criterion": "output"}),
            ("target, sequential", {"sequential": True})]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_planted_redundancy_is_removed_exactly(name: str, exporter: str, exported) -> None:
    model, planted = exported(name, exporter)
    check = _inputs(planted.input_shape, CHECK, 1)
    first = _snp(model, planted, keep_variance=1.0)
    _assert_planted_cut(model, planted, first, "keep_variance=1")
    assert _max_error(model, first.model, check) < TOLERANCE
    assert first.report["macs_after"] < first.report["macs_before"]
    # the MAC target of exactly that cut
    target = first.report["macs_after"] / first.report["macs_before"] + 1e-9
    for label, options in VARIANTS:
        result = _snp(model, planted, target_macs=target, **options)
        _assert_planted_cut(model, planted, result, label)
        assert result.report["macs_after"] == first.report["macs_after"], label
        error = _max_error(model, result.model, check)
        assert error < TOLERANCE, (label, error)


def test_pruning_without_reconstruction_is_not_exact(exported) -> None:
    """The exactness above is the reconstruction's: the same cut without it changes the outputs."""
    model, planted = exported("residual", "legacy")
    plain = _snp(model, planted, keep_variance=1.0, reconstruct=False)
    _assert_planted_cut(model, planted, plain, "no reconstruction")
    assert _max_error(model, plain.model, _inputs(planted.input_shape, CHECK, 1)) > 1e-2


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["residual", "attention", "squeeze_excitation"])
def test_cob_removes_planted_zero_variance_directions_where_a_chain_exists(name: str, exporter: str,
                                                                          exported) -> None:
    model, planted = exported(name, exporter)
    result = graphopt.optimize(model, method="cob", calib=_inputs(planted.input_shape, CALIBRATION, 0),
                               keep_variance=1.0, round_to=1)
    cob = result.report["passes"][-1]
    assert cob["stats"]["channels_removed"] == planted.cob_removes, cob
    if planted.cob_removes:
        assert cob["stats"]["chains_rotated"] == planted.cob_chains
        assert _max_error(model, result.model, _inputs(planted.input_shape, CHECK, 1)) < TOLERANCE
    else:  # no chain: every producer's reason names the op that ends it
        assert cob["stats"]["chains"] == 0 and result.report["macs_ratio"] == 1.0
        assert any("(Sigmoid): elementwise nonlinearity" in line for line in cob["skipped"]), cob["skipped"]


@pytest.mark.parametrize("attrs,spatial,kernel", [
    ({"pads": [1, 1, 1, 1]}, (8, 8), (3, 3)),
    ({"pads": [0, 2, 1, 0], "strides": [2, 1]}, (7, 9), (3, 5)),
    ({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, (6, 6), (3, 3)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (7, 8), (4, 3)),
    ({"auto_pad": "SAME_LOWER"}, (5, 6), (2, 4)),
    ({"auto_pad": "VALID"}, (8, 8), (3, 3)),
    ({}, (8, 8), (1, 1)),
])
def test_inside_fraction_counts_the_reads_a_convolution_makes_inside_its_input(attrs: dict, spatial: tuple,
                                                                                kernel: tuple) -> None:
    """w against onnxruntime: a Conv of ones with ones sums, per output, the taps that land inside."""
    from onnx import helper

    from graphopt.passes.snp.padding import conv_inside_fraction

    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", 1, [1, 1, *spatial])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [onnx.numpy_helper.from_array(np.ones((1, 1, *kernel), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inside = run_ort(model, {"x": np.ones((1, 1, *spatial), np.float32)})["y"]
    expected = inside.sum() / (inside.size * np.prod(kernel))
    assert conv_inside_fraction(attrs, spatial, kernel) == pytest.approx(expected, rel=1e-12)
    padded = any(p > 0 for p in attrs.get("pads", [])) or attrs.get("auto_pad", "").startswith("SAME")
    assert (expected < 1.0) == padded

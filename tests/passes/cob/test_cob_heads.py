"""CoB per attention head: value/output rotations through the token mixing, exact; pruning per head."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from tests.conftest import assert_equivalent, run_ort

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graphopt.torch.export import export_onnx  # noqa: E402

DIM, HEADS, TOKENS = 32, 4, 8
HEAD_DIM = DIM // HEADS


class Attention(nn.Module):
    """Multi-head self-attention on [N, T, DIM]; `value_act` is applied to the value heads (negative case)."""

    def __init__(self, residual: bool = True, value_act: nn.Module | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.residual, self.value_act = residual, value_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(batch, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.value_act is not None:
            v = self.value_act(v)
        mixing = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5, dim=-1)
        y = self.o((mixing @ v).transpose(1, 2).reshape(batch, TOKENS, DIM))
        return x + y if self.residual else y


def _data(count: int = 64, seed: int = 0) -> np.ndarray:
    """Tokens with an anisotropic covariance (singular values decaying over two decades)."""
    rng = np.random.default_rng(seed)
    mixing = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0] * np.logspace(0, -2, DIM)[:, None]
    return (rng.standard_normal((count, TOKENS, DIM)) @ mixing * 3.0).astype(np.float32)


def _attention(seed: int = 0, value_rank: int | None = None, **kwargs: object) -> Attention:
    torch.manual_seed(seed)
    module = Attention(**kwargs).eval()
    if value_rank is not None:  # every head's value columns (and bias) span only `value_rank` directions
        rng = np.random.default_rng(seed)
        weight = np.zeros((DIM, DIM))
        bias = np.zeros(DIM)
        for head in range(HEADS):
            basis = rng.standard_normal((HEAD_DIM, value_rank))
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            weight[rows] = basis @ rng.standard_normal((value_rank, DIM)) * 0.3
            bias[rows] = basis @ rng.standard_normal(value_rank) * 0.1
        with torch.no_grad():
            module.v.weight.copy_(torch.tensor(weight))
            module.v.bias.copy_(torch.tensor(bias))
    return module


def _export(module: nn.Module, exporter: str, tmp_path) -> onnx.ModelProto:
    example = torch.tensor(_data(2))
    return onnx.load(export_onnx(module, example, tmp_path / f"{exporter}.onnx", exporter=exporter, opset=17))


def _cob(model: onnx.ModelProto, data: np.ndarray, **options: object) -> tuple[graphopt.api.OptimizeResult, dict]:
    result = graphopt.optimize(model, method="cob", calib={"input": data}, **{"round_to": 1, **options})  # exact counts: planted dims
    return result, result.report["passes"][-1]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("rotation", ["pca", "l1pca"])
def test_per_head_value_rotation_alone_is_exact(exporter: str, rotation: str, tmp_path) -> None:
    model, data = _export(_attention(), exporter, tmp_path), _data()
    result, passed = _cob(model, data, rotation=rotation)
    assert passed["stats"]["chains_rotated"] == 1, passed["skipped"]
    assert any("left operand" in reason for reason in passed["skipped"])  # queries: not a value chain
    assert_equivalent(model, result.model, {"input": data})
    before = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    changed = [name for name in before if name in after and not np.array_equal(before[name], after[name])]
    assert len(changed) == 3  # Wv, bv and Wo; queries, keys and the output bias untouched


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_planted_zero_variance_value_dims_are_pruned_exactly_and_idempotently(exporter: str, tmp_path) -> None:
    model, data = _export(_attention(seed=1, value_rank=5), exporter, tmp_path), _data()
    result, passed = _cob(model, data, keep_variance=1.0)
    assert passed["stats"]["channels_removed"] == HEADS * (HEAD_DIM - 5), passed["skipped"]
    assert result.report["macs_before"] - result.report["macs_after"] == TOKENS * 3 * HEADS * (
        2 * DIM + TOKENS)  # Wv columns, Wo rows and the context MatMul, per token
    shapes = sorted(tuple(i.dims) for i in result.model.graph.initializer if len(i.dims) == 2)
    assert shapes == sorted([(DIM, DIM)] * 2 + [(DIM, HEADS * 5), (HEADS * 5, DIM)])
    assert_equivalent(model, result.model, {"input": data})
    again, passed_again = _cob(result.model, data, keep_variance=1.0)
    assert passed_again["stats"]["channels_removed"] == 0 and passed_again["modified"] is False


def _without_value_dims(module: Attention, dropped: np.ndarray) -> Attention:
    """The module with value dims `dropped` (in every head) zeroed: the same function as removing them."""
    copy = Attention(residual=module.residual).eval()
    copy.load_state_dict(module.state_dict())
    rows = (np.arange(HEADS)[:, None] * HEAD_DIM + dropped[None, :]).reshape(-1)
    with torch.no_grad():
        copy.v.weight[rows] = 0.0
        copy.v.bias[rows] = 0.0
    return copy


def test_budget_prunes_value_heads_and_beats_magnitude_on_the_same_dims(tmp_path) -> None:
    module, data = _attention(seed=2, residual=False), _data()
    model = _export(module, "legacy", tmp_path)
    result, passed = _cob(model, data, target_macs=0.8)
    assert result.report["macs_ratio"] <= 0.8
    removed = passed["stats"]["channels_removed"] // HEADS
    assert 0 < removed < HEAD_DIM
    reference = run_ort(model, {"input": data})["output"]
    error = np.linalg.norm(run_ort(result.model, {"input": data})["output"] - reference) / np.linalg.norm(reference)
    columns = module.v.weight.detach().numpy().reshape(HEADS, HEAD_DIM, DIM)
    scores = np.abs(columns).sum(axis=(0, 2))  # magnitude's L1 score per head dim, summed over heads
    baseline = _without_value_dims(module, np.argsort(scores, kind="stable")[:removed])
    with torch.no_grad():
        dropped = baseline(torch.tensor(data)).numpy()
    magnitude_error = np.linalg.norm(dropped - reference) / np.linalg.norm(reference)
    assert error < 0.7 * magnitude_error, (error, magnitude_error)  # measured 0.25 vs 0.50
    assert error == pytest.approx(result.report["fidelity"]["rel_l2"], rel=1e-3)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_nonlinearity_on_the_value_heads_blocks_the_rotation(exporter: str, tmp_path) -> None:
    model, data = _export(_attention(value_act=nn.ReLU()), exporter, tmp_path), _data()
    result, passed = _cob(model, data, keep_variance=0.9)
    assert passed["stats"]["chains"] == 0 and passed["modified"] is False
    assert any("(Relu): elementwise nonlinearity" in reason for reason in passed["skipped"]), passed["skipped"]
    assert_equivalent(model, result.model, {"input": data})

"""graphopt.torch.iunet: NT-Xent against a direct computation, proactive initialisation scale, rewinding
restores the initial values of kept weights, masks hold through fine-tuning, export + cleanup is exact."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from graphopt.torch import iunet  # noqa: E402
from tests.conftest import run_ort  # noqa: E402


def test_nt_xent_matches_direct_computation() -> None:
    torch.manual_seed(0)
    first, second = torch.randn(3, 4), torch.randn(3, 4)
    tau = 0.7
    z = torch.cat([first, second])
    z = z / z.norm(dim=1, keepdim=True)
    losses = []
    for i in range(6):
        positive = (i + 3) % 6
        terms = [math.exp(float(z[i] @ z[k]) / tau) for k in range(6) if k != i]
        losses.append(-math.log(math.exp(float(z[i] @ z[positive]) / tau) / sum(terms)))
    assert float(iunet.nt_xent(first, second, tau)) == pytest.approx(sum(losses) / 6, rel=1e-5)


def test_proactive_init_scale() -> None:
    torch.manual_seed(0)
    model = iunet.MLP(200, [400], 3)
    iunet.proactive_init(model, kappa=0.125)
    weight = model.body[0].weight
    assert float(weight.detach().std()) == pytest.approx(iunet.kaiming_std(weight, 0.125), rel=0.05)
    assert float(model.body[0].bias.detach().abs().sum()) == 0.0


def data(count: int = 64) -> tuple:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 6, generator=generator)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_rewind_and_masks_held_during_finetuning() -> None:
    x, y = data()
    config = iunet.TrainConfig(epochs=3, batch_size=16, contrastive=0.5, seed=1)
    result = iunet.iunet(lambda: iunet.MLP(6, [16, 16], 2), x, y, 0.8, augment=iunet.tabular_augment(),
                         supernet=config, finetune=iunet.TrainConfig(epochs=0))
    for name, weight in iunet.prunable_weights(result.model).items():  # no fine-tuning: exactly the rewound init
        mask = result.masks[name]
        initial = result.initial[f"{name}.weight"]
        assert torch.equal(weight[mask], initial[mask]) and bool((weight[~mask] == 0).all())
    assert iunet.sparsity_of(result.model) == pytest.approx(0.8, abs=0.01)
    iunet.train(result.model, x, y, iunet.TrainConfig(epochs=2, batch_size=16, contrastive=0.0), masks=result.masks)
    for name, weight in iunet.prunable_weights(result.model).items():
        assert bool((weight[~result.masks[name]] == 0).all())
        assert not torch.equal(weight[result.masks[name]], result.initial[f"{name}.weight"][result.masks[name]])


def test_image_augment_shifts() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 4, 4] = 1.0
    moved = iunet.image_augment(1)(image.repeat(50, 1, 1, 1))
    positions = {tuple(torch.nonzero(m[0])[0].tolist()) for m in moved}
    assert positions <= {(4 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} and len(positions) > 1


def test_export_cleanup_exact(tmp_path) -> None:
    x, y = data()
    result = iunet.iunet(lambda: iunet.MLP(6, [32, 32], 2), x, y, 0.9, augment=iunet.tabular_augment(),
                         supernet=iunet.TrainConfig(epochs=2, batch_size=16), finetune=iunet.TrainConfig(epochs=1))
    report = iunet.export_cleaned(result.model, x[:1], tmp_path / "net.onnx")
    assert report["params_after"] < report["params_before"]
    cleaned = onnx.load(str(tmp_path / "net.onnx"))
    expected = result.model(x).detach().numpy()
    np.testing.assert_allclose(run_ort(cleaned, {"input": x.numpy()})["output"], expected, rtol=1e-4, atol=1e-5)

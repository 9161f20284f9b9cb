"""IUNET training recipe (Xu, Sun, Wang, arXiv 2309.08171) for small torch networks.

1. Proactive initialisation: every Linear/Conv weight gets Kaiming-normal initialisation scaled by
   kappa (paper: 0.125); biases zero. `snapshot` keeps these values for rewinding.
2. Supernetwork training on cross-entropy + lambda * NT-Xent between the penultimate features of two
   augmented views (SimCLR's loss, temperature tau): for 2N embeddings z (L2-normalised),
   loss = mean_i -log( exp(z_i.z_p(i)/tau) / sum_{k != i} exp(z_i.z_k/tau) ), p(i) the other view of i.
3. One-shot global magnitude pruning of the trained weights (`magnitude_masks`, the same rule as the
   graph pass graphopt.passes.sparse.omp), rewinding the kept weights to their initial values.
4. Fine-tuning with cross-entropy under the mask (masked weights and their gradients held at zero).
5. Export to ONNX and graphopt's dead-unit elimination (exact), so the file physically shrinks.

Augmentations are callables tensor -> tensor; defaults: `tabular_augment` (Gaussian feature noise and
random feature masking) and `image_augment` (random shifts by up to `shift` pixels with zero fill, i.e.
random crops of a padded image). The model must expose `features(x)` (penultimate representation) and
`head(features)`; `MLP` and `SmallCNN` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Augment = Callable[[torch.Tensor], torch.Tensor]
PRUNABLE = (nn.Linear, nn.Conv2d)


class _Classifier(nn.Module):
    """features(x), then the linear head `out`: the NT-Xent term of the loss reads the features."""

    out: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(_Classifier):
    def __init__(self, inputs: int, hidden: list[int], classes: int) -> None:
        super().__init__()
        sizes = [inputs, *hidden]
        self.body = nn.Sequential(*[layer for a, b in zip(sizes, sizes[1:]) for layer in (nn.Linear(a, b), nn.ReLU())])
        self.out = nn.Linear(sizes[-1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SmallCNN(_Classifier):
    """Two 3x3 conv layers (padding 1) on 1x8x8 images, 2x2 max-pool, one hidden Linear."""

    def __init__(self, channels: int = 16, hidden: int = 64, classes: int = 10, size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(channels * (size // 2) ** 2, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def proactive_init(model: nn.Module, kappa: float = 0.125) -> None:
    """Kaiming-normal (fan-in, ReLU gain) weights scaled by kappa; zero biases."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PRUNABLE):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                module.weight.mul_(kappa)
                if module.bias is not None:
                    module.bias.zero_()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent between two views (rows of `first` and `second` are positives)."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    count = first.shape[0]
    positives = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(first.device)
    return F.cross_entropy(logits, positives)


def tabular_augment(noise: float = 0.1, mask: float = 0.1) -> Augment:
    def augment(x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x) >= mask).to(x.dtype)
        return (x + noise * torch.randn_like(x)) * keep
    return augment


def image_augment(shift: int = 1) -> Augment:
    """Random translation by up to `shift` pixels per image (a random crop of the zero-padded image)."""
    def augment(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (shift, shift, shift, shift))
        height, width = x.shape[-2:]
        offsets = torch.randint(0, 2 * shift + 1, (x.shape[0], 2))
        return torch.stack([padded[i, ..., dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets.tolist())])
    return augment


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, PRUNABLE)}


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global one-shot magnitude masks (True: kept) over every Linear/Conv weight."""
    from graphopt.passes.sparse.omp import magnitude_masks as graph_masks

    arrays = {name: weight.detach().cpu().numpy() for name, weight in prunable_weights(model).items()}
    return {name: torch.from_numpy(mask) for name, mask in graph_masks(arrays, sparsity, "global").items()}


def rewind(model: nn.Module, initial: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Load the initial state, then zero the pruned weights (lottery-ticket rewinding)."""
    model.load_state_dict(initial)
    apply_masks(model, masks)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in prunable_weights(model).items():
            if name in masks:
                weight.mul_(masks[name].to(weight.dtype))


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    contrastive: float = 0.5   # lambda; 0 disables the invariance term
    temperature: float = 0.5
    seed: int = 0


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, augment: Augment | None = None,
          masks: dict[str, torch.Tensor] | None = None) -> None:
    """Adam on cross-entropy (+ lambda NT-Xent on two augmented views when lambda > 0 and `augment`);
    with `masks`, pruned weights stay exactly zero (masked after every step)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], config.batch_size):
            batch = order[start:start + config.batch_size]
            inputs, targets = x[batch], y[batch]
            loss = F.cross_entropy(model(inputs), targets)
            if config.contrastive > 0 and augment is not None and batch.numel() > 1:
                first, second = model.features(augment(inputs)), model.features(augment(inputs))
                loss = loss + config.contrastive * nt_xent(first, second, config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if masks is not None:
                apply_masks(model, masks)
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


@dataclass
class IunetResult:
    model: nn.Module
    masks: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]


def iunet(make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, sparsity: float, *,
          augment: Augment | None, kappa: float | None = 0.125, supernet: TrainConfig | None = None,
          finetune: TrainConfig | None = None) -> IunetResult:
    """The whole recipe; kappa=None keeps torch's default initialisation (ablation), lambda=0 in
    `supernet` drops the contrastive term (ablation)."""
    supernet = supernet or TrainConfig()
    finetune = finetune or TrainConfig(contrastive=0.0, seed=supernet.seed)
    torch.manual_seed(supernet.seed)
    model = make_model()
    if kappa is not None:
        proactive_init(model, kappa)
    initial = snapshot(model)
    train(model, x, y, supernet, augment)
    masks = magnitude_masks(model, sparsity)
    rewind(model, initial, masks)
    train(model, x, y, finetune, None, masks)
    return IunetResult(model, masks, initial)


def export_cleaned(model: nn.Module, example: torch.Tensor, path: str | Path) -> dict[str, object]:
    """Export to ONNX (legacy exporter, opset 17) and run graphopt's dead-unit elimination in place."""
    from graphopt.api import optimize
    from graphopt.torch.export import export_onnx

    path = Path(path)
    dense = path.with_suffix(".sparse.onnx")
    export_onnx(model.eval(), example, dense, exporter="legacy", opset=17, fold_bn=True)
    return optimize(dense, method="dead-units", output=path, progress=False).report


def sparsity_of(model: nn.Module) -> float:
    weights = list(prunable_weights(model).values())
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def kaiming_std(weight: torch.Tensor, kappa: float) -> float:
    fan_in = int(np.prod(weight.shape[1:]))
    return kappa * math.sqrt(2.0 / fan_in)

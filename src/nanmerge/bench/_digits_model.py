"""The `digits` suite's model and its one training loop: pretraining, probes, fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nanmerge.bench._digits_data import DigitsSize, Eval, Split
from nanmerge.bench._merging import State


class Backbone(nn.Module):
    """The merged part: its state dict is exactly what each checkpoint holds."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class WithHead(Backbone):
    """A fine-tuned backbone with its task's frozen head: what Fisher is computed on."""

    def __init__(self, size: DigitsSize, state: dict[str, torch.Tensor], head: nn.Linear) -> None:
        super().__init__(size.hidden)
        self.load_state_dict(state)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(super().forward(x))
        return out


def batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches from successive shuffles, so every sample is seen before any repeats."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + batch] for i in range(0, n, batch)]
    return out[:steps]


def train(
    model: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[nn.Parameter],
    data: Split,
    picks: Sequence[torch.Tensor | slice],
    lr: float,
) -> None:
    """Adam on the cross-entropy of `model` on `data`, one step per entry of `picks` (the
    examples of that step: an index batch, or `slice(None)` for all of them)."""
    opt = torch.optim.Adam(params, lr=lr)
    for idx in picks:
        loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def pretrain(size: DigitsSize, images: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
    """Rotation prediction: a pretext task that teaches stroke features without digit labels."""
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    torch.manual_seed(seed * 1000 + 7)
    x = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)]).reshape(-1, 64)
    rotations = Split(
        torch.from_numpy(np.ascontiguousarray(x)), torch.arange(4).repeat_interleave(len(images))
    )
    backbone = Backbone(size.hidden)
    head = nn.Linear(size.hidden, 4)
    train(
        nn.Sequential(backbone, head),
        [*backbone.parameters(), *head.parameters()],
        rotations,
        batches(len(rotations.x), 64, size.pretrain_steps, gen),
        size.lr,
    )
    return backbone.state_dict()


def fit_head(
    size: DigitsSize, backbone: Backbone, data: Split, classes: int, gen: torch.Generator
) -> nn.Linear:
    """A linear probe on frozen pretrained features: the task's head, frozen from then on."""
    head = nn.Linear(size.hidden, classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
        features = Split(backbone(data.x), data.y)
    train(head, head.parameters(), features, [slice(None)] * size.probe_steps, 1e-2)
    return head


def finetune(
    size: DigitsSize,
    base: dict[str, torch.Tensor],
    head: nn.Linear,
    data: Split,
    steps: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The backbone trained from `base` on one task, through the task's frozen head."""
    backbone = Backbone(size.hidden)
    backbone.load_state_dict(base)
    head.requires_grad_(False)
    train(
        nn.Sequential(backbone, head),
        backbone.parameters(),
        data,
        batches(len(data.x), size.batch, steps, gen),
        size.lr,
    )
    return backbone.state_dict()


def accuracies(
    size: DigitsSize, state: State, heads: dict[str, nn.Linear], data: Eval
) -> dict[str, float]:
    """Each task's accuracy of `state` (a backbone) with that task's head."""
    backbone = Backbone(size.hidden)
    backbone.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        features = backbone(data.x)
        return {
            name: float((heads[name](features[sl]).argmax(1) == data.y[sl]).float().mean())
            for name, sl in data.slices.items()
        }

"""The `digits` suite's data: sizes, derived tasks, splits and each scenario's n_i and steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.datasets import load_digits

from nanmerge.bench._merging import DEMO_METHODS

SCENARIOS = ("a_equal_budget", "b_budget_grows", "c_equal_data", "d_noisy_labels")
PRETRAIN_N, VAL_N, TEST_N = 500, 200, 300


@dataclass(frozen=True)
class DigitsSize:
    tasks: int
    hidden: int
    pretrain_steps: int
    budget_steps: int
    probe_steps: int
    batch: int
    lr: float
    n_min: int
    n_max: int
    noisy_fraction: float
    scale_grid: tuple[float, ...]
    # LiNeS's beta, tuned on validation (the paper searches it on a grid too)
    beta_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    # the methods scored (None: every registered one); the demo runs a subset to stay short
    methods: tuple[str, ...] | None = None


_FULL = DigitsSize(
    8, 256, 1500, 300, 200, 32, 1e-4, 25, 780, 0.5, (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
)
SIZES = {
    "tiny": DigitsSize(6, 32, 60, 15, 30, 32, 1e-3, 20, 320, 0.5, (), (0.5,)),
    # the full models (seed 0 checkpoints are shared with `full`), a coarser scale grid
    "demo": replace(_FULL, scale_grid=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), methods=DEMO_METHODS),
    "full": _FULL,
}


def _flip_lr(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _flip_ud(x: np.ndarray) -> np.ndarray:
    return x[:, ::-1, :]


def _rot90(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 1))


def _invert(x: np.ndarray) -> np.ndarray:
    return 1.0 - x


def _same(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class TaskDef:
    name: str
    transform: Callable[[np.ndarray], np.ndarray]
    label: Callable[[np.ndarray], np.ndarray]
    classes: int


TASKS = (
    TaskDef("digit", _same, lambda y: y, 10),
    TaskDef("rot90", _rot90, lambda y: y, 10),
    TaskDef("invert", _invert, lambda y: y, 10),
    TaskDef("parity_T", _transpose, lambda y: y % 2, 2),
    TaskDef("mod3_flip", _flip_lr, lambda y: y % 3, 3),
    TaskDef("vflip", _flip_ud, lambda y: y, 10),
    TaskDef("large", _same, lambda y: (y >= 5).astype(np.int64), 2),
    TaskDef("hflip", _flip_lr, lambda y: y, 10),
)


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def images() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digit images scaled to [0, 1], and their labels."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def task_split(task: TaskDef, images: np.ndarray, labels: np.ndarray) -> Split:
    x = np.ascontiguousarray(task.transform(images)).reshape(len(images), 64)
    return Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(task.label(labels)))


@dataclass
class Eval:
    """Every task's evaluation inputs stacked, so one backbone pass scores all tasks."""

    x: torch.Tensor
    y: torch.Tensor
    slices: dict[str, slice]

    @classmethod
    def of(cls, splits: dict[str, Split]) -> Eval:
        slices, start = {}, 0
        for name, split in splits.items():
            slices[name] = slice(start, start + len(split.y))
            start += len(split.y)
        x = torch.cat([s.x for s in splits.values()])
        return cls(x, torch.cat([s.y for s in splits.values()]), slices)


def data_sizes(size: DigitsSize, scenario: str, seed: int) -> list[int]:
    """Geometric spread of n_i, assigned to tasks in a seed-dependent order."""
    if scenario == "c_equal_data":
        return [round(math.sqrt(size.n_min * size.n_max))] * size.tasks
    spread = [round(v) for v in np.geomspace(size.n_min, size.n_max, size.tasks)]
    order = np.random.default_rng([seed, 2]).permutation(size.tasks)
    return [spread[i] for i in order]


def step_counts(size: DigitsSize, scenario: str, sizes: list[int]) -> list[int]:
    """(b) fixes epochs so the mean step count equals the equal-budget scenarios' budget."""
    if scenario != "b_budget_grows":
        return [size.budget_steps] * len(sizes)
    per_epoch = [math.ceil(n / size.batch) for n in sizes]
    epochs = max(1, round(size.budget_steps * len(sizes) / sum(per_epoch)))
    return [epochs * p for p in per_epoch]

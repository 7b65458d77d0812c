"""The `digits` suite's checkpoints: fine-tuned per scenario and seed, or read from the cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nanmerge.bench._checkpoints import ModelSet, cache_folder, load_checkpoint, save_checkpoint
from nanmerge.bench._digits_data import (
    PRETRAIN_N,
    TASKS,
    TEST_N,
    VAL_N,
    DigitsSize,
    Eval,
    data_sizes,
    images,
    step_counts,
    task_split,
)
from nanmerge.bench._digits_model import Backbone, finetune, fit_head, pretrain


@dataclass
class Problem:
    models: ModelSet
    heads: dict[str, nn.Linear]
    val: Eval
    test: Eval
    steps: list[int]
    train_inputs: list[torch.Tensor] = field(default_factory=list)


def build(size: DigitsSize, scenario: str, seed: int, cache_dir: Path, bar: tqdm | None) -> Problem:
    """Fine-tune (or load from the cache) every task's backbone for one scenario and seed."""
    pictures, labels = images()
    order = np.random.default_rng([seed, 1]).permutation(len(pictures))
    pre, val_idx = order[:PRETRAIN_N], order[PRETRAIN_N : PRETRAIN_N + VAL_N]
    test_idx = order[PRETRAIN_N + VAL_N : PRETRAIN_N + VAL_N + TEST_N]
    pool = order[PRETRAIN_N + VAL_N + TEST_N :]
    tasks = TASKS[: size.tasks]
    sizes = data_sizes(size, scenario, seed)
    steps = step_counts(size, scenario, sizes)

    # The scale and beta grids only affect merging, so they stay out of the checkpoints'
    # cache key (which predates the beta grid: it is left out, not set to None).
    fields = {k: v for k, v in asdict(size).items() if k != "beta_grid"}
    settings = {**fields, "seed": seed, "scale_grid": None}
    base_path = (
        cache_folder(cache_dir, "digits", {**settings, "part": "pretrain"}) / "base.safetensors"
    )
    if not base_path.exists():
        save_checkpoint(pretrain(size, pictures[pre], seed), base_path)
    base = load_checkpoint(base_path)
    pretrained = Backbone(size.hidden)
    pretrained.load_state_dict(base)

    folder = cache_folder(cache_dir, "digits", {**settings, "scenario": scenario})
    heads_path = folder / "heads.safetensors"
    heads: dict[str, nn.Linear] = {}
    paths = [folder / f"{task.name}.safetensors" for task in tasks]
    # Heads are written last, so their file marks a complete scenario; otherwise retrain all.
    cached = heads_path.exists() and all(p.exists() for p in paths)
    train_inputs = []
    for i, (task, n, n_steps, path) in enumerate(zip(tasks, sizes, steps, paths, strict=True)):
        if bar is not None:
            bar.update(1)
        pick = np.random.default_rng([seed, 3, i]).permutation(pool)[:n]
        train = task_split(task, pictures[pick], labels[pick])
        train_inputs.append(train.x)  # unlabeled inputs for the data-informed methods
        if cached:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + 100 + i)
        torch.manual_seed(seed * 1000 + 100 + i)
        if scenario == "d_noisy_labels" and i % 2 == 1:
            noisy = torch.rand(n, generator=gen) < size.noisy_fraction
            train.y[noisy] = torch.randint(task.classes, (int(noisy.sum()),), generator=gen)
        heads[task.name] = fit_head(size, pretrained, train, task.classes, gen)
        save_checkpoint(finetune(size, base, heads[task.name], train, n_steps, gen), path)
    if heads:
        save_checkpoint(_head_tensors(heads), heads_path)
    stored = load_checkpoint(heads_path)
    for task in tasks:
        head = nn.Linear(size.hidden, task.classes)
        head.load_state_dict(
            {"weight": stored[f"{task.name}.weight"], "bias": stored[f"{task.name}.bias"]}
        )
        heads[task.name] = head
    names = tuple(t.name for t in tasks)
    return Problem(
        ModelSet(base_path, tuple(paths), tuple(sizes), names),
        heads,
        Eval.of({t.name: task_split(t, pictures[val_idx], labels[val_idx]) for t in tasks}),
        Eval.of({t.name: task_split(t, pictures[test_idx], labels[test_idx]) for t in tasks}),
        steps,
        train_inputs,
    )


def _head_tensors(heads: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, head in heads.items():
        out[f"{name}.weight"] = head.weight.detach()
        out[f"{name}.bias"] = head.bias.detach()
    return out

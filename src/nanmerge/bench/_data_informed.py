"""Rows for the data-informed methods (fisher, regmean): statistics first, then the merge.

Each fine-tuned model's statistics are computed on its own task's training inputs, without
labels (Fisher uses the model's own predictions), saved next to the checkpoint and listed in
the recipe's `statistics`, exactly as a user would. Every coefficient variant of the other
rows is run, so NAN's effect on these methods is measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import nanmerge
from nanmerge.bench._checkpoints import ModelSet, load_checkpoint
from nanmerge.bench._merging import (
    COEFFICIENTS,
    UNIFORM,
    Scores,
    State,
    _row,
    _tick,
    method_params,
    recipe,
)
from nanmerge.learn import Kind, adamerging, compute_statistics, save_coefficients, save_statistics

METHODS = ("fisher", "regmean")
_KINDS: tuple[tuple[Kind, str], ...] = (("fisher", "fisher"), ("gram", "regmean"))
_BATCH = 64


def statistics_files(
    models: ModelSet,
    modules: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    folder: Path,
) -> dict[str, list[Path]]:
    """Fisher (of module k: the merged body with task k's head) and Gram files per model.

    `modules[k]` must hold model k's weights under the checkpoint's names; only those names
    are saved, into `folder`. They take seconds, so they are recomputed, never cached.
    """
    files: dict[str, list[Path]] = {method: [] for method in METHODS}
    for path, module, x in zip(models.models, modules, inputs, strict=True):
        names = set(load_checkpoint(path))
        batches = [x[i : i + _BATCH] for i in range(0, len(x), _BATCH)]
        for kind, method in _KINDS:
            stats = compute_statistics(module, batches, kind=kind, progress=False)
            kept = {k: v for k, v in stats.items() if k in names}
            target = folder / f"{path.stem}.{kind}.safetensors"
            files[method].append(save_statistics(kept, target, kind=kind))
    return files


def rows(
    models: ModelSet,
    files: dict[str, list[Path]],
    seed: int,
    validate: Callable[[State], float],
    test: Callable[[State], Scores],
    bar: tqdm | None = None,
    parameters: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per method in `files` x coefficient variant (no global scale to tune).

    `parameters` overrides a method's published defaults (the row is labelled with them).
    """
    out: list[dict[str, Any]] = []
    for method in files:
        params = {**method_params(method), **(parameters or {}).get(method, {})}
        label = method
        if parameters and method in parameters:
            label += " (" + ", ".join(f"{k} {v}" for k, v in parameters[method].items()) + ")"
        for coef in COEFFICIENTS:
            r = recipe(models, method, coef, params, seed)
            r["statistics"] = [str(p) for p in files[method]]
            state = {k: v for k, v in nanmerge.merge(r).items()}
            out.append(_row(label, coef, "-", None, validate(state), test(state)))
            _tick(bar)
    return out


# AdaMerging variants: (granularity, init) -> the coefficient label of the row
ADAMERGING = {
    ("task", "uniform"): "uniform",
    ("task", "nan"): "nan tau/model",
    ("layer", "uniform"): "uniform",
    ("layer", "nan"): "nan tau/tensor",
}
ADAMERGING_SCALE = 0.3


def adamerging_rows(
    models: ModelSet,
    modules: Sequence[nn.Module],
    batches: Sequence[Sequence[torch.Tensor]],
    steps: int,
    seed: int,
    folder: Path,
    validate: Callable[[State], float],
    test: Callable[[State], Scores],
    bar: tqdm | None = None,
) -> list[dict[str, Any]]:
    """AdaMerging's learned coefficients, merged by task arithmetic at its default scale."""
    base = load_checkpoint(models.base)
    states = [load_checkpoint(p) for p in models.models]
    out: list[dict[str, Any]] = []
    for (granularity, init), label in ADAMERGING.items():
        learned = adamerging(
            base,
            states,
            modules,
            batches,
            granularity="model" if granularity == "task" else "tensor",
            init="nan" if init == "nan" else "uniform",
            scale=ADAMERGING_SCALE,
            steps=steps,
            lr=1e-2,
            seed=seed,
            model_names=models.names,
            progress=False,
        )
        path = save_coefficients(learned.coefficients, folder / f"ada-{granularity}-{init}.json")
        r = recipe(models, "task_arithmetic", UNIFORM, {"scale": ADAMERGING_SCALE}, seed)
        r["coefficients"] = {"estimator": "from_file", "path": str(path)}
        state = {k: v for k, v in nanmerge.merge(r).items()}
        method = f"adamerging {granularity}-wise (task_arithmetic, scale {ADAMERGING_SCALE})"
        out.append(_row(method, label, "-", None, validate(state), test(state)))
        _tick(bar)
    return out


def work(methods: Sequence[str] = METHODS) -> int:
    return len(methods) * len(COEFFICIENTS) + len(ADAMERGING)

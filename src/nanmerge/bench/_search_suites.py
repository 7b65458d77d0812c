"""The bundled objectives of `nanmerge search`: one lsq family or one digits scenario.

`nanmerge.learn` loads these by name (nothing imports bench): each builds its problem's
checkpoints in the cache (once; later calls read them) and returns the recipe's `base` and
`models` with a score of a merged state dict computed on held-out data only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanmerge._types import MergeError
from nanmerge.bench import _lsq
from nanmerge.bench._checkpoints import cache_folder, save_checkpoint
from nanmerge.bench._digits_build import build
from nanmerge.bench._digits_data import SCENARIOS
from nanmerge.bench._digits_data import SIZES as DIGITS_SIZES
from nanmerge.bench._digits_model import accuracies
from nanmerge.learn._search_spec import Suite

__all__ = ["digits", "lsq"]


def _pick(name: str, value: str, valid: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in valid:
        raise MergeError(f"objective.options.{name}: {value!r} is not one of {', '.join(valid)}")


def lsq(*, cache: Path, size: str = "tiny", family: str = "ols", seed: int = 0) -> Suite:
    """K least-squares tasks (`nanmerge bench lsq`'s problem for one family and seed).

    Metrics: `val_loss` (mean squared error on held-out samples of every task, pooled),
    `val_loss:taskI` per task, and `loss_ratio` (the bench's score: the joint training loss
    over the closed-form joint optimum's, 1.0 = optimal).
    """
    _pick("size", size, _lsq.SIZES)
    _pick("family", family, tuple(_lsq.FAMILIES))
    shape = _lsq.SIZES[size]
    # the same draws, in the same order, as the bench's run_seed
    rng = np.random.default_rng([seed, 1])
    shared = rng.standard_normal((shape.dim + 1, shape.outputs))
    w0 = _lsq._ols(*_lsq._sample(rng, shared, shape.pretrain_n, shape).targets(shape.noise))
    parts = []
    for n in _lsq.data_sizes(shape):
        w_true = shared + shape.task_spread * rng.standard_normal(shared.shape)
        parts.append((_lsq._sample(rng, w_true, n, shape), _lsq._sample(rng, w_true, n, shape)))
    multiplier, solver = _lsq.FAMILIES[family]
    noise = shape.noise * multiplier
    train = [t.targets(noise) for t, _ in parts]
    val = [v.targets(noise) for _, v in parts]
    optimum = _lsq._ols(np.vstack([a for a, _ in train]), np.vstack([y for _, y in train]))
    best = _lsq._loss(optimum, train)

    settings = {**asdict(shape), "seed": seed, "scale_grid": None, "search": family}
    folder = cache_folder(cache, "lsq", settings)
    base = folder / "base.safetensors"
    models = []
    for i, (a, y) in enumerate(train):
        path = folder / f"task{i}.safetensors"
        if not path.exists():
            w = _lsq._ols(a, y) if solver == "ols" else _lsq._ridge_from(a, y, w0, shape.ridge)
            save_checkpoint(_lsq._to_state(w), path)
        models.append(str(path))
    if not base.exists():
        save_checkpoint(_lsq._to_state(w0), base)

    def score(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        w = _lsq._from_state(dict(state))
        each = {f"val_loss:task{i}": _lsq._loss(w, [part]) for i, part in enumerate(val)}
        return {
            "val_loss": _lsq._loss(w, val),
            "loss_ratio": _lsq._loss(w, train) / best,
            **each,
        }

    return Suite({"base": str(base), "models": models}, score, {"val_loss": "min"})


def digits(
    *, cache: Path, size: str = "tiny", scenario: str = "a_equal_budget", seed: int = 0
) -> Suite:
    """One scenario of `nanmerge bench digits` (its checkpoints, cached alike).

    Metrics: `val_acc` (mean accuracy over tasks on the validation split, each task with its
    own head), `val_acc:TASK` per task, and `test_acc` (the bench's score, on the test split).
    """
    _pick("size", size, DIGITS_SIZES)
    _pick("scenario", scenario, SCENARIOS)
    shape = DIGITS_SIZES[size]
    problem = build(shape, scenario, seed, cache, None)

    def score(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        val = accuracies(shape, dict(state), problem.heads, problem.val)
        test = accuracies(shape, dict(state), problem.heads, problem.test)
        return {
            "val_acc": sum(val.values()) / len(val),
            "test_acc": sum(test.values()) / len(test),
            **{f"val_acc:{k}": v for k, v in val.items()},
        }

    entries = [str(p) for p in problem.models.models]
    return Suite({"base": str(problem.models.base), "models": entries}, score, {"val_acc": "max"})

"""The `lsq` suite: NAN's own least-squares derivation, checked exactly.

K linear-regression tasks share structure and differ in sample count n_i. The joint optimum
has a closed form, so each merge is scored by its joint training loss relative to it. Two
families of per-task solutions show when the premise holds: plain least squares (estimation
noise dominates, so ||theta_i|| shrinks with n_i) and ridge fine-tuning from a shared
pretrained solution (shrinkage makes small-data task vectors small, reversing the ranking).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanmerge.bench import _data_informed
from nanmerge.bench._checkpoints import ModelSet, cache_folder, save_checkpoint
from nanmerge.bench._evaluate import problem_info
from nanmerge.bench._merging import (
    COEFFICIENTS,
    DEMO_METHODS,
    UNIFORM,
    State,
    merge_methods,
    sweep,
    sweep_size,
)
from nanmerge.learn import save_statistics

# family -> (noise multiplier, solver): `ols_noisy` is the regime where the derivation's
# premise should hold best (estimation noise dominates the spread of the true solutions).
FAMILIES = {"ols": (1.0, "ols"), "ols_noisy": (4.0, "ols"), "ridge": (1.0, "ridge")}
INTRO = (
    "K linear-regression tasks share structure and have very different sample counts n_i. "
    "`ols` models are per-task least squares (no shrinkage); `ols_noisy` the same with 4x the "
    "target noise, so estimation noise dominates the norms (the premise's best case); `ridge` "
    "models are fine-tuned "
    "from a shared pretrained solution with ridge shrinkage toward it (the closed-form stand-in "
    "for fine-tuning). Each output's weights, bias last (the weight of a constant feature), are "
    "one tensor, so `/tensor` coefficients are per output. "
    "The metric is the joint training loss over all tasks' data divided by "
    "the closed-form joint optimum's (1.000 = optimal). `oracle n_i` uses manual weights "
    "n_i / mean n, the weights the derivation calls optimal for isotropic features."
)
METRIC = "loss_ratio"


@dataclass(frozen=True)
class LsqSize:
    tasks: int
    dim: int
    outputs: int
    n_min: int
    n_max: int
    noise: float
    task_spread: float
    ridge: float
    pretrain_n: int
    scale_grid: tuple[float, ...]
    # the methods scored (None: every registered one that merges `tasks` models)
    methods: tuple[str, ...] | None = None


_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
SIZES = {
    "tiny": LsqSize(4, 6, 2, 20, 2000, 2.0, 0.5, 50.0, 300, (0.1, 0.3)),
    "demo": LsqSize(6, 10, 3, 20, 2000, 2.0, 0.5, 50.0, 500, _GRID, DEMO_METHODS),
    "full": LsqSize(8, 10, 3, 20, 2000, 2.0, 0.5, 50.0, 500, _GRID),
}


@dataclass
class _Part:
    """Inputs, noise-free targets and unit noise, so each family can set its own noise level."""

    a: np.ndarray
    clean: np.ndarray
    eps: np.ndarray

    def targets(self, noise: float) -> tuple[np.ndarray, np.ndarray]:
        return self.a, self.clean + noise * self.eps


def _augment(x: np.ndarray) -> np.ndarray:
    """Append the constant feature: the bias is the last input column of every weight."""
    return np.hstack([x, np.ones((len(x), 1))])


def _sample(rng: np.random.Generator, w: np.ndarray, n: int, size: LsqSize) -> _Part:
    a = _augment(rng.standard_normal((n, size.dim)))
    return _Part(a, a @ w, rng.standard_normal((n, size.outputs)))


def data_sizes(size: LsqSize) -> tuple[int, ...]:
    return tuple(round(v) for v in np.geomspace(size.n_min, size.n_max, size.tasks))


def _ols(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(a, y, rcond=None)[0]


def _ridge_from(a: np.ndarray, y: np.ndarray, w0: np.ndarray, lam: float) -> np.ndarray:
    """argmin ||a w - y||^2 + lam ||w - w0||^2: the closed-form stand-in for fine-tuning."""
    return np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y + lam * w0)


def _head(k: int) -> str:
    return f"heads.{k}.weight"


def _to_state(w: np.ndarray) -> dict[str, torch.Tensor]:
    """One (1, dim + 1) tensor per output, bias last: each tensor's input is the whole
    augmented feature vector, so a per-tensor RegMean solves the joint normal equations,
    and per-tensor coefficients still have several tensors to tell apart."""
    return {
        _head(k): torch.tensor(w[:, k][None, :], dtype=torch.float32) for k in range(w.shape[1])
    }


def _from_state(state: State) -> np.ndarray:
    return np.hstack([state[_head(k)].double().numpy().T for k in range(len(state))])


def _loss(w: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean squared error over the pooled data: the joint objective of the derivation."""
    total = sum(float(np.sum((a @ w - y) ** 2)) for a, y in parts)
    return total / sum(len(a) for a, _ in parts)


def run_seed(
    size: LsqSize, seed: int, cache_dir: Path, bar: tqdm | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (one per family x method x coefficients x scale mode) and per-family diagnostics."""
    rng = np.random.default_rng([seed, 1])
    shared = rng.standard_normal((size.dim + 1, size.outputs))
    w0 = _ols(*_sample(rng, shared, size.pretrain_n, size).targets(size.noise))
    sizes = data_sizes(size)
    parts = []
    for n in sizes:
        w_true = shared + size.task_spread * rng.standard_normal(shared.shape)
        parts.append((_sample(rng, w_true, n, size), _sample(rng, w_true, n, size)))

    folder = cache_folder(cache_dir, "lsq", {**asdict(size), "seed": seed, "scale_grid": None})
    base_path = folder / "base.safetensors"
    save_checkpoint(_to_state(w0), base_path)
    names = tuple(f"task{i}" for i in range(len(sizes)))
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    for family, (multiplier, solver) in FAMILIES.items():
        noise = size.noise * multiplier
        train = [t.targets(noise) for t, _ in parts]
        val = [v.targets(noise) for _, v in parts]
        optimum = _ols(np.vstack([a for a, _ in train]), np.vstack([y for _, y in train]))
        best_loss = _loss(optimum, train)
        paths = []
        for name, (a, y) in zip(names, train, strict=True):
            w = _ols(a, y) if solver == "ols" else _ridge_from(a, y, w0, size.ridge)
            path = folder / family / f"{name}.safetensors"
            save_checkpoint(_to_state(w), path)
            paths.append(path)
        models = ModelSet(base_path, tuple(paths), sizes, names)

        def validate(state: State, val: list[tuple[np.ndarray, np.ndarray]] = val) -> float:
            return -_loss(_from_state(state), val)

        def test(
            state: State,
            train: list[tuple[np.ndarray, np.ndarray]] = train,
            best: float = best_loss,
        ) -> dict[str, float]:
            return {METRIC: _loss(_from_state(state), train) / best}

        methods = merge_methods(size.tasks, size.methods)
        family_rows = sweep(models, methods, size.scale_grid, seed, validate, test, bar)
        family_rows += _regmean_rows(models, train, seed, validate, test, bar)
        family_rows.append(_fixed_row("joint optimum", 1.0))
        family_rows.append(_fixed_row("pretrained", _loss(w0, train) / best_loss))
        for row in family_rows:
            row.update(problem=family, seed=seed)
        rows.extend(family_rows)
        infos.append({"problem": family, "seed": seed, **problem_info(models)})
    return rows, infos


def _regmean_rows(
    models: ModelSet,
    train: list[tuple[np.ndarray, np.ndarray]],
    seed: int,
    validate: Callable[[State], float],
    test: Callable[[State], dict[str, float]],
    bar: tqdm | None,
) -> list[dict[str, Any]]:
    """RegMean (alpha 1) from each task's Gram A_i^T A_i of its augmented features (constant
    included), the input of every head: its solve is the joint normal equations, so for
    per-task least-squares models it is the joint optimum up to rounding."""
    with tempfile.TemporaryDirectory(prefix="nanmerge-statistics-") as folder:
        grams = []
        for name, (a, y) in zip(models.names, train, strict=True):
            gram = torch.tensor(a.T @ a, dtype=torch.float32)
            stats = {_head(k): gram.clone() for k in range(y.shape[1])}
            path = Path(folder) / f"{name}.gram.safetensors"
            grams.append(save_statistics(stats, path, kind="gram"))
        return _data_informed.rows(
            models, {"regmean": grams}, seed, validate, test, bar, {"regmean": {"alpha": 1.0}}
        )


def regmean_note(summary: list[dict[str, Any]]) -> list[str]:
    """RegMean's gap to the joint optimum, in digits the 3-decimal tables round away."""
    gaps = [
        f"{r['problem']} {r['mean'] - 1:+.1e} ± {r['std']:.1e}"
        for r in summary
        if r["method"].startswith("regmean") and r["coefficients"] == UNIFORM
    ]
    if not gaps:
        return []
    return [
        "RegMean (uniform coefficients) against the joint optimum, loss ratio − 1 (mean ± std "
        f"over seeds): {'; '.join(gaps)}. Each `ols` model is its own task's least-squares "
        "solution, so RegMean's solve is the joint normal equations and what remains is rounding; "
        "`ridge` models are shrunk toward the pretrained solution, which a Gram-weighted mean "
        "does not undo."
    ]


def _fixed_row(label: str, ratio: float) -> dict[str, Any]:
    return {
        "method": label,
        "coefficients": "-",
        "scale_mode": "-",
        "scale": None,
        "val": float("nan"),
        METRIC: ratio,
    }


def merges_per_seed(size: LsqSize) -> int:
    methods = merge_methods(size.tasks, size.methods)
    return len(FAMILIES) * (sweep_size(methods, size.scale_grid) + len(COEFFICIENTS))

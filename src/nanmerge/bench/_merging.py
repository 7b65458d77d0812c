"""Every method x coefficient variant, merged through the public API, with the scale fairness rule.

For methods with a global `scale`, a NAN gain must be separated from a gain that any change of
global scale would give; so each is reported at its published default and at the best scale
chosen on validation data, for uniform and NAN alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

import nanmerge
from nanmerge._types import Coefficients
from nanmerge.bench._checkpoints import ModelSet

UNIFORM = "uniform"
ORACLE = "oracle n_i"
# Suffix of a two-model method's label (slerp): its scores cover those two tasks only.
PAIR_LABEL = "(2 tasks: fewest & most data, scored on those 2)"
# LiNeS rows: these methods with `lines`, labelled method + LINES, their beta tuned.
LINES = " + LiNeS"
LINES_METHODS = ("task_arithmetic", "ties")


# The methods `make demo` scores (the full suites score every registered method): the
# published baselines and one of each later family, so the demo stays within minutes.
DEMO_METHODS = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "slerp",
    "tsv",
    "iso_c",
    "consensus",
    "magmax",
)


def _nan(norm_of: str, granularity: str) -> dict[str, str]:
    return {
        "estimator": "nan",
        "norm_of": norm_of,
        "granularity": granularity,
        "convention": "mean_one",
    }


NAN_VARIANTS: dict[str, dict[str, str]] = {
    "nan theta/model": _nan("finetuned", "model"),
    "nan theta/tensor": _nan("finetuned", "tensor"),
    "nan tau/model": _nan("task_vector", "model"),
    "nan tau/tensor": _nan("task_vector", "tensor"),
}
COEFFICIENTS: tuple[str, ...] = (UNIFORM, *NAN_VARIANTS, ORACLE)

State = dict[str, torch.Tensor]
Scores = dict[str, float]


def recipe(
    models: ModelSet,
    method: str,
    coefficients: str,
    params: Mapping[str, Any],
    seed: int,
    lines: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The recipe dict a user would write; the oracle uses manual weights n_i / mean n."""
    entries: list[dict[str, Any]] = [{"path": str(p)} for p in models.models]
    coef_spec: Any = NAN_VARIANTS.get(coefficients, coefficients)
    if coefficients == ORACLE:
        mean_n = sum(models.data_sizes) / len(models.data_sizes)
        for entry, n in zip(entries, models.data_sizes, strict=False):
            entry["coefficient"] = n / mean_n
        coef_spec = "manual"
    return {
        "base": str(models.base),
        "models": entries,
        "method": method,
        "parameters": dict(params),
        "coefficients": coef_spec,
        "seed": seed,
        **({} if lines is None else {"lines": dict(lines)}),
    }


def merge_state(recipe: Mapping[str, Any]) -> State:
    """The merged state dict, in memory: a recipe without `output` writes nothing (so what a
    method keeps beside the model, EMR's masks, is dropped: the suites score the merge)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the method kept", category=UserWarning)
        result = nanmerge.merge(recipe)
    return {k: v for k, v in result.items()}


def estimate(models: ModelSet, coefficients: str) -> Coefficients:
    """The coefficients alone; the method only has to be one that accepts a base and M models."""
    return nanmerge.estimate_coefficients(
        recipe(models, "task_arithmetic", coefficients, {}, seed=0)
    )


def merge_methods(tasks: int, only: Sequence[str] | None = None) -> list[str]:
    """Every registered method (or those of `only`) that merges this many models and needs
    no data statistics (those run after their statistics are computed)."""
    return [
        name
        for name, spec in nanmerge.METHODS.items()
        if spec.min_models <= tasks
        and (spec.max_models is None or spec.max_models >= tasks)
        and not spec.statistics
        and (only is None or name in only)
    ]


def coefficient_variants(method: str) -> tuple[str, ...]:
    """The coefficient variants a method is scored with: uniform alone for one that has no
    coefficient slot (it refuses coefficients)."""
    return COEFFICIENTS if nanmerge.METHODS[method].takes_coefficients else (UNIFORM,)


def method_params(method: str) -> dict[str, Any]:
    """The method's published defaults, as the registry states them."""
    return dict(nanmerge.METHODS[method].params)


def sweep(
    models: ModelSet,
    methods: Sequence[str],
    scale_grid: Sequence[float],
    seed: int,
    validate: Callable[[State], float],
    test: Callable[[State], Scores],
    bar: tqdm | None = None,
) -> list[dict[str, Any]]:
    """Rows for each method x coefficient variant; `validate` is higher-is-better.

    The best scale is chosen by `validate` alone; `test` is computed for every grid point only
    so that the chosen point can be reported without merging twice.
    """
    rows: list[dict[str, Any]] = []
    for method in methods:
        params = method_params(method)
        for coef in coefficient_variants(method):
            if "scale" not in params:
                state = merge_state(recipe(models, method, coef, params, seed))
                rows.append(_row(method, coef, "-", None, validate(state), test(state)))
                _tick(bar)
                continue
            default = float(params["scale"])
            scored: list[tuple[float, float, Scores]] = []
            for scale in sorted({default, *scale_grid}):
                scaled = {**params, "scale": scale}
                state = merge_state(recipe(models, method, coef, scaled, seed))
                scored.append((scale, validate(state), test(state)))
                _tick(bar)
            at_default = next(s for s in scored if s[0] == default)
            best = max(scored, key=lambda s: s[1])
            rows.append(_row(method, coef, "default", *at_default))
            rows.append(_row(method, coef, "best", *best))
    return rows


def lines_sweep(
    models: ModelSet,
    beta_grid: Sequence[float],
    seed: int,
    validate: Callable[[State], float],
    test: Callable[[State], Scores],
    bar: tqdm | None = None,
) -> list[dict[str, Any]]:
    """LiNeS on top of task arithmetic and TIES, with the paper's multi-task alpha and the
    beta chosen on validation for every coefficient variant alike (the fairness rule, with
    beta as the tuned knob in place of the scale it replaces)."""
    rows: list[dict[str, Any]] = []
    for method in LINES_METHODS:
        params = {k: v for k, v in method_params(method).items() if k != "scale"}
        for coef in COEFFICIENTS:
            scored: list[tuple[float, float, Scores]] = []
            for beta in beta_grid:
                lines = {"beta": beta}
                state = merge_state(recipe(models, method, coef, params, seed, lines))
                scored.append((beta, validate(state), test(state)))
                _tick(bar)
            best = max(scored, key=lambda s: s[1])
            rows.append(_row(method + LINES, coef, "best", *best))
    return rows


def sweep_size(methods: Sequence[str], scale_grid: Sequence[float]) -> int:
    """How many merges `sweep` runs, for the progress bar."""
    total = 0
    for method in methods:
        params = method_params(method)
        points = len({float(params["scale"]), *scale_grid}) if "scale" in params else 1
        total += points * len(coefficient_variants(method))
    return total


def _tick(bar: tqdm | None) -> None:
    if bar is not None:
        bar.update(1)


def _row(
    method: str, coef: str, scale_mode: str, scale: float | None, val: float, scores: Scores
) -> dict[str, Any]:
    return {
        "method": method,
        "coefficients": coef,
        "scale_mode": scale_mode,
        "scale": scale,
        "val": val,
        **scores,
    }

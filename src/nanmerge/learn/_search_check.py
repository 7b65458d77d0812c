"""What a search spec is checked for before Ray starts: the recipes its space makes.

Each method, each estimator choice and both ends of each range are checked as the recipe a
trial with those values merges, so a bad space costs no trial and every problem is listed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nanmerge._types import MergeError
from nanmerge.learn._search_spec import (
    COEFFICIENTS,
    LAYER,
    METHOD,
    MODEL,
    PARAM,
    SearchSpec,
    trial_recipe,
)


def accepts(method: str) -> frozenset[str]:
    from nanmerge.methods import METHODS

    spec = METHODS.get(method)
    return frozenset(spec.signature.annotations) if spec else frozenset()


def check_space(spec: SearchSpec, models: Mapping[str, Any]) -> None:
    """Every problem of the space at once, before any trial: each method, each estimator
    choice and both ends of each range are checked as the recipes they make."""
    from nanmerge.config import load_recipe
    from nanmerge.engine import check_recipe, plan
    from nanmerge.methods import get_method

    problems: list[str] = []
    methods = spec.space.method.choice if spec.space.method else [spec.recipe.get("method")]
    known: list[tuple[str, dict[str, Any]]] = []  # (method, the config entry that picks it)
    for i, name in enumerate(methods or []):
        try:
            get_method(str(name))
        except MergeError as exc:
            problems.append(f"space.method: {exc}")
            continue
        known.append((str(name), {METHOD: i} if spec.space.method else {}))
    taken = set().union(*(accepts(m) for m, _ in known))
    named = {**spec.recipe.get("parameters", {}), **spec.space.parameters}
    for param in sorted(set(named) - taken) if known else []:
        which = ", ".join(m for m, _ in known)
        problems.append(f"parameter {param!r}: no method searched takes it ({which})")

    cases = [(f"method {m}", picked) for m, picked in known]
    for name, dim in spec.space.parameters.items():
        cases += [
            (f"parameters.{name}={dim.value(raw)} with {m}", {**picked, PARAM + name: raw})
            for m, picked in known
            if name in accepts(m)
            for raw in dim.ends()
        ]
    first = known[0][1] if known else {}
    if spec.space.coefficients is not None:
        dim = spec.space.coefficients
        cases += [(f"coefficients={dim.value(i)}", {**first, COEFFICIENTS: i}) for i in dim.ends()]
    count = len(models.get("models", []))
    per_model = spec.space.model_coefficients
    ends = per_model.ends() if per_model is not None else []
    layered = spec.space.layer_coefficients
    knots = layered.knots if layered is not None else 0
    lo, hi = (layered.ends()[0], layered.ends()[-1]) if layered is not None else (None, None)
    fill = {**_all_models(ends[:1], count), **_all_knots([lo] * knots, count)}
    cases = [(label, {**fill, **config}) for label, config in cases]
    cases += [(f"model_coefficients={v}", {**first, **_all_models([v], count)}) for v in ends]
    # one schedule over both ends (first knot at one, the rest at the other): the engine's
    # plan opens the inputs' names and refuses it on a model without numbered blocks
    if layered is not None:
        values = [lo] + [hi] * (knots - 1)
        cases.append(
            (f"layer_coefficients=[{lo}, {hi}, ...]", {**first, **_all_knots(values, count)})
        )
    for label, config in cases if known else []:
        try:
            recipe = load_recipe(trial_recipe(spec, config, models, accepts))
            if label.startswith("layer_coefficients"):
                plan(recipe, for_output=False).close()
            else:
                check_recipe(recipe, for_output=False)
        except MergeError as exc:
            lines = [ln.strip(" -") for ln in str(exc).splitlines()]
            problems.append(f"{label}: {'; '.join(ln for ln in lines[1:] or lines if ln)}")
    if problems:
        listed = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        raise MergeError(f"the search space is refused ({len(problems)} problem(s)):\n{listed}")


def _all_models(value: list[Any], count: int) -> dict[str, Any]:
    """Config entries giving every model the one value in `value` (none when it is empty)."""
    return {f"{MODEL}{i}": v for v in value for i in range(count)}


def _all_knots(values: list[Any], count: int) -> dict[str, Any]:
    """Config entries giving every model the schedule `values` (none when it is empty)."""
    return {f"{LAYER}{i}:{k}": v for i in range(count) for k, v in enumerate(values)}


def expected_trials(spec: SearchSpec, models: int) -> int | None:
    """How many trials the search runs (None: as many as the time budget allows); a grid
    that the trial budget would cut is refused here, before any trial."""
    if spec.strategy != "grid":
        return spec.budget.trials
    points = math.prod(len(d.grid()) for d in spec.dimensions(models).values())
    if spec.budget.trials is not None and spec.budget.trials < points:
        raise MergeError(
            f"the grid has {points} points but budget.trials is {spec.budget.trials}; raise it, "
            "drop it, or use strategy random"
        )
    return points

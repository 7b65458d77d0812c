"""The checks a recipe needs before any input is opened: method, parameters, estimator.

They import no torch, so the CLI answers a misspelt method or parameter in a fraction of a
second; `plan` runs them again with the input checks to list every problem at once.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from nanmerge._types import MergeError
from nanmerge.coefficients import get_estimator
from nanmerge.config import Recipe
from nanmerge.io import parse_size
from nanmerge.methods import check_params, count_problem, get_method


def fail(problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise MergeError(f"the recipe cannot be merged ({len(problems)} problem(s)):\n{listed}")


def bind_options(fn: Callable[..., Any], options: Mapping[str, Any], what: str) -> list[str]:
    """Check options against the keyword-only parameters of `fn`: names and types, all at once."""
    hints = inspect.get_annotations(fn, eval_str=True)
    fields: dict[str, Any] = {
        name: (hints.get(name, Any), p.default if p.default is not p.empty else ...)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    problems = []
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            valid = ", ".join(fields) or "none"
            problems.append(f"{what}: unknown option '{key}'{hint}; valid options: {valid}")
    known = {k: v for k, v in options.items() if k in fields}
    model = create_model(f"{what}_options", __config__=ConfigDict(strict=False), **fields)
    try:
        model.model_validate(known)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "missing" and err["loc"][0] not in known:
                continue
            problems.append(f"{what}: option '{err['loc'][0]}': {err['msg']}")
    return problems


def resolve_estimator(recipe: Recipe, problems: list[str]) -> tuple[Any, dict[str, Any]]:
    try:
        spec = get_estimator(recipe.coefficients.estimator)
    except MergeError as exc:
        problems.append(str(exc))
        return None, {}
    options = recipe.coefficients.options
    if spec.name == "manual":
        if "values" in options:
            problems.append(
                "coefficients: manual reads each model's `coefficient`; remove the `values` option"
            )
        missing = [str(i) for i, m in enumerate(recipe.models) if m.coefficient is None]
        if missing:
            problems.append(
                f"coefficients: manual needs a `coefficient` on every model; models "
                f"{', '.join(missing)} have none"
            )
        options = {"values": [m.coefficient for m in recipe.models], **options}
    elif any(m.coefficient is not None for m in recipe.models):
        problems.append(
            f"models carry a `coefficient` but coefficients is '{spec.name}'; "
            "set `coefficients: manual` to use them, or remove them"
        )
    fn_options = {k: v for k, v in options.items() if k != "values" or spec.name != "manual"}
    problems += bind_options(spec.fn, fn_options, f"estimator '{spec.name}'")
    if spec.name == "nan" and options.get("norm_of") == "task_vector" and recipe.base is None:
        problems.append("coefficients: nan with norm_of: task_vector needs a `base` model")
    return spec, options


def resolve_method(recipe: Recipe, problems: list[str]) -> tuple[Any, dict[str, Any]]:
    try:
        spec = get_method(recipe.method)
    except MergeError as exc:
        problems.append(str(exc))
        return None, {}
    problems += check_params(spec, recipe.parameters)
    count = count_problem(spec, len(recipe.models))
    if count:
        problems.append(count)
    if spec.needs_base and recipe.base is None:
        problems.append(
            f"method '{spec.name}' adds task vectors (model - base) and needs `base`: "
            "the pretrained model the others were fine-tuned from"
        )
    return spec, {**spec.params, **recipe.parameters}


def check_shard_size(recipe: Recipe, problems: list[str]) -> None:
    """A size the writer cannot read fails here, before the norm pass, not after it."""
    try:
        parse_size(recipe.max_shard_size)
    except MergeError as exc:
        problems.append(f"max_shard_size: {exc}")


def check_recipe(recipe: Recipe, *, for_output: bool = True) -> None:
    """Raise one MergeError listing every problem the recipe has on its own, before any
    input is opened."""
    problems: list[str] = []
    resolve_method(recipe, problems)
    resolve_estimator(recipe, problems)
    if for_output:
        check_shard_size(recipe, problems)
    fail(problems)

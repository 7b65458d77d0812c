"""The checks a recipe needs before any input is opened: method, parameters, estimator.

They import no torch, so the CLI answers a misspelt method or parameter in a fraction of a
second; `plan` runs them again with the input checks to list every problem at once.
"""

from __future__ import annotations

from typing import Any

from nanmerge._types import MergeError
from nanmerge.coefficients import RecipeFacts, check_options, get_estimator
from nanmerge.config import Recipe
from nanmerge.io import parse_size
from nanmerge.methods import check_params, count_problem, get_method


def fail(problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise MergeError(f"the recipe cannot be merged ({len(problems)} problem(s)):\n{listed}")


def resolve_estimator(recipe: Recipe, problems: list[str]) -> tuple[Any, dict[str, Any]]:
    try:
        spec = get_estimator(recipe.coefficients.estimator)
    except MergeError as exc:
        problems.append(str(exc))
        return None, {}
    options = recipe.coefficients.options
    facts = RecipeFacts(
        has_base=recipe.base is not None,
        coefficients=tuple(m.coefficient for m in recipe.models),
    )
    problems += check_options(spec, options, facts)
    if spec.reads_coefficients is not None:
        options = {spec.reads_coefficients: list(facts.coefficients), **options}
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

"""The checks a recipe needs before any input is opened: method, parameters, estimator.

They import no torch, so the CLI answers a misspelt method or parameter in a fraction of a
second; `plan` runs them again with the input checks to list every problem at once.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from nanmerge._types import MergeError
from nanmerge.coefficients import RecipeFacts, check_options, get_estimator
from nanmerge.config import CoefficientSpec, Recipe
from nanmerge.engine._layered import (
    coefficient_problems,
    model_parameter_problems,
    parameter_problems,
)
from nanmerge.io import parse_size
from nanmerge.methods import MethodSpec, count_problem, get_method
from nanmerge.methods._registry import count_rule_problems


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
    # a varying coefficient is 1.0 here and its values multiply per tensor (engine/_layered.py)
    facts = RecipeFacts(
        has_base=recipe.base is not None,
        coefficients=tuple(
            1.0 if isinstance(c, list | dict) else c for c in (m.coefficient for m in recipe.models)
        ),
    )
    problems += check_options(spec, options, facts) + coefficient_problems(recipe)
    if spec.reads_coefficients is not None:
        options = {spec.reads_coefficients: list(facts.coefficients), **options}
    return spec, options


def resolve_method(recipe: Recipe, problems: list[str]) -> tuple[Any, dict[str, Any]]:
    try:
        spec = get_method(recipe.method)
    except MergeError as exc:
        problems.append(str(exc))
        return None, {}
    problems += parameter_problems(spec, recipe.parameters)
    problems += model_parameter_problems(spec, recipe)
    if recipe.slices is None:  # with slices, each slice's sources are what is merged
        has_base = recipe.base is not None
        problems += _input_problems(spec, len(recipe.models), has_base, recipe.parameters)
        problems += _coefficient_problems(spec, asked=_asks_coefficients(recipe))
    return spec, {**spec.params, **recipe.parameters}


def _asks_coefficients(recipe: Recipe) -> bool:
    """Whether the recipe sets coefficients: another estimator than the default, or any."""
    default = CoefficientSpec.model_fields["estimator"].default
    return recipe.coefficients.estimator != default or any(
        m.coefficient is not None for m in recipe.models
    )


def _coefficient_problems(spec: MethodSpec, *, asked: bool) -> list[str]:
    """A method with no coefficient slot refuses coefficients rather than ignore them."""
    if spec.takes_coefficients or not asked:
        return []
    return [
        f"method '{spec.name}' has no coefficient slot (it copies or selects entries rather "
        "than weighing models), so coefficients would be "
        "ignored; remove `coefficients` and any `coefficient`"
    ]


def _input_problems(
    spec: MethodSpec, count: int, has_base: bool, params: dict[str, Any]
) -> list[str]:
    """Whether `count` models (with or without a base) are what `spec` merges, with
    `params` (its rule tying them to the model count, such as consensus's k <= M)."""
    problems = [p for p in [count_problem(spec, count)] if p]
    problems = problems or count_rule_problems(spec, params, count)
    if spec.needs_base and not has_base:
        problems.append(
            f"method '{spec.name}' adds task vectors (model - base) and needs `base`: "
            "the pretrained model the others were fine-tuned from"
        )
    return problems


def resolve_slices(recipe: Recipe, problems: list[str]) -> list[tuple[MethodSpec, dict[str, Any]]]:
    """Each slice's method and parameters (the recipe's, updated by the slice's own, where
    the slice names no method), checked against the slice's sources."""
    resolved = []
    for i, piece in enumerate(recipe.slices or []):
        name = piece.method or recipe.method
        params = piece.parameters if piece.method else {**recipe.parameters, **piece.parameters}
        try:
            spec = get_method(name)
        except MergeError as exc:
            problems.append(f"slices[{i}]: {exc}")
            continue
        found = parameter_problems(spec, params)
        found += _input_problems(spec, len(piece.sources), recipe.base is not None, params)
        if spec.collect_for(params) is not None or spec.statistics:
            found.append(f"method '{name}' reads whole-model statistics, which slices do not have")
        given = any(s.coefficient is not None for s in piece.sources)
        asked = given or (_asks_coefficients(recipe) and not _needs_norms(recipe))
        found += _coefficient_problems(spec, asked=asked)
        problems += [f"slices[{i}] ({len(piece.sources)} source(s)): {p}" for p in found]
        resolved.append((spec, {**spec.params, **params}))
    if recipe.slices is not None and _needs_norms(recipe):
        problems.append(
            f"coefficients: {recipe.coefficients.estimator} reads each model's norms over all "
            "its tensors, but slices take only some layers of each model; use uniform or "
            "manual, or give sources a `coefficient`"
        )
    return resolved


def _needs_norms(recipe: Recipe) -> bool:
    try:
        spec = get_estimator(recipe.coefficients.estimator)
    except MergeError:
        return False  # reported by resolve_estimator
    return spec.needs(recipe.coefficients.options) != "none"


def check_shard_size(recipe: Recipe, problems: list[str]) -> None:
    """A size the writer cannot read fails here, before the norm pass, not after it."""
    try:
        parse_size(recipe.max_shard_size)
    except MergeError as exc:
        problems.append(f"max_shard_size: {exc}")


def check_ray(recipe: Recipe) -> None:
    """What a merge on Ray (`ray: true`, engine/_ray.py) cannot do, refused before any input
    is opened; one line when Ray is not installed."""
    if not recipe.ray:
        if recipe.address is not None:
            fail(["address names the Ray cluster of ray: true (--ray); set ray, or drop address"])
        return
    if importlib.util.find_spec("ray") is None:
        raise MergeError(
            "ray: true (--ray) needs Ray, which is not installed: pip install 'nanmerge[ray]'"
        )
    paths = [recipe.base, *(m.path for m in recipe.models)]
    refused = [
        (recipe.output is None, "writes the shards into an output folder: set output"),
        (
            recipe.output_format == "lora",
            "writes full checkpoints, not a LoRA adapter: drop output_format: lora or ray",
        ),
        (recipe.slices is not None, "does not merge slices yet: merge them without ray"),
        (
            any(p is not None and not isinstance(p, str) for p in paths),
            "reads the checkpoints from storage in each task, not in-memory models: save "
            "them as safetensors first",
        ),
        (
            recipe.device != "cpu",
            f"merges on the workers' CPUs: drop device: {recipe.device} or ray",
        ),
    ]
    fail([f"ray: true {what}" for bad, what in refused if bad])


def check_recipe(recipe: Recipe, *, for_output: bool = True) -> None:
    """Raise one MergeError listing every problem the recipe has on its own, before any
    input is opened."""
    if for_output:
        check_ray(recipe)
    problems: list[str] = []
    resolve_method(recipe, problems)
    resolve_slices(recipe, problems)
    resolve_estimator(recipe, problems)
    if for_output:
        check_shard_size(recipe, problems)
    fail(problems)

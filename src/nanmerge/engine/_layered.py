"""Recipe values that vary by layer, role or name, resolved for every tensor before any read.

A method parameter, a model's `coefficient` (with `coefficients: manual`) or the
coefficients' `multiplier` may be a schedule or a filter list (`nanmerge._schedule`). The
recipe check tests each one's extreme values against the parameter's constraint; the plan
then resolves every merged tensor's values from its context, which is where a schedule
without layers, a tensor no filter matches, or a rule tying parameters together fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nanmerge._schedule import (
    Setting,
    Unmatched,
    extremes,
    is_number,
    needs_layers,
    parse,
    value_at,
    varies,
)
from nanmerge._types import Coefficients, TensorContext
from nanmerge.config import Recipe
from nanmerge.methods import MethodSpec, check_params

_SHOWN = 3


@dataclass(frozen=True)
class LayerValues:
    """Per merged tensor: the value of each varying parameter, and each model's
    coefficient multiplier (only when some coefficient varies)."""

    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    multipliers: dict[str, tuple[float, ...]] = field(default_factory=dict)


def _settings(values: Mapping[str, Any], prefix: str) -> dict[str, Setting]:
    """The varying values among `values`, parsed (their problems are the recipe check's)."""
    return {key: parse(v, f"{prefix}{key}", []) for key, v in values.items() if varies(v)}


def parameter_problems(spec: MethodSpec, parameters: Mapping[str, Any]) -> list[str]:
    """`check_params` for parameters that may vary: each varying one is checked at its
    smallest and largest value (every interpolated value lies between them) and at each
    non-numeric value; rules tying parameters together are checked per tensor by the plan."""
    varying = _settings(parameters, "")
    constants = {k: v for k, v in parameters.items() if k not in varying}
    problems = check_params(spec, constants)
    for name, setting in varying.items():
        for value in extremes(setting):
            problems += [
                f"{p} (a value of its schedule or filter list: every value a tensor can get "
                "must be valid)"
                for p in spec.signature.check(spec.name, "parameter", {name: value})
            ]
    return list(dict.fromkeys(problems))


def coefficient_problems(recipe: Recipe) -> list[str]:
    """A varying coefficient must give finite numbers, and only manual coefficients read
    per-model ones (the estimator check says so for constants)."""
    problems = []
    for where, setting in _coefficient_settings(recipe).items():
        bad = [v for v in extremes(setting) if not (is_number(v) and math.isfinite(float(v)))]
        if bad:
            problems.append(f"{where}: every value must be a finite number; got {bad[0]!r}")
    return problems


def _coefficient_settings(recipe: Recipe) -> dict[str, Setting]:
    """Each varying coefficient value by where it is written."""
    values: dict[str, Any] = {
        f"models[{i}].coefficient": m.coefficient for i, m in enumerate(recipe.models)
    }
    values["coefficients.multiplier"] = recipe.coefficients.multiplier
    return _settings(values, "")


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(f"'{n}'" for n in names[:_SHOWN]) + more


def _resolve(
    where: str, setting: Setting, contexts: list[TensorContext], problems: list[str]
) -> dict[str, Any]:
    """The value `setting` gives each tensor; what stops it goes to `problems`."""
    if needs_layers(setting) and all(c.layer is None for c in contexts):
        problems.append(
            f"{where}: a schedule varies over layers, but no tensor is in a numbered block "
            f"(e.g. '{contexts[0].name}'; nanmerge reads layers from names like "
            "model.layers.N.); use one value, or filter by role or name instead"
        )
        return {}
    values, unmatched = {}, []
    for context in contexts:
        try:
            values[context.name] = value_at(setting, context)
        except Unmatched:
            unmatched.append(context.name)
    if unmatched:
        problems.append(
            f"{where}: {len(unmatched)} tensor(s) match no filter and the list has no default: "
            f"{_listed(unmatched)}; add a last entry without `filter`/`role`, {{value: V}}"
        )
    return values


def layer_values(
    recipe: Recipe,
    spec: MethodSpec | None,
    contexts: Mapping[str, TensorContext],
    merged: set[str],
    problems: list[str],
) -> LayerValues:
    """Every merged tensor's varying values, with the problems that stop them."""
    tensors = [c for name, c in contexts.items() if name in merged]
    if spec is None or not tensors:
        return LayerValues()
    params = {} if recipe.slices else param_values(recipe.parameters, spec, tensors, problems)
    multipliers: dict[str, tuple[float, ...]] = {}
    coefficient = _coefficient_settings(recipe)
    if coefficient:
        factors = {w: _resolve(w, s, tensors, problems) for w, s in coefficient.items()}
        shared = factors.pop("coefficients.multiplier", {})
        for c in tensors:
            scale = float(shared.get(c.name, 1.0))
            row = tuple(
                scale * float(factors.get(f"models[{i}].coefficient", {}).get(c.name, 1.0))
                for i in range(len(recipe.models))
            )
            if any(f != 1.0 for f in row):  # a factor of one changes nothing: not reported
                multipliers[c.name] = row
    return LayerValues({n: p for n, p in params.items() if p}, multipliers)


def param_values(
    parameters: Mapping[str, Any],
    spec: MethodSpec,
    tensors: list[TensorContext],
    problems: list[str],
    where: str = "parameters",
) -> dict[str, dict[str, Any]]:
    """Each tensor's value of every varying parameter, checked with the constants wherever
    a rule ties parameters together (once per distinct combination)."""
    varying = _settings(parameters, "")
    per_param = {
        name: _resolve(f"{where}.{name}", s, tensors, problems) for name, s in varying.items()
    }
    params = {
        c.name: {name: v[c.name] for name, v in per_param.items() if c.name in v} for c in tensors
    }
    constants = {k: v for k, v in parameters.items() if k not in varying}
    combos = {tuple(sorted(p.items())): name for name, p in params.items() if p}
    for combo, name in combos.items():
        problems += [
            f"{p} (at tensor '{name}' and others with these values)"
            for p in check_params(spec, {**constants, **dict(combo)})
        ]
    return {n: p for n, p in params.items() if p}


def with_multipliers(coefficients: Coefficients, layered: LayerValues) -> Coefficients:
    """`coefficients` scaled per tensor by the recipe's varying coefficients, on top of any
    multiplier they carry already (a loaded report's)."""
    for name, factors in layered.multipliers.items():
        earlier = coefficients.multiplier.get(name, (1.0,) * len(factors))
        coefficients.multiplier[name] = tuple(a * b for a, b in zip(earlier, factors, strict=True))
    return coefficients

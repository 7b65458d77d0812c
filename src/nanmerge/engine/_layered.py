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


def model_parameter_problems(spec: MethodSpec, recipe: Recipe) -> list[str]:
    """Each model's own `parameters`: only the method's per-model ones, each value (every
    value of a schedule or filter list) valid, and none where the method gathers a
    whole-model statistic at one value (TIES' trim_scope: model)."""
    problems = []
    for i, model in enumerate(recipe.models):
        for name, value in model.parameters.items():
            where = f"models[{i}].parameters.{name}"
            if name not in spec.per_model:
                problems.append(
                    f"{where}: method '{spec.name}' takes one `{name}` for every model (its "
                    f"per-model parameters: {', '.join(spec.per_model) or 'none'}); set it in "
                    "the recipe's `parameters`"
                )
                continue
            values = extremes(parse(value, where, [])) if varies(value) else [value]
            for v in values:
                problems += [
                    f"{where}: {p}" for p in spec.signature.check(spec.name, "parameter", {name: v})
                ]
    given = sorted({name for m in recipe.models for name in m.parameters})
    constants = {k: v for k, v in recipe.parameters.items() if not varies(v)}
    if given and not problems and spec.collect_for(constants) is not None:
        problems.append(
            f"models' own {', '.join(given)}: method '{spec.name}' gathers a whole-model "
            "statistic with these parameters (trim_scope: model ranks each model's whole task "
            "vector at one value); use trim_scope: tensor, or one value in `parameters`"
        )
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
    for name, values in model_values(recipe, spec, tensors, params, problems).items():
        params[name] = {**params.get(name, {}), **values}
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


def model_values(
    recipe: Recipe,
    spec: MethodSpec,
    tensors: list[TensorContext],
    varying: Mapping[str, Mapping[str, Any]],
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    """Each tensor's per-model parameters: a tuple of one value per model (a model's own
    value, else the recipe's value for the tensor, else the method's default), or one value
    where every model has the same; checked per tensor with the other parameters (once per
    distinct combination), each model's values against rules that tie them together."""
    names = sorted({k for m in recipe.models for k in m.parameters if k in spec.per_model})
    if not names:
        return {}
    own: dict[tuple[int, str], dict[str, Any]] = {}
    for i, model in enumerate(recipe.models):
        for name in names:
            if name not in model.parameters:
                continue
            value, where = model.parameters[name], f"models[{i}].parameters.{name}"
            own[i, name] = (
                _resolve(where, parse(value, where, []), tensors, problems)
                if varies(value)
                else {c.name: value for c in tensors}
            )
    constants = {k: v for k, v in recipe.parameters.items() if not varies(v)}
    values: dict[str, dict[str, Any]] = {}
    checks: dict[str, tuple[str, dict[str, Any]]] = {}
    for c in tensors:
        shared = {**spec.params, **constants, **varying.get(c.name, {})}
        row = {}
        for name in names:
            per = tuple(
                own.get((i, name), {}).get(c.name, shared.get(name))
                for i in range(len(recipe.models))
            )
            row[name] = per[0] if len(set(per)) == 1 else per
        values[c.name] = row
        if any(isinstance(v, tuple) for v in row.values()):
            full = {**constants, **varying.get(c.name, {}), **row}
            checks.setdefault(repr(sorted(full.items())), (c.name, full))
    for name, full in checks.values():
        problems += [
            f"{p} (at tensor '{name}' and others with these values)"
            for p in check_params(spec, full)
        ]
    return values


def with_multipliers(coefficients: Coefficients, layered: LayerValues) -> Coefficients:
    """`coefficients` scaled per tensor by the recipe's varying coefficients, on top of any
    multiplier they carry already (a loaded report's)."""
    for name, factors in layered.multipliers.items():
        earlier = coefficients.multiplier.get(name, (1.0,) * len(factors))
        coefficients.multiplier[name] = tuple(a * b for a, b in zip(earlier, factors, strict=True))
    return coefficients

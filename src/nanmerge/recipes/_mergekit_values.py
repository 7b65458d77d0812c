"""Reading mergekit's values: numbers, gradients (bare lists) and `filter`/`value` lists as
nanmerge's schedules and filter lists, `parameters` mappings and model references."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def gradient(value: Any, what: str, problems: list[str]) -> Any:
    """A single value, or a mergekit gradient (a bare list of numbers) as a schedule."""
    if not isinstance(value, list | tuple):
        return value
    if value and all(is_number(v) for v in value):
        return {"schedule": list(value)}
    problems.append(
        f"gradient parameter {what} {list(value)!r} (only gradients of numbers interpolate)"
    )
    return None


def scalar(value: Any, what: str, problems: list[str]) -> Any:
    """A parameter value as nanmerge writes it: a gradient becomes a schedule and a
    `filter`/`value` list a filter list (mergekit matches `filter` as a part of the name)."""
    if isinstance(value, Mapping):
        value = [value]  # one conditional parameter
    if isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
        entries = []
        for i, entry in enumerate(value):
            unknown = sorted(set(entry) - {"filter", "value"})
            if "value" not in entry or unknown:
                problems.append(f"parameter {what}[{i}]: {dict(entry)!r} is not {{filter, value}}")
                continue
            converted = {"value": gradient(entry["value"], f"{what}[{i}]", problems)}
            if entry.get("filter") is not None:
                converted = {"filter": entry["filter"], **converted}
            entries.append(converted)
        return entries
    return gradient(value, what, problems)


def falls_back(value: Any, fallback: Any) -> Any:
    """`value`, and where it is a filter list, `fallback` for the tensors it leaves
    unmatched: mergekit then reads the next scope (global after per-model) or the default."""
    if not isinstance(value, list) or fallback is None:
        return fallback if value is None else value
    more = fallback if isinstance(fallback, list) else [{"value": fallback}]
    return [*value, *more]


def parameters(value: Any, what: str, problems: list[str]) -> Mapping[str, Any]:
    """A `parameters` mapping (none: empty), or empty with a problem when it is not one."""
    if value is None or isinstance(value, Mapping):
        return value or {}
    problems.append(f"{what} is a {type(value).__name__}, not a mapping of names to values")
    return {}


def model_path(ref: Any, base: Any, problems: list[str]) -> Any:
    """A model reference as a path; mergekit's `base+lora` works when `base` is base_model."""
    if not isinstance(ref, str):
        problems.append(f"model reference {ref!r} (only a path or repo id string is supported)")
        return ref
    if "+" in ref and not Path(ref).exists():
        model, _, lora = ref.partition("+")
        if model == base:
            return lora  # nanmerge reads a LoRA adapter over the recipe's base
        problems.append(
            f"model '{ref}': a LoRA applied to a model other than base_model (nanmerge reads "
            "adapters over the base only)"
        )
    return ref


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def numeric(value: Any) -> bool:
    """Whether every value of a translated setting is a number (schedules always are)."""
    if isinstance(value, list):
        return all(numeric(entry.get("value")) for entry in value)
    return isinstance(value, Mapping) or is_number(value)


def spread(
    name: str, values: list[Any], parameters: dict[str, Any], own: list[dict[str, Any]]
) -> None:
    """One value per model: the recipe's `parameters` when every model has the same, else
    each model's own `parameters` (nanmerge's per-model values)."""
    if len({repr(v) for v in values}) == 1:
        parameters[name] = values[0]
    else:
        for model, value in zip(own, values, strict=True):
            model[name] = value


def fitted_gamma(gamma: Any, density: Any) -> Any:
    """breadcrumbs' gamma as mergekit applies it: where gamma + density > 1 it drops fewer
    outliers (1 - density), for values that do not vary by layer."""
    if is_number(gamma) and is_number(density) and gamma + density > 1:
        return max(0.0, 1.0 - density)
    return gamma

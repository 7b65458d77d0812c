"""Reading mergekit's values: numbers, gradients (bare lists) and `filter`/`value` lists as
nanmerge's schedules and filter lists, `parameters` mappings, model references and slices'
sources; and DELLA's epsilon checked against the density it widens."""

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


def slice_sources(
    piece: Any, where: str, base: Any, problems: list[str]
) -> list[tuple[Any, dict[str, Any], list[int]]]:
    """A mergekit slice's sources as (path, parameters, layer range)."""
    if not isinstance(piece, Mapping) or not isinstance(piece.get("sources"), list):
        problems.append(f"{where} is not a mapping with a `sources` list")
        return []
    unknown = sorted(set(piece) - {"sources", "parameters"})
    if unknown:
        problems.append(f"{where} fields {', '.join(unknown)}")
    sources = []
    for j, src in enumerate(piece["sources"]):
        span = src.get("layer_range") if isinstance(src, Mapping) else None
        if not isinstance(span, list | tuple) or len(span) != 2 or "model" not in src:
            problems.append(f"{where}.sources[{j}] is not {{model, layer_range: [first, end]}}")
            continue
        extra = sorted(set(src) - {"model", "layer_range", "parameters"})
        if extra:
            problems.append(f"{where}.sources[{j}] fields {', '.join(extra)}")
        params = parameters(src.get("parameters"), f"parameters of {where}.sources[{j}]", problems)
        what = f"of {where}.sources[{j}]"
        scalars = {k: scalar(v, f"'{k}' {what}", problems) for k, v in params.items()}
        sources.append((model_path(src["model"], base, problems), scalars, list(span)))
    return sources


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


def value_ranges(setting: Any) -> list[tuple[float, float]]:
    """The lowest and highest value of each piece of a translated setting: a number, a
    schedule (it interpolates between its points), each entry of a filter list that can match."""
    if isinstance(setting, list):
        ends = [i for i, entry in enumerate(setting) if entry.get("filter") is None]
        reached = setting[: ends[0] + 1] if ends else setting  # the first catch-all ends it
        return [span for entry in reached for span in value_ranges(entry.get("value"))]
    if isinstance(setting, Mapping):
        points = [float(v) for v in setting.get("schedule", []) if is_number(v)]
        return [(min(points), max(points))] if points else []
    return [(float(setting), float(setting))] if is_number(setting) else []


def check_epsilon(epsilon: Any, density: Any, model: Any, problems: list[str]) -> None:
    """DELLA's keep probabilities density ± epsilon must lie in (0, 1] wherever a model's
    density is below 1 (at 1 both tools keep every entry and read no epsilon)."""
    dropping = [span for span in value_ranges(density) if span[0] < 1]
    widths = [max(abs(low), abs(high)) for low, high in value_ranges(epsilon)]
    if not dropping or not widths:
        return
    low = min(span[0] for span in dropping) - max(widths)
    high = max(span[1] for span in dropping) + max(widths)
    if low <= 0 or high > 1 + 1e-9:
        problems.append(
            f"density {density!r} with epsilon {epsilon!r} of model {model}: keep probabilities "
            f"density ± epsilon reach [{low:g}, {high:g}], outside (0, 1] (mergekit raises "
            "on these too); lower epsilon or move density away from 0 and 1"
        )

"""Values that vary over a model: schedules over depth and filters by role or name.

A recipe value (a method parameter, a model's `coefficient`, the coefficients' `multiplier`)
is a constant, a schedule `{schedule: [v0, ..., vn]}` interpolated over depth, or a list of
`{filter: SUBSTRING | role: ROLE, value: ...}` entries where the first match wins and an
entry with neither key is the default. Parsing keeps the recipe's own text in the recipe
(it is what the report shows); the parsed form here answers "what value for this tensor".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from nanmerge._types import Role, TensorContext

Constant = float | int | str | bool
_ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True)
class Schedule:
    """Values spaced evenly over depth: the first at layer 0, the last at the last layer."""

    values: tuple[float, ...]


@dataclass(frozen=True)
class Entry:
    """One filter entry: it matches when `pattern` is in the name and the role is `role`
    (an absent key matches everything)."""

    value: Constant | Schedule
    pattern: str | None = None
    role: str | None = None

    def matches(self, context: TensorContext) -> bool:
        by_name = self.pattern in (None, "*") or str(self.pattern) in context.name
        return by_name and self.role in (None, context.role)


@dataclass(frozen=True)
class Filtered:
    """Entries tried in order; the first that matches gives the value."""

    entries: tuple[Entry, ...]


Setting = Constant | Schedule | Filtered


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _at(where: str, text: str) -> str:
    return f"{where}: {text}" if where else text


def _leaf(value: Any, where: str, problems: list[str]) -> Constant | Schedule:
    """A constant or a `{schedule: [...]}` of numbers."""
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping) and set(value) == {"schedule"}:
        values = value["schedule"]
        if not isinstance(values, list) or not values:
            problems.append(
                _at(
                    where,
                    "`schedule` has no values; give a list of numbers, first for "
                    "layer 0 and last for the last layer, e.g. {schedule: [0.2, 1.0]}",
                )
            )
        elif not all(is_number(v) for v in values):
            problems.append(_at(where, f"`schedule` must list numbers; got {values!r}"))
        else:
            return Schedule(tuple(values))
        return Schedule(())
    problems.append(
        _at(
            where,
            f"{value!r} is neither a single value nor {{schedule: [numbers]}}; "
            "a filter list goes directly under the parameter",
        )
    )
    return Schedule(())


def _entry(item: Any, where: str, problems: list[str]) -> Entry:
    keys = set(item) if isinstance(item, Mapping) else set()
    if "value" not in keys or not keys <= {"value", "filter", "role"}:
        problems.append(
            f"{where}: {item!r} is not a filter entry; write {{filter: NAME_PART, value: V}}, "
            "{role: ROLE, value: V} or, last, the default {value: V}"
        )
        return Entry(Schedule(()))
    role = item.get("role")
    if role is not None and role not in _ROLES:
        problems.append(f"{where}: role {role!r} is unknown; roles: {', '.join(_ROLES)}")
    pattern = item.get("filter")
    if pattern is not None and not isinstance(pattern, str):
        problems.append(f"{where}: filter {pattern!r} must be a string (a part of tensor names)")
    return Entry(_leaf(item["value"], f"{where}.value", problems), pattern, role)


def parse(value: Any, where: str, problems: list[str]) -> Setting:
    """The setting a recipe value states; what is wrong with it goes to `problems`."""
    if isinstance(value, list):
        if value and all(is_number(v) for v in value):
            problems.append(
                _at(
                    where,
                    f"{value!r} is a bare list; write {{schedule: {value!r}}} for values "
                    "over depth (first at layer 0, last at the last layer), or one number",
                )
            )
            return Schedule(())
        if not value:
            problems.append(_at(where, "the filter list is empty; give at least a {value: V}"))
        return Filtered(tuple(_entry(v, f"{where}[{i}]", problems) for i, v in enumerate(value)))
    return _leaf(value, where, problems)


def varies(value: Any) -> bool:
    """Whether a recipe value is a schedule or a filter list rather than one value."""
    return isinstance(value, list | Mapping)


def depth(context: TensorContext) -> float:
    """A tensor's position t in [0, 1] for schedules, as mergekit 0.1.5 places it.

    Followed: `MergePlanner.plan_slice` and `plan_module` (mergekit/plan.py). Layer i of n
    sits at i / (n - 1), a single layer at 1; tensors outside the blocks (embeddings, the
    final norm, the head) are planned with t = 0, the first value.
    """
    if context.layer is None or context.num_layers is None:
        return 0.0
    if context.num_layers == 1:
        return 1.0
    return context.layer / (context.num_layers - 1)


def interpolate(values: Sequence[float], t: float) -> float:
    """The value at t in [0, 1] of evenly spaced `values`, linear between neighbours.

    Followed: `evaluate_setting` (mergekit/config.py, 0.1.5) for numeric gradients, with the
    same float operations, so a layer gets the same number in both tools.
    """
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


class Unmatched(Exception):
    """No filter entry matches a tensor and the list has no default."""


def value_at(setting: Setting, context: TensorContext) -> Constant:
    """The value `setting` gives the tensor of `context`."""
    if isinstance(setting, Filtered):
        entry = next((e for e in setting.entries if e.matches(context)), None)
        if entry is None:
            raise Unmatched(context.name)
        setting = entry.value
    if isinstance(setting, Schedule):
        return interpolate(setting.values, depth(context))
    return setting


def needs_layers(setting: Setting) -> bool:
    """Whether some value of `setting` changes with depth."""
    leaves = [e.value for e in setting.entries] if isinstance(setting, Filtered) else [setting]
    return any(isinstance(v, Schedule) and len(set(v.values)) > 1 for v in leaves)


def extremes(setting: Setting) -> list[Constant]:
    """The values that bound every value `setting` can give: the smallest and largest
    number (interpolation stays between them) and each non-numeric value."""
    leaves = [e.value for e in setting.entries] if isinstance(setting, Filtered) else [setting]
    flat = [x for v in leaves for x in (v.values if isinstance(v, Schedule) else (v,))]
    numbers = [x for x in flat if is_number(x)]
    others = [x for x in flat if not is_number(x)]
    bounds: list[Constant] = [min(numbers), max(numbers)] if numbers else []
    return list(dict.fromkeys([*bounds, *others]))

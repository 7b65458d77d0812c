"""Parameters checked from signatures: the constraint vocabulary, its words, one check.

A merge method's hyperparameters and an estimator's options are the keyword-only parameters
of its function, and each annotation carries its constraint:
`density: Annotated[float, Interval(gt=0, le=1)] = 0.2`, `merge: Literal["mean", "sum"]`,
`scale: Annotated[float, Finite]`, `fallback: Annotated[str, Rule(test, "words")]`.
`Signature.check` validates given values against them with pydantic in strict mode (it
converts nothing: values reach the function as given) and reports every problem at once;
`describe` says a constraint in words for messages and for `nanmerge methods`.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

from annotated_types import Ge, GroupedMetadata, Gt, Interval, Le, Lt, Predicate

if TYPE_CHECKING:  # pydantic is imported on the first check: listing methods skips it
    from pydantic import BaseModel

# NaN and ±inf fail one of these bounds.
Finite = Interval(gt=-math.inf, lt=math.inf)

# A rule that ties parameters together: the full arguments (defaults filled in) -> messages.
Validator = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class Rule(Predicate):
    """A test no bound can state, with the words that say what passes it."""

    words: str


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the valid name closest to `name`; empty when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_LIMITS: dict[type, Callable[[Any], tuple[float, str]]] = {
    Gt: lambda b: (b.gt, "<"),
    Ge: lambda b: (b.ge, "<="),
    Lt: lambda b: (b.lt, "<"),
    Le: lambda b: (b.le, "<="),
}


def _bounds_in_words(bounds: list[Gt | Ge | Lt | Le]) -> str:
    """`a number with 0 < x <= 1`; `a finite number` when a bound is infinite (NaN fails it)."""
    kind, low, high = "a number", None, None
    for bound in bounds:
        limit, sign = _LIMITS[type(bound)](bound)
        if not math.isfinite(limit):
            kind = "a finite number"
        elif isinstance(bound, (Gt, Ge)):
            low = (limit, sign)
        else:
            high = (limit, sign)
    if low and high:
        return f"{kind} with {low[0]:g} {low[1]} x {high[1]} {high[0]:g}"
    if low:
        return f"{kind} with x {low[1].replace('<', '>')} {low[0]:g}"
    if high:
        return f"{kind} with x {high[1]} {high[0]:g}"
    return kind


def describe(annotation: Any) -> str | None:
    """The constraint `annotation` carries, in words; None when it carries none (bare `float`)."""
    if annotation is bool:
        return "true or false"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if get_origin(annotation) is not Annotated:
        return None
    metadata = [
        item
        for entry in get_args(annotation)[1:]
        for item in (entry if isinstance(entry, GroupedMetadata) else (entry,))
    ]
    words = [m.words for m in metadata if isinstance(m, Rule)]
    bounds = [m for m in metadata if isinstance(m, (Gt, Ge, Lt, Le))]
    if bounds:
        words.append(_bounds_in_words(bounds))
    return ", ".join(words) or None


def _evaluated(annotation: Any, fn: Callable[..., Any]) -> Any:
    """An annotation as a type: a string (postponed annotations) evaluated in `fn`'s module,
    as `inspect.get_annotations(eval_str=True)` does; no annotation accepts anything."""
    if isinstance(annotation, str):
        return eval(annotation, fn.__globals__)
    return Any if annotation is inspect.Parameter.empty else annotation


@dataclass(frozen=True)
class Signature:
    """The checked keyword-only parameters of one function, in order: annotations, defaults."""

    annotations: dict[str, Any]
    defaults: dict[str, Any]

    @classmethod
    def of(cls, fn: Callable[..., Any], skip: Iterable[str] = ()) -> Signature:
        """`fn`'s keyword-only parameters but `skip`, annotations evaluated in `fn`'s module
        (one by one: an annotation of a skipped input may name a type imported only for
        type checking)."""
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in skip
        ]
        return cls(
            annotations={p.name: _evaluated(p.annotation, fn) for p in params},
            defaults={p.name: p.default for p in params if p.default is not p.empty},
        )

    @cached_property
    def words(self) -> dict[str, str]:
        """What each parameter must be, in words (its type where it carries no constraint)."""
        return {
            name: describe(annotation) or f"a valid {getattr(annotation, '__name__', annotation)}"
            for name, annotation in self.annotations.items()
        }

    @cached_property
    def _model(self) -> type[BaseModel]:
        from pydantic import ConfigDict, create_model

        fields: dict[str, Any] = {
            name: (annotation, self.defaults.get(name, ...))
            for name, annotation in self.annotations.items()
        }
        return create_model("Arguments", __config__=ConfigDict(strict=True), **fields)

    def check(
        self,
        what: str,
        noun: str,
        values: Mapping[str, Any],
        validate: Validator | None = None,
        per_model: Iterable[str] = (),
    ) -> list[str]:
        """Every problem with `values`, each message starting `what: `; empty when valid.

        Unknown names, values outside their constraint and missing required ones are all
        reported; `validate` (a rule tying parameters together) runs when every value it
        would read is valid. A name in `per_model` may hold a tuple, one value per model:
        each is checked against the constraint, and `validate` runs once per model on that
        model's values (its messages say which model).
        """
        spread = {
            k: tuple(v) for k, v in values.items() if k in per_model and isinstance(v, tuple | list)
        }
        shared = {k: v for k, v in values.items() if k not in spread}
        problems, failed = self._problems(what, noun, shared, set(self.annotations) - set(spread))
        count = max((len(v) for v in spread.values()), default=0)
        if len({len(v) for v in spread.values()}) > 1:
            sizes = ", ".join(f"'{k}' {len(v)}" for k, v in spread.items())
            problems.append(f"{what}: per-model {noun}s give different numbers of values ({sizes})")
        rows = [{k: v[i] for k, v in spread.items() if i < len(v)} for i in range(count)]
        for i, row in enumerate(rows):
            found, bad = self._problems(what, noun, row, set(), f" of model {i + 1}")
            problems += found
            failed |= bad
        if validate is not None and not failed:
            known = {k: v for k, v in shared.items() if k in self.annotations}
            for i, row in enumerate(rows or [{}]):
                where = f"{what}: model {i + 1}'s values: " if rows else f"{what}: "
                problems += [where + p for p in validate({**self.defaults, **known, **row})]
        return problems

    def _problems(
        self, what: str, noun: str, values: Mapping[str, Any], required: set[str], of: str = ""
    ) -> tuple[list[str], set[str]]:
        """The problems with `values` (a missing name counts only when `required`), and the
        names whose values failed."""
        from pydantic import ValidationError

        known = {k: v for k, v in values.items() if k in self.annotations}
        try:
            self._model.model_validate(known)
            failed: dict[str, str] = {}
        except ValidationError as exc:
            failed = {str(e["loc"][0]): e["type"] for e in exc.errors()}
        failed = {k: t for k, t in failed.items() if t != "missing" or k in required}
        valid = ", ".join(self.annotations) or "none"
        problems = []
        for name, value in values.items():
            if name not in self.annotations:
                problems.append(
                    f"{what}: unknown {noun} '{name}'{did_you_mean(name, self.annotations)}; "
                    f"valid {noun}s: {valid}"
                )
            elif name in failed:
                problems.append(
                    f"{what}: {noun} '{name}'{of} = {value!r} is invalid; it must be "
                    f"{self.words[name]}"
                )
        problems += [
            f"{what}: {noun} '{name}' is required; it must be {self.words[name]}"
            for name, kind in failed.items()
            if kind == "missing"
        ]
        return problems, set(failed)


__all__ = [
    "Finite",
    "Ge",
    "Gt",
    "Interval",
    "Le",
    "Lt",
    "Rule",
    "Signature",
    "Validator",
    "describe",
    "did_you_mean",
]

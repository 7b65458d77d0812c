"""Parameters checked from signatures: every registered one carries a constraint, the words
say what the check accepts, and every problem is reported at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pytest

from nanmerge._params import (
    Finite,
    Interval,
    Lt,
    Rule,
    Signature,
    describe,
    did_you_mean,
)
from nanmerge.coefficients import ESTIMATORS
from nanmerge.methods import METHODS


def _registered() -> list[tuple[str, str, Any]]:
    return [
        (f"{kind} {name}", param, annotation)
        for kind, registry in (("method", METHODS), ("estimator", ESTIMATORS))
        for name, spec in registry.items()
        for param, annotation in spec.signature.annotations.items()
    ]


@pytest.mark.parametrize(("owner", "param", "annotation"), _registered())
def test_every_method_parameter_and_estimator_option_carries_a_constraint(
    owner: str, param: str, annotation: Any
) -> None:
    assert describe(annotation) is not None, (
        f"{owner}: parameter '{param}' is annotated {annotation!r}, which accepts anything of "
        "its type; annotate a constraint, e.g. Annotated[float, Interval(gt=0, le=1)]"
    )


def test_a_bare_type_carries_no_constraint_and_bool_or_a_literal_does() -> None:
    """The control for the test above: it can fail."""
    assert describe(float) is None
    assert describe(str) is None
    assert describe(Annotated[float, "a note, not a constraint"]) is None
    assert describe(bool) == "true or false"
    assert describe(Literal["mean", "sum"]) == "one of 'mean', 'sum'"


def _never(value: object) -> bool:
    return False


@pytest.mark.parametrize(
    ("annotation", "words"),
    [
        (Annotated[float, Interval(gt=0, le=1)], "a number with 0 < x <= 1"),
        (Annotated[float, Interval(ge=0, lt=1)], "a number with 0 <= x < 1"),
        (Annotated[float, Finite], "a finite number"),
        (Annotated[float, Interval(ge=0, lt=math.inf)], "a finite number with x >= 0"),
        (Annotated[float, Lt(2.5)], "a number with x < 2.5"),
        (Annotated[str, Rule(_never, "a name we know")], "a name we know"),
    ],
)
def test_constraints_read_in_words(annotation: Any, words: str) -> None:
    assert describe(annotation) == words


BOUNDED = [
    (Interval(gt=0, le=1), lambda x: 0 < x <= 1),
    (Interval(ge=0, lt=1), lambda x: 0 <= x < 1),
    (Finite, math.isfinite),
    (Interval(ge=0, lt=math.inf), lambda x: 0 <= x < math.inf),
]
SAMPLES = [-math.inf, -1, -1e-12, 0, 0.0, 1e-12, 0.5, 1, 1.0, 1 + 1e-12, 7, math.inf, math.nan]


@pytest.mark.parametrize(("bound", "holds"), BOUNDED)
def test_a_number_is_accepted_exactly_when_the_bound_holds(bound: Any, holds: Any) -> None:
    signature = Signature({"x": Annotated[float, bound]}, {"x": 0.5})
    for value in SAMPLES:
        problems = signature.check("f", "parameter", {"x": value})
        assert (problems == []) == holds(value), (bound, value, problems)


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5]])
def test_a_number_parameter_takes_numbers_as_given_not_converted(value: object) -> None:
    """Values reach the function unchanged, so nothing that needs converting may pass."""
    signature = Signature({"x": Annotated[float, Finite]}, {"x": 0.5})
    (problem,) = signature.check("f", "parameter", {"x": value})
    assert problem == f"f: parameter 'x' = {value!r} is invalid; it must be a finite number"


def _ordered(params: Mapping[str, Any]) -> list[str]:
    """low <= high: the range is not empty."""
    return [] if params["low"] <= params["high"] else ["low must be <= high"]


def demo(
    *,
    path: Annotated[str, Rule(bool, "a path")],
    low: Annotated[float, Finite] = 0.0,
    high: Annotated[float, Finite] = 1.0,
    mode: Literal["a", "b"] = "a",
) -> None:
    """A function with a required option, two tied numbers and a choice."""


def test_signature_reads_keyword_only_parameters_with_evaluated_annotations() -> None:
    signature = Signature.of(demo, skip=["mode"])
    assert list(signature.annotations) == ["path", "low", "high"]
    assert signature.defaults == {"low": 0.0, "high": 1.0}
    assert signature.words["low"] == "a finite number"


def test_every_problem_is_reported_at_once() -> None:
    signature = Signature.of(demo)
    problems = signature.check(
        "demo", "option", {"hihg": 2, "mode": "c", "low": math.nan}, _ordered
    )
    assert problems == [
        "demo: unknown option 'hihg' (did you mean 'high'?); valid options: path, low, high, mode",
        "demo: option 'mode' = 'c' is invalid; it must be one of 'a', 'b'",
        "demo: option 'low' = nan is invalid; it must be a finite number",
        "demo: option 'path' is required; it must be a path",
    ]


def test_the_rule_tying_parameters_runs_with_defaults_once_each_value_is_valid() -> None:
    signature = Signature.of(demo)
    assert signature.check("demo", "option", {"path": "p", "low": 2}, _ordered) == [
        "demo: low must be <= high"  # high is its default, 1.0
    ]
    assert signature.check("demo", "option", {"path": "p", "low": 2, "high": 3}, _ordered) == []
    (only,) = signature.check("demo", "option", {"path": "p", "low": 2, "high": "x"}, _ordered)
    assert "'high' = 'x' is invalid" in only  # the rule cannot compare 2 with 'x'


def test_did_you_mean_names_the_closest_valid_name_or_nothing() -> None:
    assert did_you_mean("densty", ["density", "scale"]) == " (did you mean 'density'?)"
    assert did_you_mean("zzz", ["density", "scale"]) == ""

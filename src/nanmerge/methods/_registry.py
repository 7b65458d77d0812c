"""The method registry: one entry per merge function, keyed by the function's name.

Parameter ranges live in one table keyed by parameter name, so `density` means the same
thing (and is checked the same way) in every method that takes it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from nanmerge._types import MergeError

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

F = TypeVar("F", bound="Callable[..., torch.Tensor]")

# Keyword arguments that are inputs rather than hyperparameters (`bands` and `offset` carry
# a chunked merge's per-tensor preparation and the chunk's position).
_INPUTS = ("base", "generator", "bands", "offset")
# Per-tensor statistics a data-informed method reads (stacked (M, ...), one per model); the
# engine looks them up by tensor name in the recipe's `statistics` files.
STATISTICS = ("fisher", "gram")


@dataclass(frozen=True)
class MethodSpec:
    """What the engine and the CLI need to know about one merge method."""

    name: str
    fn: Callable[..., torch.Tensor]
    reference: str
    needs_base: bool
    min_models: int
    max_models: int | None
    params: dict[str, object]
    uses_generator: bool = False
    statistics: tuple[str, ...] = ()
    # Elementwise methods can be merged chunk by chunk of the flattened tensor. `prepare`,
    # when set, computes from the whole tensors (models as read, base) the keyword inputs
    # that make the method elementwise, and the method then takes each chunk's `offset`.
    elementwise: bool = False
    prepare: Callable[..., dict[str, Any]] | None = None


_METHODS: dict[str, MethodSpec] = {}
METHODS: Mapping[str, MethodSpec] = MappingProxyType(_METHODS)


def register(
    *,
    reference: str,
    needs_base: bool,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = False,
    prepare: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[F], F]:
    """Register a merge function under its own name.

    The registered function checks its inputs (model count, shapes, base) and its
    hyperparameters before running, so direct calls fail as clearly as recipe runs do.
    """

    def decorate(fn: F) -> F:
        if fn.__name__ in _METHODS:
            raise ValueError(f"merge method '{fn.__name__}' is registered twice")
        signature = inspect.signature(fn)
        params = {
            p.name: p.default
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.name not in _INPUTS
            and p.name not in STATISTICS
        }

        @functools.wraps(fn)
        def checked(tensors: torch.Tensor, coef: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            hyper = {k: v for k, v in kwargs.items() if k not in _INPUTS + STATISTICS}
            problems = check_params(spec, hyper)
            if problems:
                raise MergeError("; ".join(problems))
            tensors, coef = _checked_inputs(spec, tensors, coef, kwargs.get("base"))
            return fn(tensors, coef, **kwargs)

        spec = MethodSpec(
            name=fn.__name__,
            fn=checked,
            reference=reference,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            params=params,
            uses_generator="generator" in signature.parameters,
            statistics=tuple(n for n in signature.parameters if n in STATISTICS),
            elementwise=elementwise,
            prepare=prepare,
        )
        _METHODS[spec.name] = spec
        return cast(F, checked)

    return decorate


def _checked_inputs(
    spec: MethodSpec,
    tensors: torch.Tensor,
    coef: torch.Tensor,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the shared inputs; return tensors as float32 and coef on their device."""
    import torch

    if not (tensors.is_floating_point() and tensors.dim() >= 1):
        raise MergeError(
            f"{spec.name}: tensors must be floating point and stacked as (M, *shape); "
            f"got dtype {tensors.dtype} and shape {tuple(tensors.shape)}"
        )
    m = tensors.shape[0]
    problem = count_problem(spec, m)
    if problem:
        raise MergeError(problem)
    if tuple(coef.shape) != (m,):
        raise MergeError(
            f"{spec.name}: coef must hold one entry per model, shape ({m},); "
            f"got shape {tuple(coef.shape)}"
        )
    if not bool(torch.isfinite(coef).all()):
        raise MergeError(f"{spec.name}: coefficients must be finite, got {coef.tolist()}")
    if base is None and spec.needs_base:
        raise MergeError(
            f"{spec.name} adds task vectors to a base model; give a base "
            f"(the model the {m} models were fine-tuned from)"
        )
    if base is not None and tuple(base.shape) != tuple(tensors.shape[1:]):
        raise MergeError(
            f"{spec.name}: base shape {tuple(base.shape)} does not match the models' "
            f"shape {tuple(tensors.shape[1:])} (stacked: {tuple(tensors.shape)})"
        )
    return tensors.to(torch.float32), coef.to(device=tensors.device, dtype=torch.float32)


def count_problem(spec: MethodSpec, m: int) -> str | None:
    """Why `m` models are the wrong number for `spec`, or None when they are fine."""
    if m >= spec.min_models and (spec.max_models is None or m <= spec.max_models):
        return None
    if spec.min_models == spec.max_models:
        wanted = f"exactly {spec.min_models}"
    else:
        upper = "" if spec.max_models is None else f" and at most {spec.max_models}"
        wanted = f"at least {spec.min_models}{upper}"
    return f"method '{spec.name}' needs {wanted} models; the recipe has {m}"


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name lists the valid ones and the closest."""
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeError(
            f"unknown merge method '{name}'{_suggestion(name, _METHODS)}; "
            f"valid methods: {', '.join(sorted(_METHODS))}"
        ) from None


def _suggestion(name: str, valid: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _finite(value: object) -> float | None:
    """The value as a float when it is a finite real number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _between(value: object, low: float, high: float, *, open_low: bool, open_high: bool) -> bool:
    x = _finite(value)
    if x is None:
        return False
    above = x > low if open_low else x >= low
    below = x < high if open_high else x <= high
    return above and below


# One range per parameter name, shared by every method that takes it.
_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "density": (
        "a number in (0, 1]",
        lambda v: _between(v, 0, 1, open_low=True, open_high=False),
    ),
    "gamma": (
        "a number in [0, 1)",
        lambda v: _between(v, 0, 1, open_low=False, open_high=True),
    ),
    "t": (
        "a number in [0, 1]",
        lambda v: _between(v, 0, 1, open_low=False, open_high=False),
    ),
    "scale": ("a finite number", lambda v: _finite(v) is not None),
    "merge": ("one of 'mean', 'sum'", lambda v: v in ("mean", "sum")),
    "alpha": (
        "a number in [0, 1]",
        lambda v: _between(v, 0, 1, open_low=False, open_high=False),
    ),
    "eps": ("a number >= 0", lambda v: _between(v, 0, math.inf, open_low=False, open_high=True)),
    "fallback": (
        "the name of a registered method that needs no statistics and no random generator",
        lambda v: (
            isinstance(v, str)
            and v in _METHODS
            and not _METHODS[v].statistics
            and not _METHODS[v].uses_generator
        ),
    ),
}


def check_params(spec: MethodSpec, params: Mapping[str, object]) -> list[str]:
    """Every problem with `params` for `spec`, as messages; an empty list means valid."""
    problems = []
    for name, value in params.items():
        if name not in spec.params:
            problems.append(
                f"{spec.name}: unknown parameter '{name}'{_suggestion(name, spec.params)}; "
                f"valid parameters: {', '.join(spec.params) or 'none'}"
            )
        elif name in _RULES and not _RULES[name][1](value):
            problems.append(
                f"{spec.name}: parameter '{name}' = {value!r} is invalid; "
                f"it must be {_RULES[name][0]}"
            )
    if "gamma" in spec.params and "density" in spec.params:
        gamma = params.get("gamma", spec.params["gamma"])
        density = params.get("density", spec.params["density"])
        valid = _RULES["gamma"][1](gamma) and _RULES["density"][1](density)
        if valid and cast(float, gamma) + cast(float, density) > 1 + 1e-9:
            problems.append(
                f"{spec.name}: parameters gamma = {gamma!r} and density = {density!r} sum to "
                f"{cast(float, gamma) + cast(float, density):g}; gamma + density must be <= 1 "
                f"(the dropped top fraction and the kept fraction cannot exceed the tensor)"
            )
    return problems

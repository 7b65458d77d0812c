"""Coefficient estimators: pure functions from per-tensor norms to `Coefficients`.

Every estimator has the signature `fn(norms, models, **params) -> Coefficients`, where
`norms` maps tensor names to `TensorNorms` (possibly empty when the estimator needs none)
and `models` names the M models. Registering an estimator also records which norms it
needs, so the engine knows whether its collect pass must precede the merge. Options are the
keyword-only parameters, each annotation carrying its constraint (`nanmerge._params`), checked
with the estimator's own rule about the recipe (`check_options`) before any input is opened.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from nanmerge._params import Interval, Rule, Signature, did_you_mean
from nanmerge._types import Coefficients, MergeError, TensorNorms

Needs = Literal["none", "model", "tensor"]
Estimator = Callable[..., Coefficients]

NEAR_UNIFORM = 0.02
CANCELLING = 1e-3


@dataclass(frozen=True)
class RecipeFacts:
    """What an estimator's check may read from the recipe besides its own options."""

    has_base: bool
    coefficients: tuple[float | None, ...]  # each model's `coefficient`, one per model


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator and a rule saying which norms it needs for given params."""

    name: str
    fn: Estimator
    needs: Callable[[Mapping[str, Any]], Needs]
    reference: str
    signature: Signature  # the options
    # the keyword that receives each model's `coefficient` (not an option), if it reads them
    reads_coefficients: str | None = None
    # problems of the options (defaults filled in) together with the recipe
    validate: Callable[[Mapping[str, Any], RecipeFacts], list[str]] | None = None
    # a warning about the estimate as a whole, once every tensor's coefficients are known
    summary: Callable[[Coefficients], str | None] | None = None


_REGISTRY: dict[str, EstimatorSpec] = {}
ESTIMATORS: Mapping[str, EstimatorSpec] = MappingProxyType(_REGISTRY)


def _register(
    needs: Callable[[Mapping[str, Any]], Needs],
    reference: str,
    summary: Callable[[Coefficients], str | None] | None = None,
    *,
    reads_coefficients: str | None = None,
    validate: Callable[[Mapping[str, Any], RecipeFacts], list[str]] | None = None,
) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        _REGISTRY[fn.__name__] = EstimatorSpec(
            fn.__name__,
            fn,
            needs,
            reference,
            Signature.of(fn, skip=[reads_coefficients] if reads_coefficients else []),
            reads_coefficients=reads_coefficients,
            validate=validate,
            summary=summary,
        )
        return fn

    return wrap


def get_estimator(name: str) -> EstimatorSpec:
    """Look an estimator up by name; an unknown name lists the valid ones and the closest."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise MergeError(
        f"unknown coefficient estimator '{name}'{did_you_mean(name, _REGISTRY)}; "
        f"valid estimators: {', '.join(sorted(_REGISTRY))}"
    )


def check_options(spec: EstimatorSpec, options: Mapping[str, Any], facts: RecipeFacts) -> list[str]:
    """Every problem with `options` for `spec` in a recipe with `facts`; empty when valid."""
    problems = []
    slot = spec.reads_coefficients
    if slot is not None and slot in options:
        problems.append(
            f"coefficients: {spec.name} reads each model's `coefficient`; "
            f"remove the `{slot}` option"
        )
    if slot is None and any(c is not None for c in facts.coefficients):
        readers = " or ".join(
            f"`coefficients: {name}`" for name, s in _REGISTRY.items() if s.reads_coefficients
        )
        problems.append(
            f"models carry a `coefficient` but coefficients is '{spec.name}'; "
            f"set {readers} to use them, or remove them"
        )
    rule = spec.validate
    validate = None if rule is None else lambda values: rule(values, facts)
    given = {k: v for k, v in options.items() if k != slot}
    return problems + spec.signature.check(f"estimator '{spec.name}'", "option", given, validate)


def near_uniform_warning(coefficients: Coefficients) -> str | None:
    """A warning when every coefficient is within ±2% of uniform (NAN then changes nothing)."""
    vectors = list(coefficients.per_tensor.values())
    if coefficients.per_model is not None:
        vectors.append(coefficients.per_model)
    if not vectors:
        return None
    for values in vectors:
        mean = sum(values) / len(values)
        if mean <= 0 or any(abs(v / mean - 1.0) > NEAR_UNIFORM for v in values):
            return None
    return (
        f"every coefficient is within ±{NEAR_UNIFORM:.0%} of uniform: "
        f"'{coefficients.estimator}' changes almost nothing over uniform coefficients here"
    )


def cancellation_warning(coefficients: Coefficients) -> str | None:
    """A warning when some coefficient vector nearly sums to zero (|sum c| < 1e-3 sum |c|).

    Only manual or loaded coefficients can have mixed signs. A method that divides by sum(c)
    (weight averaging, `merge: mean`) then multiplies the merge by sum|c| / |sum c|; the
    engine asks only for such methods, since a plain sum of task vectors is not amplified.
    """
    vectors = [("", coefficients.per_model)] if coefficients.per_model is not None else []
    vectors += [(f" of tensor '{n}'", v) for n, v in coefficients.per_tensor.items()]
    cancelling = []
    for where, values in vectors:
        total, size = abs(sum(values)), sum(abs(v) for v in values)
        if total < CANCELLING * size:
            cancelling.append((where, values, total, size))
    if not cancelling:
        return None
    where, values, total, size = cancelling[0]
    more = f" (and {len(cancelling) - 1} more tensors)" if len(cancelling) > 1 else ""
    factor = size / total if total else math.inf
    return (
        f"the coefficients{where} {[round(v, 6) for v in values]}{more} nearly cancel: |sum| "
        f"{total:.3g} is below {CANCELLING:g} of the sum of magnitudes {size:.3g}, and the "
        f"method divides by the sum, which scales the merged weights by about {factor:.3g}x; "
        "check the coefficients' signs"
    )


@_register(lambda params: "none", "uniform weights: 1.0 for every model")
def uniform(norms: Mapping[str, TensorNorms], models: Sequence[str]) -> Coefficients:
    """1.0 per model: every method then behaves exactly as published."""
    return Coefficients(tuple(models), "uniform", per_model=(1.0,) * len(models))


def _every_model_has_a_coefficient(options: Mapping[str, Any], facts: RecipeFacts) -> list[str]:
    missing = [str(i) for i, c in enumerate(facts.coefficients) if c is None]
    if not missing:
        return []
    return [f"needs a `coefficient` on every model; models {', '.join(missing)} have none"]


@_register(
    lambda params: "none",
    "one user-given weight per model",
    reads_coefficients="values",
    validate=_every_model_has_a_coefficient,
)
def manual(
    norms: Mapping[str, TensorNorms], models: Sequence[str], *, values: Sequence[float]
) -> Coefficients:
    """User-given weights, one per model (the recipe's per-model `coefficient`)."""
    if len(values) != len(models):
        raise MergeError(
            f"manual coefficients: got {len(values)} values for {len(models)} models; "
            "give every model a `coefficient`"
        )
    bad = [f"{m}: {v}" for m, v in zip(models, values, strict=True) if not math.isfinite(v)]
    if bad:
        raise MergeError(f"manual coefficients must be finite numbers; got {', '.join(bad)}")
    return Coefficients(
        tuple(models), "manual", {"values": list(values)}, per_model=tuple(float(v) for v in values)
    )


@_register(lambda params: "none", "coefficients JSON written by `nanmerge coefficients --json`")
def from_file(
    norms: Mapping[str, TensorNorms],
    models: Sequence[str],
    *,
    path: Annotated[str, Rule(bool, "the path of a coefficients JSON file")],
) -> Coefficients:
    """Coefficients saved by an earlier run or another estimator (e.g. a learned one)."""
    file = Path(path)
    try:
        data = json.loads(file.read_text())
        # a merge_report.json nests the coefficients object; a `coefficients --json` file is one
        if isinstance(data.get("coefficients"), dict):
            data = data["coefficients"]
        loaded = Coefficients.from_json(data)
    except FileNotFoundError:
        raise MergeError(f"coefficients file not found: {file}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MergeError(
            f"coefficients file {file} is not a nanmerge coefficients JSON ({exc}); "
            "write one with `nanmerge coefficients RECIPE --json`"
        ) from None
    if len(loaded.models) != len(models):
        raise MergeError(
            f"coefficients file {file} has {len(loaded.models)} models but the recipe has "
            f"{len(models)}; the file must list one coefficient per recipe model, in order"
        )
    loaded.params = {"path": str(file), "source_estimator": loaded.estimator, **loaded.params}
    loaded.estimator = "from_file"
    loaded.models = tuple(models)
    return loaded


NormOf = Literal["finetuned", "task_vector"]
Granularity = Literal["model", "tensor"]
Convention = Literal["mean_one", "sum_one", "half_m"]

_CONVENTION_SCALE: dict[str, Callable[[int], float]] = {
    "mean_one": lambda m: float(m),
    "sum_one": lambda m: 1.0,
    "half_m": lambda m: m / 2.0,
}


def inverse_norm_weights(
    norms: Sequence[float], *, convention: Convention, eps: float
) -> tuple[tuple[float, ...], list[int]]:
    """NAN's normalized inverse norms, scaled by the convention; also the zero-norm models.

    A norm at or below `eps` times the largest norm counts as zero: that model carries no
    update (its task vector vanishes), so it gets coefficient 0 instead of an infinite weight
    that would silence every other model. If every norm is zero, weights fall back to uniform.
    """
    m = len(norms)
    scale = _CONVENTION_SCALE[convention](m)
    largest = max(norms, default=0.0)
    zero = [i for i, n in enumerate(norms) if n <= eps * largest or n == 0.0]
    if len(zero) == m:
        return tuple(scale / m for _ in norms), zero
    inverse = [0.0 if i in zero else 1.0 / n for i, n in enumerate(norms)]
    total = sum(inverse)
    return tuple(scale * v / total for v in inverse), zero


def _task_vectors_have_a_base(options: Mapping[str, Any], facts: RecipeFacts) -> list[str]:
    if options["norm_of"] == "task_vector" and not facts.has_base:
        return ["norm_of: task_vector needs a `base` model"]
    return []


@_register(
    lambda params: "tensor" if params.get("granularity") == "tensor" else "model",
    "NAN, Si et al. 2025, https://arxiv.org/abs/2505.16148",
    summary=near_uniform_warning,
    validate=_task_vectors_have_a_base,
)
def nan(
    norms: Mapping[str, TensorNorms],
    models: Sequence[str],
    *,
    norm_of: NormOf = "finetuned",
    granularity: Granularity = "model",
    convention: Convention = "mean_one",
    eps: Annotated[float, Interval(ge=0, lt=math.inf)] = 1e-8,
) -> Coefficients:
    """Norm-aware coefficients: a_i = (1/||x_i||) / sum_j (1/||x_j||), x = theta or tau.

    Defaults follow the paper's wording (norm of the fine-tuned weights, one norm per model)
    and `mean_one` scaling (M * a_i), so equal norms reproduce the base method exactly.
    """
    params: dict[str, Any] = {
        "norm_of": norm_of,
        "granularity": granularity,
        "convention": convention,
        "eps": eps,
    }
    key = "sumsq_finetuned" if norm_of == "finetuned" else "sumsq_task_vector"
    if any(getattr(st, key) is None for st in norms.values()):
        raise MergeError("nan with norm_of: task_vector needs a `base` model in the recipe")
    result = Coefficients(tuple(models), "nan", params)
    if granularity == "model":
        totals = [0.0] * len(models)
        for st in norms.values():
            totals = [a + b for a, b in zip(totals, getattr(st, key), strict=True)]
        weights, zero = inverse_norm_weights(
            [t**0.5 for t in totals], convention=convention, eps=eps
        )
        result.per_model = weights
        if len(zero) == len(models):  # the warning must say what the table shows
            result.warnings.append(
                f"every model's {norm_of} norm is zero: nothing to weigh, so every model gets "
                f"the same coefficient, {weights[0]:g}"
            )
        else:
            result.warnings += [
                f"model {models[i]}: {norm_of} norm is zero; it gets coefficient 0" for i in zero
            ]
        warning = near_uniform_warning(result)
        if warning:
            result.warnings.append(warning)
        return result
    some_zero, all_zero = [], []
    for name, st in norms.items():
        values = [v**0.5 for v in getattr(st, key)]
        result.per_tensor[name], zero = inverse_norm_weights(values, convention=convention, eps=eps)
        if len(zero) == len(models):  # uniform there, as the table shows: not 0
            all_zero.append(name)
        elif zero:
            some_zero.append(f"{name} (models {', '.join(models[i] for i in zero)})")
    if some_zero:
        result.warnings.append(
            f"zero {norm_of} norm, coefficient 0 for those models, in tensors: "
            + _first_few(some_zero)
        )
    if all_zero:
        result.warnings.append(
            f"zero {norm_of} norm in every model, so equal coefficients for all, in tensors: "
            + _first_few(all_zero)
        )
    return result


def _first_few(items: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more

"""The method registry: one entry per merge function, keyed by the function's name.

Hyperparameters are checked from the function's signature: each annotation carries its
constraint (`nanmerge._params`), the shared types below make `density` mean the same thing in
every method that takes it, and `validate` adds a rule that ties parameters together.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, UnionType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, Union, cast, get_args, get_origin

from nanmerge._params import Finite, Interval, Signature, Validator, did_you_mean
from nanmerge._types import Collect, MemoryCost, MergeError, Rebuild, TensorContext
from nanmerge.methods._statistic_kinds import STATISTICS

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

F = TypeVar("F", bound="Callable[..., torch.Tensor]")

# Keyword arguments that are inputs rather than hyperparameters (`bands` and `offset` carry
# a chunked merge's per-tensor preparation and the chunk's position).
_INPUTS = ("base", "generator", "bands", "offset", "context", "collected", "record")
# Per-tensor statistics a data-informed method reads (stacked (M, ...), one per model) come
# from the kinds in `STATISTICS`; the engine looks them up by tensor name in the recipe's
# `statistics` files.

# Hyperparameter types shared by name: each means the same, and is checked the same way,
# in every method that takes it.
Density = Annotated[float, Interval(gt=0, le=1)]  # the fraction of entries kept
Gamma = Annotated[float, Interval(ge=0, lt=1)]  # the fraction of largest entries dropped
Scale = Annotated[float, Finite]
Fraction = Annotated[float, Interval(ge=0, le=1)]  # slerp's t, regmean's alpha
Floor = Annotated[float, Interval(ge=0, lt=math.inf)]  # a finite eps added to a denominator


# The working sets of the two ways the engine runs a method (measured: docs/PERFORMANCE.md).
# Chunked: the M + 1 tensors as read, the merged tensor and, for trimming when a cut's
# sample misleads, one model's magnitudes and the selection's copy, plus the chunk buffers
# (the streamed cuts' pieces among them). Whole stack: the M float32 copies, the float32
# base and one raw read buffer, plus the method's workspace (at most 6M + 2).
ELEMENTWISE = MemoryCost(lambda m: m + 4, lambda m: 6 * m + 4, "(M + 4) * L + (6M + 4) * C")
WHOLE_STACK = MemoryCost(lambda m: 7 * m + 4, lambda m: 0, "(7M + 4) * L")
# `MethodSpec.elementwise_on`: (parameters, context, shape) -> elementwise on that tensor
ElementwiseOn = Callable[[Mapping[str, Any], TensorContext, tuple[int, ...]], bool]


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
    signature: Signature
    uses_generator: bool = False
    statistics: tuple[str, ...] = ()
    # A rule that ties hyperparameters together, checked after each one's own constraint.
    validate: Validator | None = None
    # A rule that ties hyperparameters to the number of models (consensus's k <= M),
    # checked by the recipe checks before any input is read, and at each direct call.
    validate_count: Callable[[Mapping[str, Any], int], list[str]] | None = None
    # Elementwise methods can be merged chunk by chunk of the flattened tensor. `prepare`,
    # when set, computes from the whole tensors (models as read, base) the keyword inputs
    # that make the method elementwise, and the method then takes each chunk's `offset`.
    elementwise: bool = False
    prepare: Callable[..., dict[str, Any]] | None = None
    # A whole-stack method that is elementwise on some tensors only (the subspace methods
    # average every tensor they do not SVD): given the parameters (over the defaults), a
    # tensor's context and shape, whether the function is elementwise there; the engine then
    # merges that tensor chunk by chunk (`merges_in_chunks`), at the elementwise working set.
    elementwise_on: ElementwiseOn | None = None
    # A method that declares a `context` keyword receives each tensor's TensorContext (so
    # does its `prepare`); one with `collect` receives the whole model's total as `collected`.
    # `collect` may depend on the parameters: a function of them returning one, or None.
    uses_context: bool = False
    collect: Collect[Any] | Callable[[Mapping[str, Any]], Collect[Any] | None] | None = None
    # A method that declares a `record` keyword receives a `Record` for each tensor.
    uses_record: bool = False
    # The working set, or a function of the parameters returning it (see `memory_for`).
    memory: MemoryCost | Callable[[Mapping[str, Any]], MemoryCost] = WHOLE_STACK
    # Whether, with these parameters, the method divides by the sum of the coefficients
    # (w_i = coef_i / sum(coef)), where nearly cancelling coefficients blow the weights up.
    averages: Callable[[Mapping[str, Any]], bool] = lambda params: False
    # False for a method with no coefficient slot (passthrough, magmax): coefficients refused
    takes_coefficients: bool = True
    # How `nanmerge rebuild` makes one task's model, for a method that keeps per-task tensors
    rebuild: Rebuild | None = None
    # True for a method that merges 2-D matrices through their singular vectors (TSV,
    # Iso-C): the plan refuses a model with no 2-D tensor to merge, before any work.
    needs_matrices: bool = False
    # Parameters that may take one value per model: the function then receives a tuple of
    # M values for them (annotated `X | tuple[float, ...]`; each value checked as an X).
    per_model: tuple[str, ...] = ()

    def merges_in_chunks(
        self, params: Mapping[str, Any], context: TensorContext, shape: tuple[int, ...]
    ) -> bool:
        """Whether a tensor of this context and shape is merged chunk by chunk: the method is
        elementwise, or elementwise on this tensor with these parameters."""
        if self.elementwise or self.elementwise_on is None:
            return self.elementwise
        return self.elementwise_on({**self.params, **params}, context, shape)

    def collect_for(self, params: Mapping[str, Any]) -> Collect[Any] | None:
        """The whole-model statistic the method gathers with these parameters (over its
        defaults), or None when it needs none."""
        if self.collect is None or isinstance(self.collect, Collect):
            return self.collect
        return self.collect({**self.params, **params})

    def memory_for(self, params: Mapping[str, Any]) -> MemoryCost:
        """The method's working set for one tensor with these parameters (over its defaults):
        a trim that sorts as mergekit does holds more than one finding cuts."""
        if isinstance(self.memory, MemoryCost):
            return self.memory
        return self.memory({**self.params, **params})


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
    elementwise_on: ElementwiseOn | None = None,
    validate: Validator | None = None,
    validate_count: Callable[[Mapping[str, Any], int], list[str]] | None = None,
    collect: Collect[Any] | Callable[[Mapping[str, Any]], Collect[Any] | None] | None = None,
    memory: MemoryCost | Callable[[Mapping[str, Any]], MemoryCost] | None = None,
    averages: Callable[[Mapping[str, Any]], bool] = lambda params: False,
    takes_coefficients: bool = True,
    needs_matrices: bool = False,
    rebuild: Rebuild | None = None,
    per_model: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Register a merge function under its own name.

    The registered function checks its inputs (model count, shapes, base) and its
    hyperparameters before running, so direct calls fail as clearly as recipe runs do.
    `averages` says, given the parameters, whether the method divides by the coefficients'
    sum. `collect` declares a whole-model statistic, which the engine gathers in its one pass
    before the merge and hands over as `collected` (a function of the parameters when only
    some of them need it: see `MethodSpec.collect_for`); `memory` states the working set where
    it differs from the engine's for chunked (elementwise) or whole-stack methods (likewise
    a function of the parameters where they change it: `MethodSpec.memory_for`).
    `elementwise_on(params, context, shape)` marks the tensors on which a whole-stack method
    is elementwise: those are merged chunk by chunk (`MethodSpec.merges_in_chunks`).
    `validate_count(params, models)` ties parameters to the number of models; the recipe
    checks run it before any input is opened.
    """

    def decorate(fn: F) -> F:
        if fn.__name__ in _METHODS:
            raise ValueError(f"merge method '{fn.__name__}' is registered twice")
        signature = inspect.signature(fn)
        declared = _per_value(Signature.of(fn, skip=_INPUTS + STATISTICS), per_model)

        @functools.wraps(fn)
        def checked(tensors: torch.Tensor, coef: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            hyper = {k: v for k, v in kwargs.items() if k not in _INPUTS + STATISTICS}
            problems = check_params(spec, hyper)
            if problems:
                raise MergeError("; ".join(problems))
            tensors, coef = _checked_inputs(spec, tensors, coef, kwargs.get("base"))
            problems = count_rule_problems(spec, hyper, tensors.shape[0])
            problems += per_model_problems(spec, hyper, tensors.shape[0])
            if problems:
                raise MergeError("; ".join(problems))
            return fn(tensors, coef, **kwargs)

        spec = MethodSpec(
            name=fn.__name__,
            fn=checked,
            reference=reference,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            params=declared.defaults,
            signature=declared,
            validate=validate,
            validate_count=validate_count,
            uses_generator="generator" in signature.parameters,
            statistics=tuple(n for n in signature.parameters if n in STATISTICS),
            elementwise=elementwise,
            prepare=prepare,
            elementwise_on=elementwise_on,
            uses_context="context" in signature.parameters,
            uses_record="record" in signature.parameters,
            collect=collect,
            memory=memory or (ELEMENTWISE if elementwise else WHOLE_STACK),
            averages=averages,
            takes_coefficients=takes_coefficients,
            rebuild=rebuild,
            needs_matrices=needs_matrices,
            per_model=per_model,
        )
        _METHODS[spec.name] = spec
        return cast(F, checked)

    return decorate


def _per_value(signature: Signature, per_model: tuple[str, ...]) -> Signature:
    """The signature whose per-model parameters are checked value by value: `X | tuple[...]`
    is checked as X (`Signature.check` splits a tuple into one value per model)."""
    unknown = sorted(set(per_model) - set(signature.annotations))
    if unknown:
        raise ValueError(f"per_model names {unknown}, which are not keyword parameters")
    annotations = {
        name: get_args(a)[0] if name in per_model and get_origin(a) in (Union, UnionType) else a
        for name, a in signature.annotations.items()
    }
    return Signature(annotations, signature.defaults)


def per_model_problems(spec: MethodSpec, params: Mapping[str, Any], m: int) -> list[str]:
    """Per-model values (tuples) that do not fit: not one per model, or where the method
    gathers a whole-model statistic at one value (`check_params` refuses a tuple for a
    parameter that is not per-model)."""
    spread = {
        k: v for k, v in params.items() if k in spec.per_model and isinstance(v, tuple | list)
    }
    problems = [
        f"{spec.name}: parameter '{k}' gives {len(v)} per-model values for {m} models; give "
        "one per model, in the models' order"
        for k, v in spread.items()
        if len(v) != m
    ]
    scalars = {k: v for k, v in params.items() if k not in spread}
    if spread and spec.collect is not None and spec.collect_for(scalars) is not None:
        problems.append(
            f"{spec.name} gathers a whole-model statistic with these parameters (trim_scope: "
            f"model ranks each model's whole task vector at one value), so per-model "
            f"{', '.join(spread)} cannot apply; use trim_scope: tensor, or one value"
        )
    return problems


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


def count_rule_problems(spec: MethodSpec, params: Mapping[str, Any], m: int) -> list[str]:
    """Why `params` (over the defaults) do not fit `m` models, by the method's own rule."""
    if spec.validate_count is None:
        return []
    return [f"{spec.name}: {p}" for p in spec.validate_count({**spec.params, **params}, m)]


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name lists the valid ones and the closest."""
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeError(
            f"unknown merge method '{name}'{did_you_mean(name, _METHODS)}; "
            f"valid methods: {', '.join(sorted(_METHODS))}"
        ) from None


def check_params(spec: MethodSpec, params: Mapping[str, object]) -> list[str]:
    """Every problem with `params` for `spec`, as messages; an empty list means valid."""
    return spec.signature.check(spec.name, "parameter", params, spec.validate, spec.per_model)

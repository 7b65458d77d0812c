"""Plan: open every input and check the whole recipe before any tensor is loaded or written."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, ValidationError, create_model

from nanmerge._types import Checkpoint, MergeError, TensorMeta
from nanmerge.coefficients import EstimatorSpec, get_estimator
from nanmerge.config import Recipe
from nanmerge.engine._statistics import Statistics, open_statistics
from nanmerge.io import model_folder, open_model
from nanmerge.methods import MethodSpec, check_params, count_problem, get_method

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_LISTED = 8


@dataclass
class Plan:
    """Everything the stream needs, checked: open inputs, output layout, bound parameters."""

    recipe: Recipe
    method: MethodSpec
    params: dict[str, Any]
    estimator: EstimatorSpec
    estimator_options: dict[str, Any]
    base: Checkpoint | None
    models: list[Checkpoint]
    model_names: tuple[str, ...]
    entries: list[tuple[str, TensorMeta]]
    merged: set[str]
    fill_from_base: dict[str, list[int]] = field(default_factory=dict)
    copy_files_from: Path | None = None
    statistics: Statistics | None = None

    @property
    def reference(self) -> Checkpoint:
        """The input whose layout the output follows: the base, else the first model."""
        return self.base if self.base is not None else self.models[0]

    def close(self) -> None:
        for ckpt in [self.base, *self.models]:
            if ckpt is not None:
                ckpt.close()
        if self.statistics is not None:
            self.statistics.close()


def _fail(problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise MergeError(f"the recipe cannot be merged ({len(problems)} problem(s)):\n{listed}")


def _bind_options(fn: Callable[..., Any], options: Mapping[str, Any], what: str) -> list[str]:
    """Check options against the keyword-only parameters of `fn`: names and types, all at once."""
    hints = inspect.get_annotations(fn, eval_str=True)
    fields: dict[str, Any] = {
        name: (hints.get(name, Any), p.default if p.default is not p.empty else ...)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    problems = []
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            valid = ", ".join(fields) or "none"
            problems.append(f"{what}: unknown option '{key}'{hint}; valid options: {valid}")
    known = {k: v for k, v in options.items() if k in fields}
    model = create_model(f"{what}_options", __config__=ConfigDict(strict=False), **fields)
    try:
        model.model_validate(known)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "missing" and err["loc"][0] not in known:
                continue
            problems.append(f"{what}: option '{err['loc'][0]}': {err['msg']}")
    return problems


def _resolve_estimator(recipe: Recipe, problems: list[str]) -> tuple[Any, dict[str, Any]]:
    try:
        spec = get_estimator(recipe.coefficients.estimator)
    except MergeError as exc:
        problems.append(str(exc))
        return None, {}
    options = recipe.coefficients.options
    if spec.name == "manual":
        missing = [str(i) for i, m in enumerate(recipe.models) if m.coefficient is None]
        if missing:
            problems.append(
                f"coefficients: manual needs a `coefficient` on every model; models "
                f"{', '.join(missing)} have none"
            )
        options = {"values": [m.coefficient for m in recipe.models], **options}
    elif any(m.coefficient is not None for m in recipe.models):
        problems.append(
            f"models carry a `coefficient` but coefficients is '{spec.name}'; "
            "set `coefficients: manual` to use them, or remove them"
        )
    fn_options = {k: v for k, v in options.items() if k != "values" or spec.name != "manual"}
    problems += _bind_options(spec.fn, fn_options, f"estimator '{spec.name}'")
    if spec.name == "nan" and options.get("norm_of") == "task_vector" and recipe.base is None:
        problems.append("coefficients: nan with norm_of: task_vector needs a `base` model")
    return spec, options


def _resolve_method(recipe: Recipe, problems: list[str]) -> tuple[Any, dict[str, Any]]:
    try:
        spec = get_method(recipe.method)
    except MergeError as exc:
        problems.append(str(exc))
        return None, {}
    problems += check_params(spec, recipe.parameters)
    count = count_problem(spec, len(recipe.models))
    if count:
        problems.append(count)
    if spec.needs_base and recipe.base is None:
        problems.append(
            f"method '{spec.name}' adds task vectors (model - base) and needs `base`: "
            "the pretrained model the others were fine-tuned from"
        )
    return spec, {**spec.params, **recipe.parameters}


def _check_output(recipe: Recipe, problems: list[str]) -> None:
    out = recipe.output
    if out is None or recipe.overwrite or not out.exists():
        return
    if out.is_file() or any(out.iterdir()):
        problems.append(
            f"output {out} already exists and is not empty; pass --overwrite "
            "(overwrite: true) to replace it, or choose another output"
        )


def _open_inputs(
    recipe: Recipe, problems: list[str]
) -> tuple[Checkpoint | None, list[Checkpoint | None]]:
    def attempt(source: Any, base: Checkpoint | None = None) -> Checkpoint | None:
        try:  # a LoRA adapter among the models is read over the base
            return open_model(source, base=base, allow_downloads=recipe.allow_downloads)
        except MergeError as exc:
            problems.append(str(exc))
            return None

    base = None if recipe.base is None else attempt(recipe.base)
    return base, [attempt(m.path, base) for m in recipe.models]


def _display_names(models: list[Checkpoint]) -> tuple[str, ...]:
    names = [m.source for m in models]
    return tuple(n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names))


def _layout(
    recipe: Recipe, base: Checkpoint | None, models: list[Checkpoint], problems: list[str]
) -> tuple[list[tuple[str, TensorMeta]], set[str], dict[str, list[int]]]:
    """Align names across inputs and check shapes and dtypes; decide each output tensor."""
    inputs = ([base] if base is not None else []) + models
    order = list(dict.fromkeys(name for ckpt in inputs for name in ckpt))
    entries: list[tuple[str, TensorMeta]] = []
    merged: set[str] = set()
    fill: dict[str, list[int]] = {}
    absent: list[str] = []
    mismatched: list[str] = []
    for name in order:
        lacking = [c.source for c in inputs if name not in c]
        if lacking:
            in_base = base is not None and name in base
            if recipe.missing_tensors == "skip":
                continue
            if recipe.missing_tensors == "base" and in_base:
                fill[name] = [i for i, m in enumerate(models) if name not in m]
            else:
                absent.append(f"'{name}' is missing from {', '.join(lacking)}")
                continue
        present = [c for c in inputs if name in c]
        metas = [c.meta(name) for c in present]
        ref_meta = metas[0]
        shapes = {m.shape for m in metas}
        floating = {m.dtype.is_floating_point for m in metas}
        if len(shapes) > 1 or len(floating) > 1:
            detail = ", ".join(
                f"{c.source}: {tuple(m.shape)} {str(m.dtype).removeprefix('torch.')}"
                for c, m in zip(present, metas, strict=True)
            )
            mismatched.append(f"tensor '{name}' differs across inputs ({detail})")
            continue
        out_dtype = ref_meta.dtype
        if ref_meta.dtype.is_floating_point:
            merged.add(name)
            if recipe.dtype is not None:
                out_dtype = _DTYPES[recipe.dtype]
        entries.append((name, TensorMeta(ref_meta.shape, out_dtype)))
    if absent:
        problems.append(
            f"{len(absent)} tensor(s) are not in every input: "
            + "; ".join(absent[:_MAX_LISTED])
            + ("; ..." if len(absent) > _MAX_LISTED else "")
            + ". All models must share the base's tensors; set `missing_tensors: base` "
            "(use the base's value where a model lacks it) or `missing_tensors: skip`"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensor(s) have mismatched shapes or kinds: "
            + "; ".join(mismatched[:_MAX_LISTED])
            + ("; ..." if len(mismatched) > _MAX_LISTED else "")
            + ". All models must be fine-tuned from the same architecture"
        )
    if not merged and not problems:
        problems.append("the inputs hold no floating-point tensors to merge")
    return entries, merged, fill


def _check_device(recipe: Recipe, problems: list[str]) -> None:
    """The merge's device must exist here before any tensor is read."""
    try:
        device = torch.device(recipe.device)
    except RuntimeError:
        problems.append(f"device: '{recipe.device}' is not a torch device; use cpu or cuda")
        return
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    count = getattr(backend, "device_count", lambda: 0)
    if is_available is None or not is_available() or (device.index or 0) >= count():
        problems.append(
            f"device: {recipe.device} is not available to torch {torch.__version__} on this "
            "machine; set device: cpu (the default), or install a torch build for that device"
        )


def plan(recipe: Recipe, *, for_output: bool = True) -> Plan:
    """Check the recipe and every input; raise one MergeError that lists every problem."""
    problems: list[str] = []
    method, params = _resolve_method(recipe, problems)
    estimator, options = _resolve_estimator(recipe, problems)
    if for_output:
        _check_output(recipe, problems)
    _check_device(recipe, problems)
    copy_from = None
    if recipe.copy_files_from is not None:
        try:
            copy_from = model_folder(recipe.copy_files_from, allow_downloads=recipe.allow_downloads)
        except MergeError as exc:
            problems.append(f"copy_files_from: {exc}")
    base, maybe_models = _open_inputs(recipe, problems)
    models = [m for m in maybe_models if m is not None]
    opened = [c for c in [base, *models] if c is not None]
    statistics = None
    try:
        if len(models) == len(maybe_models) and (recipe.base is None or base is not None):
            entries, merged, fill = _layout(recipe, base, models, problems)
            statistics = open_statistics(recipe, method, entries, merged, problems)
        _fail(problems)
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        if statistics is not None:
            statistics.close()
        raise
    return Plan(
        recipe=recipe,
        method=method,
        params=params,
        estimator=estimator,
        estimator_options=options,
        base=base,
        models=models,
        model_names=_display_names(models),
        entries=entries,
        merged=merged,
        fill_from_base=fill,
        copy_files_from=copy_from,
        statistics=statistics,
    )

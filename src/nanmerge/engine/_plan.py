"""Plan: open every input and check the whole recipe before any tensor is loaded or written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanmerge._types import Checkpoint, MergeError, TensorContext, TensorMeta
from nanmerge.coefficients import EstimatorSpec
from nanmerge.config import Recipe
from nanmerge.engine._context import config_layers, lines_problems, tensor_contexts
from nanmerge.engine._inputs import (
    display_names,
    inputs_on_disk,
    open_inputs,
    repeated_inputs,
    side_file_folder,
)
from nanmerge.engine._layered import LayerValues, layer_values, param_values
from nanmerge.engine._recipe import (
    check_shard_size,
    fail,
    resolve_estimator,
    resolve_method,
    resolve_slices,
)
from nanmerge.engine._slices import Route, SliceLayout, slice_layout
from nanmerge.engine._statistics import Statistics, open_statistics
from nanmerge.engine._vocab import Vocab, plan_vocab
from nanmerge.io import (
    NON_WEIGHT_FILES,
    Protected,
    escaping_side_files,
    model_folder,
    output_problems,
)
from nanmerge.methods import MethodSpec

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
    copy_files_from: Path | None = None  # the recipe's, else the first input folder
    vocab: Vocab | None = None  # the recipe's `tokenizer`: embedding rows re-aligned at load
    statistics: Statistics | None = None
    protected: list[Protected] = field(default_factory=list)
    contexts: Mapping[str, TensorContext] = field(default_factory=dict)
    layered: LayerValues = field(default_factory=LayerValues)  # values that vary by tensor
    warnings: list[str] = field(default_factory=list)
    # a sliced recipe: each output tensor's inputs and method, and the output's layer count
    routes: Mapping[str, Route] = field(default_factory=dict)
    num_layers: int | None = None
    source_layers: list[int] = field(default_factory=list)  # sliced: each output layer's source

    def method_of(self, name: str) -> MethodSpec:
        """The method that merges output tensor `name` (its slice's, in a sliced recipe)."""
        route = self.routes.get(name)
        return self.method if route is None else route.method

    def params_of(self, name: str) -> Mapping[str, Any]:
        route = self.routes.get(name)
        return self.params if route is None else route.params

    def sources_of(self, name: str) -> list[tuple[Checkpoint, str]]:
        """The inputs output tensor `name` is merged from, each with the tensor's name there."""
        route = self.routes.get(name)
        if route is None:
            return [(model, name) for model in self.models]
        return [(self.models[m], n) for m, n in zip(route.models, route.names, strict=True)]

    def base_name_of(self, name: str) -> str | None:
        """The base's tensor that output tensor `name` is merged over, if any."""
        route = self.routes.get(name)
        if route is None:
            return None if self.base is None else name
        return route.base

    def coef_of(self, name: str, per_model: torch.Tensor) -> torch.Tensor:
        """The coefficients of the inputs `sources_of(name)`, from the per-model ones."""
        route = self.routes.get(name)
        return per_model if route is None else route.coef(per_model)

    @property
    def divides_by_coefficient_sum(self) -> bool:
        """Whether the method averages, w_i = coef_i / sum(coef) (README, "Coefficients")."""
        return self.method.averages(self.params)

    def chunked(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether output tensor `name` (of `shape`) is merged chunk by chunk: its method is
        elementwise, or elementwise on this tensor (`MethodSpec.elementwise_on`: what the
        subspace methods average)."""
        spec = self.method_of(name)
        if spec.elementwise_on is None:
            return spec.elementwise
        params = {**self.params_of(name), **self.layered.params.get(name, {})}
        return spec.merges_in_chunks(params, self.contexts[name], shape)

    @property
    def layout_input(self) -> Checkpoint:
        """The input whose layout the output follows: the base, else the first model."""
        return self.base if self.base is not None else self.models[0]

    def close(self) -> None:
        for ckpt in [self.base, *self.models]:
            if ckpt is not None:
                ckpt.close()
        if self.statistics is not None:
            self.statistics.close()


def _layout(
    recipe: Recipe,
    base: Checkpoint | None,
    models: list[Checkpoint],
    problems: list[str],
    vocab: Vocab | None = None,
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
        if vocab is not None and name in vocab.names:  # compared as the stream will load them
            metas = [vocab.meta(m) for m in metas]
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


def _matrix_problems(
    method: MethodSpec | None,
    routes: Mapping[str, Route],
    entries: list[tuple[str, TensorMeta]],
    merged: set[str],
) -> list[str]:
    """A method that merges 2-D matrices by their singular vectors (TSV, Iso-C) given no
    2-D tensor to merge: it would only average every tensor, so it is refused up front."""
    has_matrix: dict[str, bool] = {}
    merges: dict[str, list[str]] = {}
    for name, meta in entries:
        spec = routes[name].method if name in routes else method
        if name in merged and spec is not None and spec.needs_matrices:
            has_matrix[spec.name] = has_matrix.get(spec.name, False) or len(meta.shape) == 2
            merges.setdefault(spec.name, []).append(f"'{name}' {tuple(meta.shape)}")
    return [
        f"method '{m}' merges 2-D weight matrices through their singular vectors, but none of "
        f"the {len(merges[m])} tensor(s) it merges is 2-D (e.g. {', '.join(merges[m][:3])}), "
        "so it would only average them; use task_arithmetic or weight_average for these inputs"
        for m, found in has_matrix.items()
        if not found
    ]


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
    method, params = resolve_method(recipe, problems)
    resolved = resolve_slices(recipe, problems)
    estimator, options = resolve_estimator(recipe, problems)
    _check_device(recipe, problems)
    if for_output:
        check_shard_size(recipe, problems)
    copy_from = None
    if recipe.copy_files_from is not None:
        try:
            copy_from = model_folder(recipe.copy_files_from, allow_downloads=recipe.allow_downloads)
        except MergeError as exc:
            problems.append(f"copy_files_from: {exc}")
    base, maybe_models = open_inputs(recipe, problems)
    protected = inputs_on_disk(recipe, base, maybe_models, copy_from)
    if for_output and recipe.output is not None:
        problems += output_problems(recipe.output, overwrite=recipe.overwrite, inputs=protected)
    models = [m for m in maybe_models if m is not None]
    opened = [c for c in [base, *models] if c is not None]
    copy_from = copy_from or side_file_folder(opened)
    if for_output and copy_from is not None:
        problems += escaping_side_files(copy_from, NON_WEIGHT_FILES)
    statistics = None
    vocab = None
    try:
        if len(models) == len(maybe_models) and (recipe.base is None or base is not None):
            sliced = SliceLayout()
            vocab = plan_vocab(recipe, base, models, copy_from, problems, for_output=for_output)
            if recipe.slices is None:
                entries, merged, fill = _layout(recipe, base, models, problems, vocab)
            else:
                sliced = slice_layout(recipe, resolved, base, models, problems)
                entries, merged, fill = sliced.entries, sliced.merged, {}
            statistics = open_statistics(recipe, method, entries, merged, problems)
            contexts = tensor_contexts(
                [name for name, _ in entries],
                configured_layers=sliced.num_layers or config_layers(side_file_folder(opened)),
            )
            problems += lines_problems(recipe, method, contexts)
            problems += _matrix_problems(method, sliced.routes, entries, merged)
            layered = layer_values(recipe, method, contexts, merged, problems)
            # each slice's own depth (none without slices, or when the layout failed)
            depth = zip(resolved, sliced.depth, strict=False)
            for i, ((spec, params), placed) in enumerate(depth):
                layered.params.update(
                    param_values(params, spec, placed, problems, f"slices[{i}].parameters")
                )
        fail(problems)
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
        model_names=display_names(models),
        entries=entries,
        merged=merged,
        fill_from_base=fill,
        vocab=vocab,
        copy_files_from=copy_from,
        protected=protected,
        statistics=statistics,
        warnings=repeated_inputs(recipe, base, models) + sliced.warnings,
        routes=sliced.routes,
        num_layers=sliced.num_layers or None,
        source_layers=sliced.source_layers,
        contexts=contexts,
        layered=layered,
    )

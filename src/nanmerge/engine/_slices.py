"""Slices: an output stacked from layer ranges of the inputs, renumbered, each range merged
by its slice's method (mergekit's `slices`).

The plan turns a sliced recipe into one `Route` per output tensor, saying which input
tensors (by model and name) it is merged from and how; the stream reads and merges them as
it does every tensor. Tensors outside the blocks follow mergekit: embeddings come from the
first slice's sources, everything else (final norm, head) from the last slice's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanmerge._types import Checkpoint, TensorContext, TensorMeta, TensorNorms
from nanmerge.config import Recipe, Slice
from nanmerge.engine._context import _CONFIG_KEYS, split_layer, tensor_contexts
from nanmerge.methods import MethodSpec

if TYPE_CHECKING:
    import torch

_MAX_LISTED = 8


@dataclass(frozen=True)
class Route:
    """Where one output tensor comes from: its method, and per source the model (index into
    the plan's models), the tensor's name there and the slice's coefficient for it."""

    method: MethodSpec
    params: Mapping[str, Any]
    models: tuple[int, ...]
    names: tuple[str, ...]
    coefficients: tuple[float | None, ...]
    base: str | None  # the base's tensor, named as the first source's, for task vectors

    def coef(self, per_model: torch.Tensor) -> torch.Tensor:
        """The sources' coefficients: the slice's where given, else their model's."""
        picked = per_model[list(self.models)].clone()
        for i, value in enumerate(self.coefficients):
            if value is not None:
                picked[i] = value
        return picked

    def per_model(self, norms: TensorNorms, m: int) -> TensorNorms:
        """Sources' norms as per-model sums (0 for a model the tensor does not read), so
        model-level totals add up over a sliced merge as over any other."""

        def spread(sums: tuple[float, ...]) -> tuple[float, ...]:
            out = [0.0] * m
            for model, value in zip(self.models, sums, strict=True):
                out[model] += value
            return tuple(out)

        tv = norms.sumsq_task_vector
        return TensorNorms(norms.numel, spread(norms.sumsq_finetuned), tv and spread(tv))


@dataclass
class _Layers:
    """One input's names by layer (layer -> rest of the name -> name) and outside layers."""

    prefix: str
    count: int
    by_layer: dict[int, dict[str, str]]
    outside: list[str]


@dataclass
class SliceLayout:
    entries: list[tuple[str, TensorMeta]] = field(default_factory=list)
    merged: set[str] = field(default_factory=set)
    routes: dict[str, Route] = field(default_factory=dict)
    num_layers: int = 0
    warnings: list[str] = field(default_factory=list)
    source_layers: list[int] = field(default_factory=list)  # per output layer, its first source's
    # per slice, its output tensors placed within the slice: a schedule runs over the
    # slice's own layers, as mergekit counts depth within each slice
    depth: list[list[TensorContext]] = field(default_factory=list)


def _layers(ckpt: Checkpoint, label: str, problems: list[str]) -> _Layers | None:
    by_layer: dict[int, dict[str, str]] = {}
    prefixes: set[str] = set()
    outside = []
    for name in ckpt:
        split = split_layer(name)
        if split is None:
            outside.append(name)
            continue
        prefix, layer, rest = split
        prefixes.add(prefix)
        by_layer.setdefault(layer, {})[rest] = name
    if len(prefixes) == 1:
        return _Layers(prefixes.pop(), max(by_layer) + 1, by_layer, outside)
    problems.append(
        f"{label} ({ckpt.source}): "
        + (
            "no tensor name has a layer index, so its layers cannot be sliced; slices need "
            "names like model.layers.N. (Llama), h.N. (GPT-2) or encoder.layer.N. (BERT)"
            if not prefixes
            else f"its names hold {len(prefixes)} layer stacks ({', '.join(sorted(prefixes))}); "
            "slices restack a model with one"
        )
    )
    return None


def _range_problems(
    recipe: Recipe, index: dict[str, int], layers: list[_Layers | None]
) -> list[str]:
    slices = recipe.slices or []
    return [
        f"slices[{i}].sources[{j}]: layers [{first}, {end}) reach beyond {src.model}, which has "
        f"{found.count} layers (0 to {found.count - 1}); end the range at {found.count} or less"
        for i, piece in enumerate(slices)
        for j, src in enumerate(piece.sources)
        for first, end in [src.layers]
        if (found := layers[index[src.model]]) is not None and end > found.count
    ]


def _reused(recipe: Recipe) -> list[str]:
    """Warnings for a model's layers placed twice in the output (depth up-scaling does it
    on purpose; a typo does it by accident)."""
    placed = [(i, s) for i, piece in enumerate(recipe.slices or []) for s in piece.sources]
    return [
        f"layers [{max(a.layers[0], b.layers[0])}, {min(a.layers[1], b.layers[1])}) of "
        f"{a.model} are used by slices[{i}] and slices[{k}]: the output repeats them"
        for n, (i, a) in enumerate(placed)
        for k, b in placed[n + 1 :]
        if i != k and a.model == b.model and a.layers[0] < b.layers[1] and b.layers[0] < a.layers[1]
    ]


def _route(
    spec: tuple[MethodSpec, dict[str, Any]], piece: Slice, index: dict[str, int], names: list[str]
) -> Route:
    method, params = spec
    return Route(
        method,
        params,
        tuple(index[s.model] for s in piece.sources),
        tuple(names),
        tuple(s.coefficient for s in piece.sources),
        names[0] if method.needs_base else None,
    )


def _check_route(
    out: str, route: Route, base: Checkpoint | None, models: list[Checkpoint], problems: list[str]
) -> TensorMeta | None:
    """The output tensor's meta, or None with a problem when its inputs do not agree."""
    inputs = [(models[m], name) for m, name in zip(route.models, route.names, strict=True)]
    if route.base is not None and base is not None:
        if route.base not in base:
            problems.append(f"'{out}': the base lacks '{route.base}', which its method needs")
            return None
        inputs.append((base, route.base))
    lacking = [f"{c.source} lacks '{name}'" for c, name in inputs if name not in c]
    if lacking:
        problems.append(f"'{out}': {'; '.join(lacking)}")
        return None
    metas = [c.meta(name) for c, name in inputs]
    if len({(m.shape, m.dtype.is_floating_point) for m in metas}) > 1:
        detail = ", ".join(
            f"{c.source} '{name}': {tuple(m.shape)} {str(m.dtype).removeprefix('torch.')}"
            for (c, name), m in zip(inputs, metas, strict=True)
        )
        problems.append(f"'{out}' is merged from tensors that differ ({detail})")
        return None
    return metas[0]


def slice_layout(
    recipe: Recipe,
    resolved: list[tuple[MethodSpec, dict[str, Any]]],
    base: Checkpoint | None,
    models: list[Checkpoint],
    problems: list[str],
) -> SliceLayout:
    """Every output tensor of a sliced recipe, with its route and meta; problems for ranges
    beyond a model's layers, models without parsable layers and inputs that disagree."""
    import torch

    slices = recipe.slices or []
    index = {m.path: i for i, m in enumerate(recipe.models) if isinstance(m.path, str)}
    found: list[str] = []
    parsed = [_layers(c, f"models[{i}]", found) for i, c in enumerate(models)]
    layers = [p for p in parsed if p is not None]
    found += _range_problems(recipe, index, parsed)
    if found or len(resolved) != len(slices):
        problems += found
        return SliceLayout()
    layout = SliceLayout(warnings=_reused(recipe))
    first = layers[index[slices[0].sources[0].model]]
    pre: list[tuple[str, Route]] = []
    post: list[tuple[str, Route]] = []
    roles = tensor_contexts(first.outside)
    for name in first.outside:
        at_start = roles[name].role == "embedding"
        piece, spec = (slices[0], resolved[0]) if at_start else (slices[-1], resolved[-1])
        route = _route(spec, piece, index, [name] * len(piece.sources))
        (pre if at_start else post).append((name, route))
    layout.depth = [[] for _ in slices]
    for name, _ in pre:
        layout.depth[0].append(roles[name])
    for name, _ in post:
        layout.depth[-1].append(roles[name])
    stacked: list[tuple[str, Route]] = []
    for k, (spec, piece) in enumerate(zip(resolved, slices, strict=True)):
        sources = [layers[index[s.model]] for s in piece.sources]
        for offset in range(piece.length):
            at = [s.layers[0] + offset for s in piece.sources]
            rests = dict.fromkeys(
                r for src, i in zip(sources, at, strict=True) for r in src.by_layer.get(i, {})
            )
            stacked += [
                (
                    f"{first.prefix}{layout.num_layers}{rest}",
                    _route(
                        spec,
                        piece,
                        index,
                        [f"{src.prefix}{i}{rest}" for src, i in zip(sources, at, strict=True)],
                    ),
                )
                for rest in rests
            ]
            outs = [f"{first.prefix}{layout.num_layers}{rest}" for rest in rests]
            roles_here = tensor_contexts(outs)
            layout.depth[k] += [
                TensorContext(out, offset, piece.length, roles_here[out].role) for out in outs
            ]
            layout.num_layers += 1
            layout.source_layers.append(piece.sources[0].layers[0] + offset)
    disagreeing: list[str] = []
    for out, route in [*pre, *stacked, *post]:
        meta = _check_route(out, route, base, models, disagreeing)
        if meta is None:
            continue
        dtype = meta.dtype
        if dtype.is_floating_point:
            layout.merged.add(out)
            dtype = getattr(torch, recipe.dtype) if recipe.dtype else dtype
        layout.routes[out] = route
        layout.entries.append((out, TensorMeta(meta.shape, dtype)))
    if disagreeing:
        more = len(disagreeing) - _MAX_LISTED
        problems.append(
            f"{len(disagreeing)} output tensor(s) cannot be merged from their slices' sources: "
            + "; ".join(disagreeing[:_MAX_LISTED])
            + (f"; ... and {more} more" if more > 0 else "")
            + ". A slice's sources must be models of one architecture"
        )
    return layout


def layer_count_config(folder: Path, source_layers: list[int]) -> str | None:
    """The folder's config.json for the stacked output, whose layer i was layer
    `source_layers[i]` of its first source: the layer count set, and a per-layer list
    (`layer_types`: Qwen3's and Gemma's sliding or full attention) restacked the same way.
    None when there is no config or it states no count (nothing to rewrite)."""
    try:
        config: Any = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    keys = [k for k in _CONFIG_KEYS if isinstance(config, dict) and k in config]
    if not keys:
        return None
    out = {**config, **dict.fromkeys(keys, len(source_layers))}
    per_layer = config.get("layer_types")
    if isinstance(per_layer, list) and len(per_layer) > max(source_layers, default=-1):
        out["layer_types"] = [per_layer[i] for i in source_layers]
    return json.dumps(out, indent=2) + "\n"

"""Layer swapping (Bandarkar et al., arXiv 2410.01335) as `slices`: the bottom and top layers
of one expert around the middle layers of another, with blended transition layers.

The paper swaps the top and bottom transformer layers of a task expert (math) for those of
a language expert, both fine-tuned from one base: the outer layers carry the language, the
middle ones the task. A transition zone of `transition` layers on each side of the middle
averages the two experts, the weight moving linearly from the outer expert to the inner
one. Non-layer tensors follow the slices rule: embeddings from the first slice, the final
norm and head from the last, so here from the outer expert wherever `bottom`/`top` > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_FIELDS = ("outer", "inner", "layers", "bottom", "top", "transition")


def _passthrough(model: str, first: int, end: int) -> dict[str, Any]:
    return {"sources": [{"model": model, "layers": [first, end]}], "method": "passthrough"}


def _blend(outer: str, inner: str, layer: int, inner_weight: float) -> dict[str, Any]:
    """One transition layer: the two experts' layer averaged with weights (1 - w, w)."""
    return {
        "sources": [
            {"model": outer, "layers": [layer, layer + 1], "coefficient": 1.0 - inner_weight},
            {"model": inner, "layers": [layer, layer + 1], "coefficient": inner_weight},
        ],
        "method": "weight_average",
    }


def _problems(spec: Mapping[str, Any]) -> list[str]:
    problems = [
        f"unknown field '{k}' (fields: {', '.join(_FIELDS)})" for k in spec if k not in _FIELDS
    ]
    problems += [f"`{k}` is required" for k in ("outer", "inner", "layers") if k not in spec]
    problems += [
        f"`{k}` must be a model path or repo id"
        for k in ("outer", "inner")
        if k in spec and not isinstance(spec[k], str)
    ]
    counts = {k: spec.get(k, 0) for k in ("layers", "bottom", "top", "transition")}
    bad = [k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    problems += [f"`{k}` must be a whole number >= 0" for k in bad]
    if not bad and "layers" in spec:
        used = counts["bottom"] + counts["top"] + 2 * counts["transition"]
        if used > counts["layers"]:
            problems.append(
                f"bottom + top + 2 * transition = {used} layers overlap in a model of "
                f"{counts['layers']} layers; make them add up to at most `layers`"
            )
    return problems


def layer_swap(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The slices of a layer swap `{outer, inner, layers, bottom, top, transition}`: layers
    [0, bottom) and [layers - top, layers) of `outer`, the middle of `inner`, and
    `transition` blended layers on each side of the middle. Raises ValueError listing every
    problem with `spec`."""
    if not isinstance(spec, Mapping):
        raise ValueError("layer_swap must be a mapping {outer, inner, layers, bottom, top, ...}")
    problems = _problems(spec)
    if problems:
        raise ValueError("layer_swap: " + "; ".join(problems))
    outer, inner, n = spec["outer"], spec["inner"], spec["layers"]
    bottom, top, k = spec.get("bottom", 0), spec.get("top", 0), spec.get("transition", 0)
    steps = [(j + 1) / (k + 1) for j in range(k)]
    slices = [_passthrough(outer, 0, bottom)] if bottom else []
    slices += [_blend(outer, inner, bottom + j, w) for j, w in enumerate(steps)]
    if n - top - k > bottom + k:
        slices.append(_passthrough(inner, bottom + k, n - top - k))
    slices += [_blend(outer, inner, n - top - k + j, w) for j, w in enumerate(steps[::-1])]
    if top:
        slices.append(_passthrough(outer, n - top, n))
    return slices

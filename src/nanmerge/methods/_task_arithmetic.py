"""Task-vector methods as rows of the steps table (`_steps`): task arithmetic, TIES, DARE,
Model Breadcrumbs and breadcrumbs with TIES' election."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nanmerge._types import MemoryCost
from nanmerge.methods._bands import (
    Conventions,
    ModelBand,
    Rescale,
    TrimScope,
    random_bands,
    task_vector_bands,
)
from nanmerge.methods._model_trim import Selection, whole_model_cuts
from nanmerge.methods._registry import ELEMENTWISE, Density, Gamma, Scale, register
from nanmerge.methods._steps import (
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DARE_LINEAR,
    DARE_TIES,
    TASK_ARITHMETIC,
    TIES,
    Merge,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


def _averages(params: Mapping[str, Any]) -> bool:
    """merge="mean" divides by the sum of the kept models' coefficients."""
    return params.get("merge") == "mean"


@register(reference="https://arxiv.org/abs/2212.04089", needs_base=True, elementwise=True)
def task_arithmetic(
    tensors: torch.Tensor, coef: torch.Tensor, *, base: torch.Tensor, scale: Scale = 0.3
) -> torch.Tensor:
    """base + scale * sum_i coef_i * tau_i (Ilharco et al. 2023).

    https://arxiv.org/abs/2212.04089. The paper's scale 0.3 is the default; mergekit has no
    global scale (each model's `weight` plays the role of scale * coef_i).
    """
    return TASK_ARITHMETIC(tensors, coef, base=base, scale=scale)


def _trim_rules(params: Mapping[str, Any]) -> list[str]:
    """rescale is not probability (a magnitude trim keeps entries for certain: there is no
    keep probability to divide by), and conventions = mergekit goes with trim_scope = tensor
    (mergekit ranks each tensor alone)."""
    problems = []
    if params.get("rescale") == "probability":
        problems.append(
            "rescale = 'probability' divides each entry by its keep probability, but a "
            "magnitude trim keeps entries for certain; use rescale: l1 (mergekit's "
            "rescale: true) or rescale: none"
        )
    if params.get("conventions") == "mergekit" and params.get("trim_scope") == "model":
        problems.append(
            "conventions = 'mergekit' reproduces mergekit's trim, which ranks each tensor "
            "alone, while trim_scope = 'model' ranks the whole model; use trim_scope: "
            "tensor, or conventions: nanmerge"
        )
    return problems


# A trim's preparation above the M + 1 tensors as read, measured on 20M-entry tensors (M = 3
# and 6: docs/PERFORMANCE.md): mergekit's conventions sort each model's magnitudes whole and
# keep a bool per entry and model, 6 L + M/4 L; an L1 factor under nanmerge's forms one
# model's magnitudes, mask and masked copy, 3.3 L. Finding cuts alone fits ELEMENTWISE.
SORTED_TRIM = MemoryCost(
    lambda m: m + 7 + -(-m // 4), ELEMENTWISE.chunks, "(M + ceil(M / 4) + 7) * L + (6M + 4) * C"
)
L1_TRIM = MemoryCost(lambda m: m + 5, ELEMENTWISE.chunks, "(M + 5) * L + (6M + 4) * C")


def _trim_memory(params: Mapping[str, Any]) -> MemoryCost:
    """The trims' working set under these conventions and rescale."""
    if params["conventions"] == "mergekit":
        return SORTED_TRIM
    return L1_TRIM if params["rescale"] == "l1" else ELEMENTWISE


@register(
    reference="https://arxiv.org/abs/2306.01708",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
    memory=_trim_memory,
    validate=_trim_rules,
    averages=_averages,
    collect=whole_model_cuts,
    per_model=("density",),
)
def ties(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.2,
    scale: Scale = 1.0,
    merge: Merge = "mean",
    trim_scope: TrimScope = "tensor",
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "none",
    bands: Sequence[ModelBand] | None = None,
    offset: int = 0,
    collected: Selection | None = None,
) -> torch.Tensor:
    """TIES: trim each task vector to its top-k magnitudes, elect signs, merge agreeing entries.

    https://arxiv.org/abs/2306.01708. trim_scope="tensor" (default) trims per model and per
    tensor, keeping exactly k = max(1, round(density * numel)) entries (ties at the k-th
    largest in index order), as mergekit does (with k = int(density * numel)).
    trim_scope="model" trims as the paper's code does (github.com/prateeky2806/ties-merging,
    FusionBench's ties_merging_utils): per model over its whole flattened task vector, keeping
    every entry >= the exact k-th largest, k = max(1, round(density * N)) of its N entries,
    ties at it all kept. (Their code keeps >= the (int(density * N) + 1)-th largest, one
    entry more.) That costs two reads of every input before the merge: the statistics pass
    and one more (an exact radix select: `_model_trim`). Called directly, a tensor is taken
    as the whole model.
    The coefficient weighs each tau_i in the election and the sum; merge="mean" divides by
    the kept models' coefficient sum (mergekit's normalize: true), "count" by the number of
    kept models (the paper's disjoint mean; the same at uniform coefficients), "sum" not at
    all. A zero elected sum keeps nothing; the paper's code gives it the majority sign.
    conventions="mergekit" reproduces mergekit 0.1.5: k = max(1, int(density * numel)), the
    kept set from the same torch.argsort it calls (its order among equal magnitudes), a sum
    >= 0 elects +, and a zero "mean" divisor becomes 1 (not with trim_scope="model").
    rescale="l1" (mergekit's rescale: true) multiplies each model's kept entries by
    ||tau_i||_1 / ||kept tau_i||_1 per tensor; in a chunked merge `prepare` finds it over
    the whole tensor with the bands.
    """
    return TIES(
        tensors,
        coef,
        base=base,
        scale=scale,
        merge=merge,
        density=density,
        bands=bands,
        offset=offset,
        trim_scope=trim_scope,
        collected=collected,
        conventions=conventions,
        rescale=rescale,
    )


@register(
    reference="https://arxiv.org/abs/2311.03099",
    needs_base=True,
    elementwise=True,
    prepare=random_bands,
    per_model=("density",),
)
def dare_linear(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.5,
    scale: Scale = 0.3,
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "probability",
    generator: np.random.Generator | None = None,
    bands: Sequence[ModelBand] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale by 1/density, sum.

    https://arxiv.org/abs/2311.03099. Unbiased: the expectation is task arithmetic. Pass
    `tensor_generator(seed, name)` (numpy) for reproducible masks, drawn on the CPU.
    mergekit and PEFT draw from the global RNG; mergekit defaults density to 1.0 (no drop).
    rescale="l1" is mergekit's rescale: true (each model's kept entries times
    ||tau_i||_1 / ||kept tau_i||_1 per tensor; in a chunked merge `prepare` draws the whole
    mask from a copy of the generator to find it), "none" its rescale: false. A plain sum
    is the same under both conventions (accepted so that every preset takes it).
    """
    return DARE_LINEAR(
        tensors,
        coef,
        base=base,
        scale=scale,
        density=density,
        generator=generator,
        conventions=conventions,
        rescale=rescale,
        bands=bands,
    )


@register(
    reference="https://arxiv.org/abs/2311.03099",
    needs_base=True,
    elementwise=True,
    prepare=random_bands,
    averages=_averages,
    per_model=("density",),
)
def dare_ties(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.5,
    scale: Scale = 1.0,
    merge: Merge = "mean",
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "probability",
    generator: np.random.Generator | None = None,
    bands: Sequence[ModelBand] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and merge of the agreeing entries.

    https://arxiv.org/abs/2311.03099. mergekit's dare_ties sums by default (normalize off);
    PEFT's divides by the count of agreeing models (merge="count" here); merge="mean" divides
    by the sum of their coefficients, as `ties` does. rescale as in `dare_linear`;
    conventions="mergekit": a sum >= 0 elects + and a zero "mean" divisor becomes 1.
    """
    return DARE_TIES(
        tensors,
        coef,
        base=base,
        scale=scale,
        merge=merge,
        density=density,
        generator=generator,
        conventions=conventions,
        rescale=rescale,
        bands=bands,
    )


def _band_fits(params: Mapping[str, Any]) -> list[str]:
    """gamma + density <= 1 (the dropped top fraction and the kept fraction fit the tensor;
    under conventions = mergekit fewer outliers are dropped instead), and the trim's rules:
    rescale is not probability, conventions = mergekit goes with trim_scope = tensor."""
    gamma, density = params["gamma"], params["density"]
    if gamma + density <= 1 + 1e-9 or params.get("conventions") == "mergekit":
        return _trim_rules(params)
    return [
        f"parameters gamma = {gamma!r} and density = {density!r} sum to {gamma + density:g}; "
        "gamma + density must be <= 1 (the dropped top fraction and the kept fraction cannot "
        "exceed the tensor)",
        *_trim_rules(params),
    ]


@register(
    reference="https://arxiv.org/abs/2312.06795",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
    memory=_trim_memory,
    validate=_band_fits,
    collect=whole_model_cuts,
    per_model=("density", "gamma"),
)
def breadcrumbs(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.9,
    gamma: Gamma | tuple[float, ...] = 0.01,
    scale: Scale = 0.3,
    trim_scope: TrimScope = "tensor",
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "none",
    bands: Sequence[ModelBand] | None = None,
    offset: int = 0,
    collected: Selection | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs: per model drop the top gamma outliers and the small tail, then sum.

    https://arxiv.org/abs/2312.06795. Per model and tensor (the paper masks layer by layer),
    the round(gamma * numel) largest |entries| are dropped and the next
    max(1, round(density * numel)) kept (exact counts). mergekit does the same per tensor
    with int() rounding, defaults density to 1.0 (no trimming), and when the counts overlap
    drops fewer outliers; here gamma + density > 1 is rejected up front. trim_scope="model"
    (not in the paper) ranks over each model's whole task vector as `ties` does: entries
    >= the drop cut's magnitude dropped, those >= the keep cut's kept; the same two passes.
    conventions="mergekit" keeps what mergekit 0.1.5's magnitude_outliers keeps (its int()
    counts, no minimum of one, the same ascending torch.sort, fewer outliers dropped when
    the counts overlap, the whole tensor at density >= 1); rescale="l1" as in `ties`.
    """
    return BREADCRUMBS(
        tensors,
        coef,
        base=base,
        scale=scale,
        density=density,
        gamma=gamma,
        bands=bands,
        offset=offset,
        trim_scope=trim_scope,
        collected=collected,
        conventions=conventions,
        rescale=rescale,
    )


@register(
    reference="https://arxiv.org/abs/2312.06795",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
    memory=_trim_memory,
    validate=_band_fits,
    averages=_averages,
    collect=whole_model_cuts,
    per_model=("density", "gamma"),
)
def breadcrumbs_ties(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.9,
    gamma: Gamma | tuple[float, ...] = 0.01,
    scale: Scale = 1.0,
    merge: Merge = "sum",
    trim_scope: TrimScope = "tensor",
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "none",
    bands: Sequence[ModelBand] | None = None,
    offset: int = 0,
    collected: Selection | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs' band per model (see `breadcrumbs`), then TIES' sign election and
    merge of the agreeing entries (see `ties`): mergekit's breadcrumbs_ties.

    https://arxiv.org/abs/2312.06795 (the paper sums; the election is mergekit's addition,
    github.com/arcee-ai/mergekit merge_methods/registry.py). mergekit's defaults: gamma 0.01,
    normalize off (merge="sum" here), lambda 1 (scale); its density 1.0 keeps every entry,
    so density defaults to breadcrumbs' 0.9 here. The coefficient weighs each tau_i in the
    election and the sum; merge, conventions and rescale as in `ties`.
    """
    return BREADCRUMBS_TIES(
        tensors,
        coef,
        base=base,
        scale=scale,
        merge=merge,
        density=density,
        gamma=gamma,
        bands=bands,
        offset=offset,
        trim_scope=trim_scope,
        collected=collected,
        conventions=conventions,
        rescale=rescale,
    )

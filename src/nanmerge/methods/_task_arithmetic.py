"""Task-vector methods: a table of steps, and the published methods as its rows.

tau_i = tensors[i] - base; every method computes base + scale * combine(sparsify(tau)),
differing only in its steps: how each tau_i is sparsified (kept whole, trimmed to a band of
magnitudes, or dropped at random) and how the kept entries are combined (a weighted sum or
mean, or TIES' sign election first). A new variant is a new row, or a new step beside these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nanmerge.methods._bands import TrimScope, single, task_vector_bands
from nanmerge.methods._model_trim import Selection, model_bands, select, whole_model_cuts
from nanmerge.methods._registry import Density, Gamma, Scale, register
from nanmerge.methods._sparsify import (
    Band,
    PerModel,
    band_of,
    band_ranks,
    keep_probability,
    of_model,
    random_mask,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

Merge = Literal["mean", "sum", "count"]
# sparsify(task_vectors, coef, **params) -> the per-model weights of the kept entries; it
# updates the (M, *shape) task vectors in place.
Sparsify = Callable[..., "torch.Tensor"]
# combine(task_vectors, weights, coef, merge) -> the merged update, before scale and base.
Combine = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", Merge], "torch.Tensor"]


def keep_all(task_vectors: torch.Tensor, coef: torch.Tensor, **_: object) -> torch.Tensor:
    """No sparsification: every entry is kept, weighted by its coefficient."""
    return coef


def trim(
    task_vectors: torch.Tensor,
    coef: torch.Tensor,
    *,
    density: PerModel,
    gamma: PerModel = 0.0,
    bands: Sequence[Band] | None = None,
    offset: int = 0,
    trim_scope: TrimScope = "tensor",
    collected: Selection | None = None,
    **_: object,
) -> torch.Tensor:
    """Keep each model's band of magnitudes: the top round(gamma n) dropped, the next
    max(1, round(density n)) kept (density and gamma: one value, or one per model); `bands`
    found over the whole tensor make it elementwise. With trim_scope="model" the cuts are
    the whole model's (`collected`); without them this tensor is taken as the whole model."""
    flat = task_vectors.view(task_vectors.shape[0], -1)
    if bands is None and trim_scope == "model":
        ranks = band_ranks(flat.shape[1], density=single(density), gamma=single(gamma))
        bands = model_bands(collected or select(task_vectors, ranks))
    for i, row in enumerate(flat):
        magnitudes = row.abs()  # one model at a time: one tensor's worth of workspace
        if bands is None:
            band = band_of(magnitudes, density=of_model(density, i), gamma=of_model(gamma, i))
        else:
            band = bands[i]
        row.mul_(band.mask(magnitudes, offset))
    return coef


def drop(
    task_vectors: torch.Tensor,
    coef: torch.Tensor,
    *,
    density: PerModel,
    generator: np.random.Generator | None = None,
    **_: object,
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density (one, or one per model); the kept
    ones are rescaled by 1 / p, folded into the weights, so it costs no pass."""
    import torch

    task_vectors.mul_(random_mask(task_vectors.shape, density, generator, task_vectors.device))
    if isinstance(density, int | float):
        return coef / keep_probability(density)
    kept = [keep_probability(d) for d in density]
    return coef / torch.tensor(kept, dtype=coef.dtype, device=coef.device)


def weighted_sum(
    task_vectors: torch.Tensor, weights: torch.Tensor, coef: torch.Tensor, merge: Merge
) -> torch.Tensor:
    """sum_i weights_i tau_i; merge="mean" divides by sum_i coef_i (0 where that is 0)."""
    import torch

    flat = task_vectors.view(task_vectors.shape[0], -1)
    # a weighted sum over models is one matrix-vector product
    merged = torch.mv(flat.t(), weights).view(task_vectors.shape[1:])
    total = float(coef.sum())
    if merge == "mean":
        merged.div_(total) if total != 0 else merged.zero_()  # 0 where no coefficient is kept
    return merged


def elect_signs(
    task_vectors: torch.Tensor, weights: torch.Tensor, coef: torch.Tensor, merge: Merge
) -> torch.Tensor:
    """TIES: sign(sum_i weights_i tau_i) per entry; an entry of model i is kept when
    weights_i tau_i has that sign, so zeros (and entries whose elected sum is exactly zero)
    contribute nothing. merge="mean" divides by sum_i coef_i over the kept entries (0 where
    that is 0); "count" by how many models are kept there (the TIES paper's disjoint mean);
    "sum" does not divide."""
    import torch

    flat_shape = (task_vectors.shape[0], -1)
    weighted = task_vectors.mul_(weights.reshape((-1,) + (1,) * (task_vectors.dim() - 1)))
    elected = weighted.sum(dim=0).sign()
    # sign(w) == elected != 0 exactly when w * elected > 0 (elected is -1, 0 or 1)
    kept = torch.mul(weighted, elected).gt_(0)  # 1.0 where kept, else 0.0
    merged = weighted.mul_(kept).sum(dim=0)
    if merge == "mean":
        divisor = torch.mv(kept.view(flat_shape).t(), coef).view(merged.shape)
        # 0 where no coefficient is kept: x / 0 is inf or nan there (and a quotient past
        # float32's range, which finite inputs reach only with absurd coefficients)
        merged.div_(divisor).nan_to_num_(0.0, 0.0, 0.0)
    elif merge == "count":
        merged.div_(kept.sum(dim=0)).nan_to_num_(0.0)  # 0 / 0 where no model is kept
    return merged


@dataclass(frozen=True)
class Steps:
    """One method of the family: its sparsify step and its combine step."""

    sparsify: Sparsify
    combine: Combine

    def __call__(
        self,
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor,
        scale: float,
        merge: Merge = "sum",
        **params: Any,
    ) -> torch.Tensor:
        """base + scale * combine(sparsify(tau)). Every step is elementwise once each
        model's band is known, so a chunk (flat entries offset, offset + 1, ...) is merged
        alone when `bands` come from `task_vector_bands` over the whole tensor."""
        # `task_vectors` is this call's own buffer: the steps update it in place (the same
        # values as out-of-place ops, without a fresh (M, *shape) allocation per step).
        task_vectors = tensors - base
        weights = self.sparsify(task_vectors, coef, **params)
        return self.combine(task_vectors, weights, coef, merge).mul_(scale).add_(base)


TASK_ARITHMETIC = Steps(keep_all, weighted_sum)
TIES = Steps(trim, elect_signs)
DARE_LINEAR = Steps(drop, weighted_sum)
DARE_TIES = Steps(drop, elect_signs)
BREADCRUMBS = Steps(trim, weighted_sum)


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


@register(
    reference="https://arxiv.org/abs/2306.01708",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
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
    bands: Sequence[Band] | None = None,
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
    )


@register(
    reference="https://arxiv.org/abs/2311.03099",
    needs_base=True,
    elementwise=True,
    per_model=("density",),
)
def dare_linear(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.5,
    scale: Scale = 0.3,
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale by 1/density, sum.

    https://arxiv.org/abs/2311.03099. Unbiased: the expectation is task arithmetic. Pass
    `tensor_generator(seed, name)` (numpy) for reproducible masks, drawn on the CPU.
    mergekit and PEFT draw from the global RNG; mergekit defaults density to 1.0 (no drop).
    """
    return DARE_LINEAR(tensors, coef, base=base, scale=scale, density=density, generator=generator)


@register(
    reference="https://arxiv.org/abs/2311.03099",
    needs_base=True,
    elementwise=True,
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
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and merge of the agreeing entries.

    https://arxiv.org/abs/2311.03099. mergekit's dare_ties sums by default (normalize off);
    PEFT's divides by the count of agreeing models (merge="count" here); merge="mean" divides
    by the sum of their coefficients, as `ties` does.
    """
    return DARE_TIES(
        tensors, coef, base=base, scale=scale, merge=merge, density=density, generator=generator
    )


def _band_fits(params: Mapping[str, Any]) -> list[str]:
    """gamma + density <= 1: the dropped top fraction and the kept fraction fit the tensor."""
    gamma, density = params["gamma"], params["density"]
    if gamma + density <= 1 + 1e-9:
        return []
    return [
        f"parameters gamma = {gamma!r} and density = {density!r} sum to {gamma + density:g}; "
        "gamma + density must be <= 1 (the dropped top fraction and the kept fraction cannot "
        "exceed the tensor)"
    ]


@register(
    reference="https://arxiv.org/abs/2312.06795",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
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
    bands: Sequence[Band] | None = None,
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
    )

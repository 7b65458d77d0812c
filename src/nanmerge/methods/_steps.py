"""The task-vector family's steps: a table of them, and the published methods' rows.

tau_i = tensors[i] - base; every method computes base + scale * combine(sparsify(tau)),
differing only in its steps: how each tau_i is sparsified (kept whole, trimmed to a band of
magnitudes, dropped at random, or pruned at random by magnitude rank: `_della`) and how the
kept entries are combined (a weighted sum or mean, or TIES' sign election first). A new
variant is a new row, or a new step beside these. The registered methods: `_task_arithmetic`,
`_della`, `_sce`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nanmerge.methods._bands import (
    Conventions,
    ModelBand,
    Rescale,
    TrimScope,
    l1_ratio,
    mergekit_band,
    single,
    with_l1,
)
from nanmerge.methods._model_trim import Selection, model_bands, select
from nanmerge.methods._sparsify import (
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
# combine(task_vectors, weights, coef, merge, conventions) -> the merged update, before scale
# and base.
Combine = Callable[
    ["torch.Tensor", "torch.Tensor", "torch.Tensor", Merge, Conventions], "torch.Tensor"
]


def keep_all(task_vectors: torch.Tensor, coef: torch.Tensor, **_: object) -> torch.Tensor:
    """No sparsification: every entry is kept, weighted by its coefficient."""
    return coef


def trim(
    task_vectors: torch.Tensor,
    coef: torch.Tensor,
    *,
    density: PerModel,
    gamma: PerModel | None = None,
    bands: Sequence[ModelBand] | None = None,
    offset: int = 0,
    trim_scope: TrimScope = "tensor",
    collected: Selection | None = None,
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "none",
    **_: object,
) -> torch.Tensor:
    """Keep each model's band of magnitudes: the top round(gamma n) dropped, the next
    max(1, round(density n)) kept (density and gamma: one value, or one per model; gamma
    None: TIES' plain trim); under mergekit's conventions the entries mergekit keeps
    (`mergekit_kept`). `bands` found over the whole tensor make it elementwise, and carry
    the L1 factors. With trim_scope="model" the cuts are the whole model's (`collected`);
    without them this tensor is taken as the whole model. rescale="l1" folds each model's
    ||tau_i||_1 / ||kept tau_i||_1 into its weight."""
    import torch

    flat = task_vectors.view(task_vectors.shape[0], -1)
    prepared = bands is not None
    if bands is None and trim_scope == "model":
        top = 0.0 if gamma is None else gamma
        ranks = band_ranks(flat.shape[1], density=single(density), gamma=single(top))
        bands = model_bands(collected or select(task_vectors, ranks))
    scales = []
    for i, row in enumerate(flat):
        magnitudes = row.abs()  # one model at a time: one tensor's worth of workspace
        band: ModelBand
        if bands is not None:
            band = bands[i]
        elif conventions == "mergekit":
            top_i = None if gamma is None else of_model(gamma, i)
            band = mergekit_band(magnitudes, density=of_model(density, i), gamma=top_i)
        else:
            top_i = 0.0 if gamma is None else of_model(gamma, i)
            band = band_of(magnitudes, density=of_model(density, i), gamma=top_i)
        if rescale == "l1" and not prepared:
            band = with_l1(band, magnitudes)
        row.mul_(band.mask(magnitudes, offset))
        scales.append(band.scale)
    if rescale != "l1":
        return coef
    return coef * torch.tensor(scales, dtype=coef.dtype, device=coef.device)


def drop(
    task_vectors: torch.Tensor,
    coef: torch.Tensor,
    *,
    density: PerModel,
    generator: np.random.Generator | None = None,
    rescale: Rescale = "probability",
    bands: Sequence[ModelBand] | None = None,
    **_: object,
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density (one, or one per model); the kept
    ones are rescaled by 1 / p ("probability"), by the model's L1 factor ("l1": from
    `bands` in a chunked merge, else over this tensor) or not at all ("none"); either
    factor is folded into the weights, so it costs no pass."""
    import torch

    flat = task_vectors.view(task_vectors.shape[0], -1)

    def l1_norms() -> list[torch.Tensor]:  # float64 sums, one model's |tau| at a time
        return [row.abs().sum(dtype=torch.float64) for row in flat]

    before = l1_norms() if rescale == "l1" and bands is None else []
    task_vectors.mul_(random_mask(task_vectors.shape, density, generator, task_vectors.device))
    if rescale == "none":
        return coef
    if rescale == "l1":
        if bands is None:
            scales = [l1_ratio(b, a) for b, a in zip(before, l1_norms(), strict=True)]
        else:
            scales = [band.scale for band in bands]
        return coef * torch.tensor(scales, dtype=coef.dtype, device=coef.device)
    if isinstance(density, int | float):
        return coef / keep_probability(density)
    kept = [keep_probability(d) for d in density]
    return coef / torch.tensor(kept, dtype=coef.dtype, device=coef.device)


def weighted_sum(
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    coef: torch.Tensor,
    merge: Merge,
    conventions: Conventions,
) -> torch.Tensor:
    """sum_i weights_i tau_i; merge="mean" divides by sum_i coef_i (0 where that is 0). The
    rows using it sum, which both conventions do alike."""
    import torch

    flat = task_vectors.view(task_vectors.shape[0], -1)
    # a weighted sum over models is one matrix-vector product
    merged = torch.mv(flat.t(), weights).view(task_vectors.shape[1:])
    total = float(coef.sum())
    if merge == "mean":
        merged.div_(total) if total != 0 else merged.zero_()  # 0 where no coefficient is kept
    return merged


def elected_sign(total: torch.Tensor, conventions: Conventions) -> torch.Tensor:
    """The sign of each entry's sum over models: -1, 0 or 1; mergekit's get_mask "sum"
    elects + for a sum >= 0 (so -1 or 1)."""
    import torch

    return torch.where(total >= 0, 1.0, -1.0) if conventions == "mergekit" else total.sign()


def elect_signs(
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    coef: torch.Tensor,
    merge: Merge,
    conventions: Conventions,
) -> torch.Tensor:
    """TIES: sign(sum_i weights_i tau_i) per entry; an entry of model i is kept when
    weights_i tau_i has that sign, so zeros (and entries whose elected sum is exactly zero)
    contribute nothing. merge="mean" divides by sum_i coef_i over the kept entries (0 where
    that is 0); "count" by how many models are kept there (the TIES paper's disjoint mean);
    "sum" does not divide. Under mergekit's conventions a sum >= 0 elects + (its get_mask
    "sum"), and a zero divisor of "mean" becomes 1."""
    import torch

    flat_shape = (task_vectors.shape[0], -1)
    weighted = task_vectors.mul_(weights.reshape((-1,) + (1,) * (task_vectors.dim() - 1)))
    elected = elected_sign(weighted.sum(dim=0), conventions)
    # sign(w) == elected != 0 exactly when w * elected > 0 (elected is -1, 0 or 1)
    kept = torch.mul(weighted, elected).gt_(0)  # 1.0 where kept, else 0.0
    merged = weighted.mul_(kept).sum(dim=0)
    if merge == "mean":
        divisor = torch.mv(kept.view(flat_shape).t(), coef).view(merged.shape)
        if conventions == "mergekit":
            return merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
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
        conventions: Conventions = "nanmerge",
        **params: Any,
    ) -> torch.Tensor:
        """base + scale * combine(sparsify(tau)). keep_all, trim, drop and both combines
        are elementwise once each model's band is known, so a chunk (flat entries offset,
        offset + 1, ...) is merged alone when `bands` come from `task_vector_bands` (or
        `random_bands`) over the whole tensor; DELLA's and SCE's steps read whole tensors."""
        # `task_vectors` is this call's own buffer: the steps update it in place (the same
        # values as out-of-place ops, without a fresh (M, *shape) allocation per step).
        task_vectors = tensors - base
        weights = self.sparsify(task_vectors, coef, conventions=conventions, **params)
        combined = self.combine(task_vectors, weights, coef, merge, conventions)
        return combined.mul_(scale).add_(base)


TASK_ARITHMETIC = Steps(keep_all, weighted_sum)
TIES = Steps(trim, elect_signs)
DARE_LINEAR = Steps(drop, weighted_sum)
DARE_TIES = Steps(drop, elect_signs)
BREADCRUMBS = Steps(trim, weighted_sum)
BREADCRUMBS_TIES = Steps(trim, elect_signs)  # as TIES, with breadcrumbs' gamma

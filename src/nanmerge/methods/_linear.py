"""Weight averaging: the merge every other method is compared against."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanmerge._types import MergeError
from nanmerge.methods._registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


@register(
    reference="https://arxiv.org/abs/2203.05482",
    needs_base=False,
    elementwise=True,
    averages=lambda params: bool(params.get("normalize", True)),
)
def weight_average(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """sum_i w_i * tensors[i] with w_i = coef_i / sum(coef) (model soups, Wortsman et al. 2022).

    https://arxiv.org/abs/2203.05482. `base` is accepted and ignored. mergekit's `linear`
    normalizes the same way by default (`normalize: true`); `normalize=False` is its
    `normalize: false`, the plain weighted sum sum_i coef_i * tensors[i].
    """
    import torch

    if not normalize:
        return torch.mv(tensors.reshape(len(coef), -1).t(), coef).view(tensors.shape[1:])
    total = coef.sum()
    if total == 0:
        raise MergeError(
            f"weight_average: the coefficients {coef.tolist()} sum to 0, so they cannot be "
            f"normalized; give coefficients with a nonzero sum"
        )
    # a weighted sum over models is one matrix-vector product
    return torch.mv(tensors.reshape(len(coef), -1).t(), coef / total).view(tensors.shape[1:])


@register(
    reference="https://github.com/arcee-ai/mergekit",
    needs_base=False,
    max_models=1,
    elementwise=True,
    takes_coefficients=False,
)
def passthrough(
    tensors: torch.Tensor, coef: torch.Tensor, *, base: torch.Tensor | None = None
) -> torch.Tensor:
    """The one model's tensor, unchanged: how a slice copies layers into a stacked model
    (mergekit's `passthrough`). It weighs nothing, so a recipe that gives it coefficients
    (NAN's or any other) is refused rather than silently ignored."""
    return tensors[0]

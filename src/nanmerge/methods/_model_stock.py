"""Model Stock: move from the base toward the fine-tunes' average by an amount set by the
angle between their task vectors (Jang, Yun, Han 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from nanmerge._types import MergeError
from nanmerge.methods._registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Norm products are clamped to at least this before dividing (mergekit's guard), and a
# denominator 1 + (k-1) cos closer to 0 than _SINGULAR keeps the base (t = 0).
_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


@register(
    reference="https://arxiv.org/abs/2403.19522",
    needs_base=True,
    min_models=2,
    averages=lambda params: True,
)
def model_stock(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    filter_wise: bool = False,
    angle: Literal["mean_cosine", "mean_angle"] = "mean_cosine",
) -> torch.Tensor:
    """t * average + (1 - t) * base with t = k cos θ / (1 + (k - 1) cos θ), k models
    (https://arxiv.org/abs/2403.19522, eq. 3 and its k-model form; mergekit's `model_stock`).

    θ is the angle between the task vectors tensors[i] - base, one per tensor (or, with
    `filter_wise`, one per vector along the last axis: mergekit's option, default false).
    For k > 2 models the paper gives one θ; `angle` says how the pairs' angles make it:
    "mean_cosine" (default) averages cos θ_ij over the pairs, as mergekit does and as the
    authors state they do (naver-ai/model-stock issue 2, mergekit issue 453);
    "mean_angle" averages the angles θ_ij themselves. For two models both are the one angle.
    As in mergekit, norm products are clamped to 1e-6, cosines to [-1, 1], and where
    |1 + (k-1) cos θ| < 1e-6 the base is kept.

    NAN: coef weights the fine-tunes in the average, sum_i coef_i tensors[i] / sum(coef);
    t depends on the angles only. Uniform coef gives the paper's plain average.
    """
    import torch

    k = tensors.shape[0]
    total = float(coef.sum())
    if total == 0:
        raise MergeError(
            f"model_stock: the coefficients {coef.tolist()} sum to 0, so the fine-tunes "
            "cannot be averaged; give coefficients with a nonzero sum"
        )
    width = base.shape[-1] if filter_wise and base.dim() > 0 else base.numel()
    offsets = (tensors - base).reshape(k, -1, max(width, 1))
    # (R, k, k) dot products and (R, k) norms of each row's task vectors
    vectors = offsets.transpose(0, 1)
    grams = torch.bmm(vectors, vectors.transpose(1, 2))
    norms = torch.linalg.vector_norm(vectors, dim=2)
    products = (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp(min=_NORM_FLOOR)
    first, second = torch.triu_indices(k, k, offset=1)
    cosines = (grams / products)[:, first, second].clamp(-1, 1)  # (R, pairs)
    if angle == "mean_angle":
        cos = torch.cos(torch.acos(cosines).mean(dim=1))
    else:
        cos = cosines.mean(dim=1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
    average = torch.mv(tensors.reshape(k, -1).t(), coef / total).view(offsets.shape[1:])
    start = base.reshape(offsets.shape[1:])
    t = t.unsqueeze(1)
    return (t * average + (1 - t) * start).reshape(base.shape)

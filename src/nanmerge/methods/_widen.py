"""WIDEN: merge by weight disentanglement, for instruction-tuned and continued-pretrained LLMs.

Each model's matrices are split, column by column, into a magnitude (the column's norm) and a
direction (the unit column); how far each moved from the base, ranked within the model,
decides how much of its task vector each column contributes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from nanmerge._params import Interval
from nanmerge._types import TensorContext
from nanmerge.methods._registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# t: a column counts as important above t times its model's average significance.
AboveAverage = Annotated[float, Interval(ge=0, lt=math.inf)]
# s: the score given to important columns in place of their softmax score.
Calibration = Annotated[float, Interval(ge=0, lt=math.inf)]


def _ranks(differences: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its row (stable, ascending) divided by the row's length."""
    import torch

    n = differences.shape[1]
    order = torch.argsort(differences, dim=1, stable=True)
    positions = (torch.arange(n, device=differences.device) / n).expand_as(differences)
    return torch.zeros_like(differences).scatter_(1, order, positions.contiguous())


def _scores(significance: torch.Tensor, threshold: float, calibration: float) -> torch.Tensor:
    """Softmax over the models; entries above `threshold` times their model's mean get
    `calibration` instead."""
    import torch

    important = significance > significance.mean(dim=1, keepdim=True) * threshold
    return torch.where(important, calibration, torch.softmax(significance, dim=0))


def _column_weights(
    tau: torch.Tensor, base: torch.Tensor, threshold: float, calibration: float
) -> torch.Tensor:
    """(M, columns) weights of (M, rows, columns) task vectors over a (rows, columns) base:
    the mean of the magnitude and direction scores."""
    import torch

    base_norms = base.norm(dim=0)
    magnitude, direction = [], []
    for delta in tau:  # one model at a time: one matrix of workspace
        model = delta + base
        norms = model.norm(dim=0)
        cosine = (model * base).sum(dim=0) / (norms * base_norms).clamp_(min=torch.finfo().tiny)
        magnitude.append((norms - base_norms).abs_())
        direction.append(1 - cosine)
    return 0.5 * (
        _scores(_ranks(torch.stack(magnitude)), threshold, calibration)
        + _scores(_ranks(torch.stack(direction)), threshold, calibration)
    )


@register(reference="https://arxiv.org/abs/2408.03092", needs_base=True)
def widen(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    threshold: AboveAverage = 1.0,
    calibration: Calibration = 1.0,
    context: TensorContext | None = None,
) -> torch.Tensor:
    """WIDEN (Yu et al. 2024): base + sum_i coef_i * w_i * tau_i, weights per column.

    https://arxiv.org/abs/2408.03092, following the authors' `widen_merging` in
    github.com/yule-BUAA/MergeLLM. Meant for merging instruction-tuned (FT) and
    continued-pretrained (PT) LLMs of one base, whose task vectors differ widely in size.
    For a matrix (out, in), per model and column: the magnitude change |‖W_i[:, c]‖ -
    ‖W_0[:, c]‖| and the direction change 1 - cos(W_i[:, c], W_0[:, c]) are each ranked within
    the model (rank / in, stable ascending); each rank becomes a softmax over the models,
    replaced by `calibration` (the paper's s) where the rank exceeds `threshold` (t) times the
    model's mean rank; w_i is the mean of the two scores. Token embeddings (role "embedding")
    are transposed first, so their weights are per token. 1-D tensors (norms, biases) use
    |tau_i| itself, unranked, through the same scores. Defaults t = s = 1.0, the authors'
    scripts. The reference has no temperature in its softmax and no global scale; a column
    whose norm is zero gets cos = 0 (the reference divides by zero). Tensors of more than two
    dimensions, which the reference does not handle, are merged as (shape[0], -1) matrices.
    NAN's coefficient multiplies each task vector after the weights are found.
    """
    import torch

    m = tensors.shape[0]
    tau = tensors - base
    if base.dim() <= 1:
        flat = tau.reshape(m, -1)
        weights = _scores(flat.abs(), threshold, calibration)
        merged = torch.mv(flat.mul_(weights).t(), coef)
        return merged.view(base.shape).add_(base)
    matrices, base_matrix = tau.reshape(m, base.shape[0], -1), base.reshape(base.shape[0], -1)
    if context is not None and context.role == "embedding":
        weights = _column_weights(matrices.mT, base_matrix.t(), threshold, calibration)
        matrices.mul_(weights.unsqueeze(2))  # one weight per token: a row of the embedding
    else:
        matrices.mul_(_column_weights(matrices, base_matrix, threshold, calibration).unsqueeze(1))
    matrices.mul_(coef.view(-1, 1, 1))
    return matrices.sum(dim=0).view(base.shape).add_(base)

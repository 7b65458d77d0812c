"""SCE (FuseChat, Wan et al. 2024) as a row of the task-vector steps table (`_steps`):
select the entries whose task vectors vary most across models, weight each model by its
task vector's mean square, erase entries against the elected sign, take the weighted mean.

The reference is mergekit 0.1.5's merge_methods/sce.py, which FuseChat's own merges ran on
(github.com/fanqiwan/FuseAI, FuseChat-2.0: mergekit's `sce` method); its defaults are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanmerge.methods._bands import Conventions
from nanmerge.methods._registry import Density, Scale, register
from nanmerge.methods._sparsify import keep_count
from nanmerge.methods._steps import Merge, Steps, elected_sign

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# mergekit's floors: a mean-square sum below it gives uniform weights, and the divisor of the
# weighted mean is at least it
SCE_FLOOR = 1e-6


def select_by_variance(
    task_vectors: torch.Tensor,
    coef: torch.Tensor,
    *,
    select_topk: float,
    conventions: Conventions = "nanmerge",
    **_: object,
) -> torch.Tensor:
    """Keep, in every model, the k entries with the largest variance across the models
    (population variance; k = select_topk times the number of entries whose variance is
    not zero: rounded half up, ties in index order; mergekit: int(), its torch.topk), and
    zero the rest. Returns the weights coef_i * m_i / sum_j m_j, m_i the mean square of
    the selected tau_i (uniform when the m_i sum to 0; mergekit: below 1e-6)."""
    import torch

    m = task_vectors.shape[0]
    if select_topk < 1:
        variance = task_vectors.var(dim=0, unbiased=False).reshape(-1)
        nonzero = int(torch.count_nonzero(variance))
        if conventions == "mergekit":
            k = int(nonzero * select_topk)
            top = torch.topk(variance.abs(), k=k, largest=True).indices
        else:
            k = keep_count(select_topk, nonzero)
            top = torch.argsort(variance, descending=True, stable=True)[:k]
        keep = torch.zeros_like(variance)
        keep[top] = 1.0
        task_vectors.mul_(keep.view(task_vectors.shape[1:]))
    squares = task_vectors.reshape(m, -1).square().mean(dim=1)
    total = float(squares.sum())
    floor = SCE_FLOOR if conventions == "mergekit" else 0.0
    if abs(total) <= floor:
        return coef / m
    return coef * (squares / total)


def erase_and_weigh(
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    coef: torch.Tensor,
    _merge: Merge,
    conventions: Conventions,
) -> torch.Tensor:
    """SCE's erase and fuse: elect sign(sum_i coef_i tau_i) per entry (mergekit: a sum >= 0
    elects +), keep model i's entry where coef_i tau_i has that sign, and return
    sum_i w_i kept_i tau_i / sum_i w_i kept_i (0 where nothing is kept; mergekit: the
    divisor is at least 1e-6)."""

    column = (-1,) + (1,) * (task_vectors.dim() - 1)
    signed = task_vectors * coef.reshape(column)
    total = signed.sum(dim=0)
    kept = signed.mul_(elected_sign(total, conventions)).gt_(0)  # 1.0 where kept, else 0.0
    weighted = kept.mul_(weights.reshape(column))
    merged = (task_vectors * weighted).sum(dim=0)
    divisor = weighted.sum(dim=0)
    if conventions == "mergekit":
        return merged.div_(divisor.clamp_(min=SCE_FLOOR))
    return merged.div_(divisor).nan_to_num_(0.0, 0.0, 0.0)


SCE = Steps(select_by_variance, erase_and_weigh)


@register(reference="https://arxiv.org/abs/2408.07990", needs_base=True)
def sce(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    select_topk: Density = 1.0,
    scale: Scale = 1.0,
    conventions: Conventions = "nanmerge",
) -> torch.Tensor:
    """SCE: select by variance, weight by mean square, erase by sign, weighted mean.

    https://arxiv.org/abs/2408.07990. select_topk is the fraction of entries kept by
    variance across the models (mergekit's name and default 1.0: no selection); mergekit
    has no scale (1.0 here). Whole tensor, not chunked: the selection and the weights read
    all of it. The coefficient enters twice, as in TIES: coef_i weighs tau_i in the sign
    election and multiplies model i's SCE weight (w_i = coef_i m_i / sum_j m_j); uniform
    coefficients give the published merge. conventions="mergekit" reproduces mergekit
    0.1.5's counts and torch.topk selection, its >= 0 election and its 1e-6 floors.
    """
    return SCE(
        tensors,
        coef,
        base=base,
        scale=scale,
        merge="mean",
        select_topk=select_topk,
        conventions=conventions,
    )

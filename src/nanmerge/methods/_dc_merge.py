"""DC-Merge: the subspace family's merge in a shared orthogonal basis, by sign consensus."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanmerge._types import Record, TensorContext
from nanmerge.methods._registry import Density, Scale, register
from nanmerge.methods._subspace import (
    SvdMode,
    averaged,
    orthonormal,
    stacked,
    subspace_merge,
    top_singular,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


def keep_top(projected: torch.Tensor, density: float, numel: int) -> torch.Tensor:
    """Each task's matrix in the shared basis with only its largest entries: those with
    |x| >= the k-th largest, k = max(1, int(density * numel)) (ties at it kept); `numel` is
    the reference's r * r, of which entries outside the tasks' kept directions are 0."""
    import torch

    flat = projected.reshape(len(projected), -1).abs()
    k = min(max(1, int(density * numel)), flat.shape[1])
    threshold = torch.topk(flat, k, dim=1).values[:, -1:]
    return projected * (flat >= threshold).reshape(projected.shape)


def elect_mean(projected: torch.Tensor) -> torch.Tensor:
    """TIES' election on the stacked matrices: per entry, the mean over the tasks whose entry
    has the sign of the sum (0 where the sum is 0)."""
    import torch

    total = projected.sum(dim=0)
    agree = projected.sign() == total.sign()
    count = agree.sum(dim=0).clamp_(min=1)
    merged = (projected * agree).sum(dim=0) / count
    return torch.where(total == 0, torch.zeros_like(merged), merged)


def _dc_matrix(
    task_vectors: torch.Tensor, density: float, svd: SvdMode
) -> tuple[torch.Tensor, float | None]:
    """Each task's top r // M triplets; the shared basis from their u and v by Procrustes;
    each truncated task vector written in that basis, trimmed, merged by sign election, and
    kept only on the task's own block of directions; back to the weight space."""
    import torch

    m, r = len(task_vectors), min(task_vectors.shape[1:])
    rank = r // m
    parts = [top_singular(tau, rank, svd) for tau in task_vectors]
    kept = stacked(parts)
    u, vh = orthonormal(kept.u), orthonormal(kept.vh)
    # u^T (u_i diag(s_i) vh_i) vh^T, from the small factors: (M k, k) diag (k, M k)
    projected = torch.stack([((u.mT @ p.u) * p.s) @ (p.vh @ vh.mT) for p in parts])
    merged = elect_mean(keep_top(projected, density, r * r))
    blocks = torch.block_diag(*[torch.ones(rank, rank, device=merged.device)] * m)
    return torch.linalg.multi_dot((u, merged * blocks, vh)), kept.error


@register(
    reference="https://github.com/Tobeginwith/DC-Merge",
    needs_base=True,
    needs_matrices=True,
    elementwise_on=averaged,
)
def dc_merge(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    scale: Scale = 1.0,
    density: Density = 0.001,
    include_vocab: bool = False,
    svd: SvdMode = "auto",
    context: TensorContext | None = None,
    record: Record | None = None,
) -> torch.Tensor:
    """DC-Merge: merging with directional consistency (Zhang et al., CVPR 2026).

    Follows the authors' code for fully fine-tuned models,
    https://github.com/Tobeginwith/DC-Merge vision_fft_merge/src/utils/DC_utils.py
    (`dc_merge`), not their LoRA path (vision_lora_merge/merging_functions.py), which also
    smooths each task's singular values (averaging, or linear with rho = 5) and keeps a fixed
    rank 16; the authors skip that smoothing for full fine-tuning (their Appendix E.4).
    Per matrix of r = min(m, n): each task keeps its top r // M singular triplets (as TSV-M);
    their u side by side and their v^T stacked become one shared orthonormal basis each
    (Procrustes); each truncated task vector is written in that basis (an (M k) x (M k)
    matrix, nearly diagonal on the task's own block), trimmed to its largest
    max(1, int(density * r^2)) entries (density 1e-3, the authors' constant), merged by TIES'
    sign election with the mean of the agreeing entries, masked to the block-diagonal of the
    tasks' own directions, and mapped back. Other tensors: the mean of the task vectors.
    coef_i scales tau_i before its SVD (so its entries in the basis and their vote);
    `scale` multiplies the merged update: the authors' code returns it unscaled and their
    harness (forked from TSV's) picks the scale, so the default is TSV-M's 1.0. The authors
    exclude CLIP's `text_projection`; here vocabulary-sized matrices are averaged unless
    `include_vocab`. svd="auto" as in `tsv` (randomized when r // M < r / 4, error noted).
    """
    return subspace_merge(
        tensors,
        coef,
        base,
        lambda taus: _dc_matrix(taus, density, svd),
        scale=scale,
        context=context,
        include_vocab=include_vocab,
        record=record,
        min_side=len(tensors),
    )

"""Merges weighted by statistics of each model's data: Fisher information and input Grams.

Both read per-tensor statistics (stacked `(M, ...)`, one per model) that a separate step
computes from a model and a few batches (`nanmerge.statistics`). The per-model coefficient
composes multiplicatively: model i's statistic is scaled by coef_i, so uniform coefficients
give the published method and NAN's coefficients reweight each model's statistic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from nanmerge._params import Rule
from nanmerge._types import MemoryCost, MergeError
from nanmerge.methods._registry import (
    METHODS,
    WHOLE_STACK,
    Floor,
    Fraction,
    get_method,
    register,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


def _positive_weights(name: str, coef: torch.Tensor) -> None:
    """Both methods are weighted means: negative weights could cancel a denominator to 0."""
    if bool((coef < 0).any()) or float(coef.sum()) <= 0:
        raise MergeError(
            f"{name}: coefficients must be >= 0 with a positive sum (they weight each "
            f"model's statistics); got {coef.tolist()}"
        )


def _usable_fallback(name: str) -> bool:
    spec = METHODS.get(name)
    return spec is not None and not spec.statistics and not spec.uses_generator


# regmean merges a tensor without a Gram by another method, called with its defaults alone.
Fallback = Annotated[
    str,
    Rule(
        _usable_fallback,
        "the name of a registered method that needs no statistics and no random generator",
    ),
]


@register(reference="https://arxiv.org/abs/2111.09832", needs_base=False)
def fisher(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    fisher: torch.Tensor,
    eps: Floor = 1e-8,
) -> torch.Tensor:
    """sum_i c_i F_i theta_i / sum_i c_i F_i, elementwise, with F_i floored by `eps`.

    Fisher merging (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832): `fisher` is
    each model's diagonal Fisher information, shape (M, *shape). `eps` is added to every
    entry (the paper's `fisher_floor`), so where every model's Fisher is ~0 the result is
    the coefficient-weighted average, and equal Fisher gives exactly `weight_average`.
    `base` is accepted and ignored.
    """
    import torch

    if tuple(fisher.shape) != tuple(tensors.shape):
        raise MergeError(
            f"fisher: the Fisher statistics have shape {tuple(fisher.shape)} but the stacked "
            f"models have {tuple(tensors.shape)}; they must match entry for entry "
            "(one Fisher tensor per model, computed on that same tensor)"
        )
    _positive_weights("fisher", coef)
    weights = fisher.to(device=tensors.device, dtype=torch.float32)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise MergeError(
            "fisher: the Fisher statistics contain NaN, Inf or negative values; recompute them "
            "with nanmerge.statistics.compute_statistics"
        )
    weights = (weights + eps) * coef.reshape((-1,) + (1,) * (tensors.dim() - 1))
    return (weights * tensors).sum(dim=0) / weights.sum(dim=0)


# One tensor's Grams at a time, on the merging thread: for the widest weight with a Gram
# (d inputs), D = 4 d^2, the stacked float32 Grams, their float64 copy, its diagonal and the
# two shrinkage temporaries with their sum peak at 11 M D; the solve adds at most 12 D
# (measured: 10.1-10.9 M D above the inputs for M = 1, 3, 6).
REGMEAN_MEMORY = MemoryCost(
    WHOLE_STACK.tensors,
    WHOLE_STACK.chunks,
    WHOLE_STACK.formula,
    statistics=lambda m, d: (11 * m + 12) * 4 * d * d,
    statistics_formula="(11M + 12) * 4 d^2 for regmean's Grams",
)


@register(reference="https://arxiv.org/abs/2212.09849", needs_base=False, memory=REGMEAN_MEMORY)
def regmean(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    alpha: Fraction = 0.9,
    fallback: Fallback = "weight_average",
) -> torch.Tensor:
    """W* = argmin_W sum_i c_i ||X_i W^T - X_i W_i^T||^2 for a linear layer's weight (out x in).

    RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849): with G_i = X_i^T X_i the
    Gram of layer i's inputs, shape (M, in, in), W*^T = (sum_i c_i G_i)^-1 sum_i c_i G_i W_i^T,
    after shrinking off-diagonal entries: G <- alpha G + (1 - alpha) diag(G) (alpha = 1 keeps
    the exact least-squares merge). Solved in float64. A bias (M, out) with a (M, 1, 1) Gram
    (its input count n_i) gets sum_i c_i n_i b_i / sum_i c_i n_i. A tensor without a Gram
    (norms, embeddings) is merged by `fallback`, a registered method, with its defaults.
    If the summed Gram is singular (inputs that never vary), a tiny ridge pulls the
    undetermined directions toward the coefficient-weighted average.
    """
    import torch

    if gram is None:
        return get_method(fallback).fn(tensors, coef, base=base)
    if tensors.dim() == 2 and tuple(gram.shape) == (tensors.shape[0], 1, 1):
        # a bias: the weight of a constant input whose Gram is the input count
        return regmean(tensors.unsqueeze(-1), coef, gram=gram, alpha=alpha).squeeze(-1)
    d_in = tensors.shape[-1]
    if tensors.dim() != 3 or tuple(gram.shape) != (tensors.shape[0], d_in, d_in):
        raise MergeError(
            f"regmean: a Gram-weighted merge needs 2-D weights (out x in, as torch.nn.Linear "
            f"stores them) stacked as (M, out, in) with Grams of shape (M, in, in), or biases "
            f"(M, out) with (M, 1, 1); got weights {tuple(tensors.shape)} and Grams "
            f"{tuple(gram.shape)}. Compute the Grams with "
            "nanmerge.statistics.compute_statistics(kind='gram') on the same architecture"
        )
    _positive_weights("regmean", coef)
    g = gram.to(device=tensors.device, dtype=torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise MergeError(
            "regmean: the Gram statistics contain NaN or Inf; recompute them with "
            "nanmerge.statistics.compute_statistics(kind='gram')"
        )
    diagonal = torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
    g = alpha * g + (1 - alpha) * diagonal
    c = coef.to(torch.float64).reshape(-1, 1, 1)
    w = tensors.to(torch.float64)
    lhs = (c * g).sum(dim=0)
    rhs = (c * g @ w.transpose(1, 2)).sum(dim=0)
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        average = ((c * w).sum(dim=0) / c.sum()).T
        ridge = 1e-8 * max(float(torch.diagonal(lhs).mean()), 1e-30)
        eye = torch.eye(lhs.shape[0], dtype=torch.float64, device=lhs.device)
        solution = torch.linalg.solve(lhs + ridge * eye, rhs + ridge * average)
    return solution.T.to(torch.float32)

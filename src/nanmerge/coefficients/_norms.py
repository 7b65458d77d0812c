"""Per-tensor norms that every estimator reads, kept as float64 sums of squares.

"Statistics" in nanmerge means the data statistics of data-informed methods (Fisher,
Gram); what estimators read from the weights alone are norms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from nanmerge._types import TensorNorms

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

NORM_BLOCK = 4096


def _sumsq(x: torch.Tensor) -> float:
    """Norms of 4096-entry blocks (vectorised, no squared copy), squared and summed in float64.

    Non-finite entries make the result non-finite, which the engine uses as its check.
    """
    import torch

    flat = x.reshape(-1)
    whole = flat.numel() - flat.numel() % NORM_BLOCK
    blocks = [flat[:whole].view(-1, NORM_BLOCK), flat[whole:].view(1, -1)]
    return sum(
        float(torch.linalg.vector_norm(b, dim=1).to(torch.float64).square().sum()) for b in blocks
    )


def tensor_norms(tensors: torch.Tensor, base: torch.Tensor | None = None) -> TensorNorms:
    """Sums of squares of theta_i and, with a base, of tau_i = theta_i - theta_0.

    `tensors` is the (M, *shape) stack of one tensor across the fine-tuned models. Squares are
    accumulated in float64 so that norms summed over billions of entries stay exact enough
    to rank models whose norms differ by well under a percent.
    """
    import torch

    finetuned = tuple(_sumsq(t) for t in tensors)
    task_vector = None
    if base is not None:
        # one buffer for every model's tau_i
        scratch = torch.empty_like(tensors[0], dtype=torch.result_type(tensors, base))
        task_vector = tuple(_sumsq(torch.sub(t, base, out=scratch)) for t in tensors)
    return TensorNorms(tensors[0].numel(), finetuned, task_vector)


def identical_models(norms: Mapping[str, TensorNorms]) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of models whose sums of squares agree to the bit in every tensor:
    the same weights as far as norms can tell, whatever the files are called. Free, since
    the merge takes these norms anyway; two different models agree this way by accident
    essentially never."""
    columns = list(zip(*(n.sumsq_finetuned for n in norms.values()), strict=True))
    return [(i, j) for j, cj in enumerate(columns) for i, ci in enumerate(columns[:j]) if ci == cj]


def model_norms(norms: Iterable[TensorNorms]) -> dict[str, tuple[float, ...]]:
    """Per-model L2 norms over all the given tensors, of theta_i and (with a base) of tau_i."""
    finetuned: list[float] | None = None
    task_vector: list[float] | None = None
    has_task_vector = True
    for st in norms:
        if finetuned is None:
            finetuned = [0.0] * len(st.sumsq_finetuned)
            task_vector = [0.0] * len(st.sumsq_finetuned)
        finetuned = [a + b for a, b in zip(finetuned, st.sumsq_finetuned, strict=True)]
        if st.sumsq_task_vector is None:
            has_task_vector = False
        elif task_vector is not None:
            task_vector = [a + b for a, b in zip(task_vector, st.sumsq_task_vector, strict=True)]
    if finetuned is None:
        return {}
    out = {"finetuned": tuple(v**0.5 for v in finetuned)}
    if has_task_vector and task_vector is not None:
        out["task_vector"] = tuple(v**0.5 for v in task_vector)
    return out

"""Task-vector methods: one parameterised function and its published presets.

tau_i = tensors[i] - base; every preset computes base + scale * combine(coef_i * tau_i),
differing only in how tau_i is sparsified, whether signs are elected, and how the kept
entries are combined. The presets are data passed to one function, not copies of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from nanmerge.methods._registry import register
from nanmerge.methods._sparsify import (
    KEEP_ALL,
    KEEP_NONE,
    SAMPLE,
    Band,
    BracketedCut,
    band_counts,
    band_of,
    keep_probability,
    random_mask,
    top_cut,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Entries per piece of magnitudes while finding a cut: a few MiB, so its passes stay in cache.
PIECE = 1 << 19

Sparsify = Literal["magnitude", "random", "breadcrumbs"] | None
Merge = Literal["mean", "sum"]


def _generalized_task_arithmetic(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    scale: float,
    sparsify: Sparsify = None,
    density: float = 1.0,
    gamma: float = 0.0,
    consensus: bool = False,
    merge: Merge = "sum",
    generator: np.random.Generator | None = None,
    bands: Sequence[Band] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """base + scale * merge_i(coef_i * sparsify(tau_i)), optionally keeping elected signs only.

    Sign election: sign(sum_i coef_i * tau_i) per entry; an entry of model i is kept when
    coef_i * tau_i has that sign, so zeros (and entries whose elected sum is exactly zero)
    contribute nothing. merge="mean" divides by sum_i coef_i over the kept entries (0 where
    that is 0); "sum" does not divide.

    Every step is elementwise once each model's magnitude band is known, so a chunk of a
    tensor (flat entries offset, offset + 1, ...) is merged alone when `bands` come from
    `task_vector_bands` over the whole tensor.
    """
    import torch

    # `task_vectors` is this function's own buffer: later steps update it in place (the same
    # values as out-of-place ops, without a fresh (M, *shape) allocation per step).
    task_vectors = tensors - base
    flat = task_vectors.view(tensors.shape[0], -1)
    if sparsify in ("magnitude", "breadcrumbs"):
        drop = gamma if sparsify == "breadcrumbs" else 0.0
        for i, row in enumerate(flat):
            magnitudes = row.abs()  # one model at a time: one tensor's worth of workspace
            band = band_of(magnitudes, density=density, gamma=drop) if bands is None else bands[i]
            row.mul_(band.mask(magnitudes, offset))
    # DARE rescales kept entries by 1 / p; folded into the weights, it costs no pass
    rescaled = coef
    if sparsify == "random":
        task_vectors.mul_(random_mask(task_vectors.shape, density, generator, tensors.device))
        rescaled = coef / keep_probability(density)
    if not consensus:
        # a weighted sum over models is one matrix-vector product
        merged = torch.mv(flat.t(), rescaled).view(tensors.shape[1:])
        total = float(coef.sum())
        if merge == "mean":
            merged.div_(total) if total != 0 else merged.zero_()  # 0 where no coefficient is kept
        return merged.mul_(scale).add_(base)
    weighted = task_vectors.mul_(rescaled.reshape((-1,) + (1,) * (tensors.dim() - 1)))
    elected = weighted.sum(dim=0).sign()
    # sign(w) == elected != 0 exactly when w * elected > 0 (elected is -1, 0 or 1)
    kept = torch.mul(weighted, elected).gt_(0)  # 1.0 where kept, else 0.0
    merged = weighted.mul_(kept).sum(dim=0)
    if merge == "mean":
        divisor = torch.mv(kept.view(flat.shape).t(), coef).view(merged.shape)
        # 0 where no coefficient is kept: x / 0 is inf or nan there (and a quotient past
        # float32's range, which finite inputs reach only with absurd coefficients)
        merged.div_(divisor).nan_to_num_(0.0, 0.0, 0.0)
    return merged.mul_(scale).add_(base)


def task_vector_bands(
    models: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    density: float,
    gamma: float = 0.0,
    **_: object,
) -> dict[str, list[Band]]:
    """Each model's magnitude band over its whole task vector: what makes trimming methods
    elementwise, so they can be merged chunk by chunk (`bands` of their merge function).

    tau_i is formed in float32 from the tensors as stored (bf16 included), as the merge
    forms it. On CPU the magnitudes of all models are computed piece by piece into one
    cache-sized buffer (the base converted once per piece) and fed to each cut's
    `BracketedCut`, so the selection's passes run in cache and no tensor-sized workspace
    exists; only when a sample misplaces its cut (rare) is that model's whole tensor of
    magnitudes formed and selected from.
    """
    import torch

    base = base.reshape(-1)
    numel = base.numel()
    flats = [model.reshape(-1) for model in models]
    n_keep, n_top = band_counts(numel, density=density, gamma=gamma)
    if n_keep == numel:
        return {"bands": [Band(KEEP_ALL) for _ in flats]}

    def whole(flat: torch.Tensor) -> torch.Tensor:
        return (flat.float() - base.float()).abs_()

    if base.device.type != "cpu" or numel < 4 * SAMPLE:
        return {"bands": [band_of(whole(f), density=density, gamma=gamma) for f in flats]}
    counts = (n_top + n_keep, n_top)  # the keep cut, then the drop cut (0: drops nothing)
    stride = numel // SAMPLE
    base_sample = base[::stride].float()
    brackets = []
    for flat in flats:
        sample = (flat[::stride].float() - base_sample).abs_().numpy()
        brackets.append([BracketedCut(sample, numel, k) if 0 < k < numel else None for k in counts])
    piece = torch.empty((len(flats), min(PIECE, numel)), dtype=torch.float32)
    base_piece = torch.empty(piece.shape[1], dtype=torch.float32)
    for begin in range(0, numel, PIECE):
        end = min(begin + PIECE, numel)
        part_of_base = base_piece[: end - begin].copy_(base[begin:end])
        for row, flat, model_brackets in zip(piece, flats, brackets, strict=True):
            part = row[: end - begin].copy_(flat[begin:end]).sub_(part_of_base).abs_().numpy()
            for bracket in model_brackets:
                if bracket is not None:
                    bracket.add(begin, part)
    bands = []
    for flat, model_brackets in zip(flats, brackets, strict=True):
        cuts = []
        for k, bracket in zip(counts, model_brackets, strict=True):
            cut = KEEP_NONE if k == 0 else KEEP_ALL if bracket is None else bracket.cut()
            cuts.append(top_cut(whole(flat), k) if cut is None else cut)
        bands.append(Band(*cuts))
    return {"bands": bands}


@register(reference="https://arxiv.org/abs/2212.04089", needs_base=True, elementwise=True)
def task_arithmetic(
    tensors: torch.Tensor, coef: torch.Tensor, *, base: torch.Tensor, scale: float = 0.3
) -> torch.Tensor:
    """base + scale * sum_i coef_i * tau_i (Ilharco et al. 2023).

    https://arxiv.org/abs/2212.04089. The paper's scale 0.3 is the default; mergekit has no
    global scale (each model's `weight` plays the role of scale * coef_i).
    """
    return _generalized_task_arithmetic(
        tensors,
        coef,
        base=base,
        scale=scale,
    )


@register(
    reference="https://arxiv.org/abs/2306.01708",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
)
def ties(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: float = 0.2,
    scale: float = 1.0,
    merge: Merge = "mean",
    bands: Sequence[Band] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """TIES: trim each task vector to its top-k magnitudes, elect signs, merge agreeing entries.

    https://arxiv.org/abs/2306.01708. Trimming is per model and per tensor, keeping exactly
    k = max(1, round(density * numel)) entries (half up). Peers differ: mergekit also trims
    per tensor but with k = int(density * numel), elects on the weighted sum, breaks a zero
    sum towards +, and defaults density to 1.0; FusionBench trims over the whole flattened
    model with a threshold (ties at it all survive), elects on the unweighted sum and divides
    by the count of kept entries; PEFT divides by the count too. Here a zero elected sum keeps
    nothing, and merge="mean" divides by the sum of the kept models' coefficients.
    """
    return _generalized_task_arithmetic(
        tensors,
        coef,
        base=base,
        scale=scale,
        sparsify="magnitude",
        density=density,
        consensus=True,
        merge=merge,
        bands=bands,
        offset=offset,
    )


@register(reference="https://arxiv.org/abs/2311.03099", needs_base=True, elementwise=True)
def dare_linear(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: float = 0.5,
    scale: float = 0.3,
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale by 1/density, sum.

    https://arxiv.org/abs/2311.03099. Unbiased: the expectation is task arithmetic. Pass
    `tensor_generator(seed, name)` (numpy) for reproducible masks, drawn on the CPU.
    mergekit and PEFT draw from the global RNG; mergekit defaults density to 1.0 (no drop).
    """
    return _generalized_task_arithmetic(
        tensors,
        coef,
        base=base,
        scale=scale,
        sparsify="random",
        density=density,
        generator=generator,
    )


@register(reference="https://arxiv.org/abs/2311.03099", needs_base=True, elementwise=True)
def dare_ties(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: float = 0.5,
    scale: float = 1.0,
    merge: Merge = "mean",
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and merge of the agreeing entries.

    https://arxiv.org/abs/2311.03099. mergekit's dare_ties sums by default (normalize off);
    PEFT's divides by the count of agreeing models; here merge="mean" divides by the sum of
    their coefficients, as `ties` does.
    """
    return _generalized_task_arithmetic(
        tensors,
        coef,
        base=base,
        scale=scale,
        sparsify="random",
        density=density,
        consensus=True,
        merge=merge,
        generator=generator,
    )


@register(
    reference="https://arxiv.org/abs/2312.06795",
    needs_base=True,
    elementwise=True,
    prepare=task_vector_bands,
)
def breadcrumbs(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: float = 0.9,
    gamma: float = 0.01,
    scale: float = 0.3,
    bands: Sequence[Band] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Model Breadcrumbs: per model drop the top gamma outliers and the small tail, then sum.

    https://arxiv.org/abs/2312.06795. Per model and tensor, the round(gamma * numel) largest
    |entries| are dropped and the next max(1, round(density * numel)) kept (exact counts).
    mergekit does the same per tensor with int() rounding, defaults density to 1.0 (no
    trimming), and when the counts overlap drops fewer outliers; here gamma + density > 1 is
    rejected up front.
    """
    return _generalized_task_arithmetic(
        tensors,
        coef,
        base=base,
        scale=scale,
        sparsify="breadcrumbs",
        density=density,
        gamma=gamma,
        bands=bands,
        offset=offset,
    )

"""Each model's magnitude band over a whole tensor: the preparation that makes the trimming
methods (TIES, breadcrumbs) elementwise, so they merge chunk by chunk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from nanmerge._types import MergeError
from nanmerge.methods._model_trim import Selection, model_bands, select
from nanmerge.methods._sparsify import (
    KEEP_ALL,
    KEEP_NONE,
    SAMPLE,
    Band,
    BracketedCut,
    PerModel,
    band_counts,
    band_of,
    band_ranks,
    of_model,
    top_cut,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Entries per piece of magnitudes while finding a cut: a few MiB, so its passes stay in cache.
PIECE = 1 << 19

# Where a trim ranks magnitudes: within each tensor, or over each model's whole task vector.
TrimScope = Literal["tensor", "model"]


def single(value: PerModel) -> float:
    """A whole-model trim's one value (the registry refuses per-model values there)."""
    if not isinstance(value, int | float):
        raise MergeError(
            f"trim_scope: model trims each model at one density and gamma; got {value!r}"
        )
    return value


def task_vector_bands(
    models: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    density: PerModel,
    gamma: PerModel = 0.0,
    trim_scope: TrimScope = "tensor",
    collected: Selection | None = None,
    **_: object,
) -> dict[str, list[Band]]:
    """Each model's magnitude band over its whole task vector: what makes trimming methods
    elementwise, so they can be merged chunk by chunk (`bands` of their merge function).
    density and gamma: one value, or one per model.
    With trim_scope="model" the bands come from the whole model's cuts (`collected`), or,
    without them, from this tensor taken as the whole model.

    tau_i is formed in float32 from the tensors as stored (bf16 included), as the merge
    forms it. On CPU the magnitudes of all models are computed piece by piece into one
    cache-sized buffer (the base converted once per piece) and fed to each cut's
    `BracketedCut`, so the selection's passes run in cache and no tensor-sized workspace
    exists; only when a sample misplaces its cut (rare) is that model's whole tensor of
    magnitudes formed and selected from.
    """
    import torch

    if trim_scope == "model":
        if collected is None:
            task_vectors = torch.stack([m.float() for m in models]) - base.float()
            ranks = band_ranks(base.numel(), density=single(density), gamma=single(gamma))
            collected = select(task_vectors, ranks)
        return {"bands": model_bands(collected)}
    base = base.reshape(-1)
    numel = base.numel()
    flats = [model.reshape(-1) for model in models]
    kept = [
        band_counts(numel, density=of_model(density, i), gamma=of_model(gamma, i))
        for i in range(len(flats))
    ]
    if all(n_keep == numel for n_keep, _ in kept):
        return {"bands": [Band(KEEP_ALL) for _ in flats]}

    def whole(flat: torch.Tensor) -> torch.Tensor:
        return (flat.float() - base.float()).abs_()

    if base.device.type != "cpu" or numel < 4 * SAMPLE:
        return {
            "bands": [
                band_of(whole(f), density=of_model(density, i), gamma=of_model(gamma, i))
                for i, f in enumerate(flats)
            ]
        }
    # per model: the keep cut, then the drop cut (0: drops nothing); none when all are kept
    counts = [() if k == numel else (top + k, top) for k, top in kept]
    stride = numel // SAMPLE
    base_sample = base[::stride].float()
    brackets = []
    for flat, ks in zip(flats, counts, strict=True):
        sample = (flat[::stride].float() - base_sample).abs_().numpy()
        brackets.append([BracketedCut(sample, numel, k) if 0 < k < numel else None for k in ks])
    piece = torch.empty((len(flats), min(PIECE, numel)), dtype=torch.float32)
    base_piece = torch.empty(piece.shape[1], dtype=torch.float32)
    for begin in range(0, numel, PIECE):
        end = min(begin + PIECE, numel)
        part_of_base = base_piece[: end - begin].copy_(base[begin:end])
        for row, flat, model_brackets in zip(piece, flats, brackets, strict=True):
            if not model_brackets:
                continue  # this model keeps everything
            part = row[: end - begin].copy_(flat[begin:end]).sub_(part_of_base).abs_().numpy()
            for bracket in model_brackets:
                if bracket is not None:
                    bracket.add(begin, part)
    bands = []
    for flat, ks, model_brackets in zip(flats, counts, brackets, strict=True):
        cuts = []
        for k, bracket in zip(ks, model_brackets, strict=True):
            cut = KEEP_NONE if k == 0 else KEEP_ALL if bracket is None else bracket.cut()
            cuts.append(top_cut(whole(flat), k) if cut is None else cut)
        bands.append(Band(*cuts) if cuts else Band(KEEP_ALL))
    return {"bands": bands}

"""Each model's magnitude band over a whole tensor: the preparation that makes the trimming
methods (TIES, breadcrumbs) elementwise, so they merge chunk by chunk. Under mergekit's
conventions a band is the explicit set of entries mergekit 0.1.5 keeps; with an L1 rescale
it carries the factor, which needs the whole tensor's sums."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

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
    or_global,
    random_mask,
    top_cut,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Entries per piece of magnitudes while finding a cut or summing: a few MiB, so its passes
# stay in cache; a multiple of DRAW, so pieces draw DARE's masks as the whole tensor would.
PIECE = 1 << 19

# Where a trim ranks magnitudes: within each tensor, or over each model's whole task vector.
TrimScope = Literal["tensor", "model"]
# Whose rules decide what the two tools do differently (keep counts, ties at a cut, a zero
# elected sum, divisors): nanmerge's, or mergekit 0.1.5's, to reproduce its numbers.
Conventions = Literal["nanmerge", "mergekit"]
# How kept entries are rescaled: by 1 / their keep probability (DARE, DELLA), to the
# original L1 norm per model and tensor (mergekit's `rescale: true`), or not at all.
Rescale = Literal["probability", "l1", "none"]
# mergekit's `rescaled_masked_tensor` leaves a tensor unscaled when either norm is below it
L1_FLOOR = 1e-7


class ModelBand(Protocol):
    """What a chunked merge needs of one model over the whole tensor: its kept entries, as
    a rule any slice applies alone, and the factor the kept entries are multiplied by."""

    @property
    def scale(self) -> float: ...

    def mask(self, values: torch.Tensor, offset: int = 0) -> torch.Tensor: ...


@dataclass(frozen=True)
class Explicit:
    """A model's kept entries given one by one (bool, flat over the whole tensor): mergekit's
    order among equal magnitudes comes from its sort, which no threshold rule reproduces."""

    kept: torch.Tensor
    scale: float = 1.0

    def mask(self, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """1 where kept, else 0, for flat entries offset, offset + 1, ... (see `Cut.mask`)."""
        return self.kept[offset : offset + values.numel()].to(values.dtype)


def l1_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """mergekit's RescaleNorm.l1 factor ||tau||_1 / ||masked tau||_1, 1 when either is below
    1e-7. The trims pass float32 sums, as mergekit's; DARE passes float64 ones, which it
    adds up piece by piece."""
    if float(before) < L1_FLOOR or float(after) < L1_FLOOR:
        return 1.0
    return float(before / after)


def mergekit_kept(
    magnitudes: torch.Tensor, *, density: float, gamma: float | None
) -> torch.Tensor | None:
    """The entries mergekit 0.1.5 keeps of one model's flat float32 magnitudes (bool), or
    None where it keeps the tensor whole (density >= 1, no rescale either).

    gamma None: `magnitude`, the first max(1, int(density n)) of a descending argsort; else
    `magnitude_outliers`: int(density n) entries after skipping the n - int(density n) -
    int(gamma n) smallest (never fewer than 0) of an ascending sort. The same torch calls on
    the same values, since torch's CPU sort is not stable: ties at a cut fall as its do.
    """
    import torch

    if density >= 1:
        return None
    n = magnitudes.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if gamma is None:
        kept[torch.argsort(magnitudes, descending=True)[: max(1, int(density * n))]] = True
    else:
        target = int(density * n)
        bottom = max(0, n - target - int(gamma * n))
        kept[torch.sort(magnitudes, descending=False).indices[bottom : bottom + target]] = True
    return kept


def mergekit_band(magnitudes: torch.Tensor, *, density: float, gamma: float | None) -> ModelBand:
    """One model's band under mergekit's conventions (see `mergekit_kept`)."""
    kept = mergekit_kept(magnitudes, density=density, gamma=gamma)
    return Band(KEEP_ALL) if kept is None else Explicit(kept)


def with_l1(band: ModelBand, magnitudes: torch.Tensor) -> ModelBand:
    """The band carrying its L1 factor over these (whole-tensor) magnitudes (exactly 1 for a
    band keeping everything)."""
    ratio = l1_ratio(magnitudes.sum(), (magnitudes * band.mask(magnitudes)).sum())
    return dataclasses.replace(band, scale=ratio)  # type: ignore[type-var]


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
    gamma: PerModel | None = None,
    trim_scope: TrimScope = "tensor",
    collected: Selection | None = None,
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "none",
    **_: object,
) -> dict[str, list[ModelBand]]:
    """Each model's band over its whole task vector: what makes trimming methods elementwise,
    so they can be merged chunk by chunk (`bands` of their merge function). density and
    gamma: one value, or one per model; gamma None is TIES' plain magnitude trim.

    Under mergekit's conventions each band is the explicit set mergekit keeps (one bool
    per entry and model: `mergekit_kept`). With rescale="l1" each band carries its L1 factor
    over the whole tensor, one more read of the tensors here.
    """
    bands: list[ModelBand] = []
    if conventions == "nanmerge":
        top = 0.0 if gamma is None else gamma
        bands += _bands(models, base, density, top, trim_scope, collected)
        if rescale != "l1":
            return {"bands": bands}
    out = []
    for i, model in enumerate(models):
        magnitudes = (model.reshape(-1).float() - base.reshape(-1).float()).abs_()
        if conventions == "mergekit":
            g = None if gamma is None else of_model(gamma, i)
            band = mergekit_band(magnitudes, density=of_model(density, i), gamma=g)
        else:
            band = bands[i]
        out.append(with_l1(band, magnitudes) if rescale == "l1" else band)
    return {"bands": out}


def _bands(
    models: Sequence[torch.Tensor],
    base: torch.Tensor,
    density: PerModel,
    gamma: PerModel,
    trim_scope: TrimScope,
    collected: Selection | None,
) -> list[Band]:
    """Each model's magnitude band under nanmerge's conventions (exact counts rounded half up,
    ties at a cut in index order).
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
        return model_bands(collected)
    base = base.reshape(-1)
    numel = base.numel()
    flats = [model.reshape(-1) for model in models]
    kept = [
        band_counts(numel, density=of_model(density, i), gamma=of_model(gamma, i))
        for i in range(len(flats))
    ]
    if all(n_keep == numel for n_keep, _ in kept):
        return [Band(KEEP_ALL) for _ in flats]

    def whole(flat: torch.Tensor) -> torch.Tensor:
        return (flat.float() - base.float()).abs_()

    if base.device.type != "cpu" or numel < 4 * SAMPLE:
        return [
            band_of(whole(f), density=of_model(density, i), gamma=of_model(gamma, i))
            for i, f in enumerate(flats)
        ]
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
        bands.append(Band(cuts[0], cuts[1]) if cuts else Band(KEEP_ALL))
    return bands


def random_bands(
    models: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    density: PerModel,
    generator: np.random.Generator | None = None,
    rescale: Rescale = "probability",
    **_: object,
) -> dict[str, Any]:
    """DARE's preparation for a chunked merge with rescale="l1": each model's L1 factor over
    the whole tensor, carried by a band that keeps everything (the drop is drawn chunk by
    chunk). The masks are drawn piece by piece (PIECE entries, a multiple of DRAW) from a
    copy of the generator, so they are the ones the chunks draw in turn and only (M, PIECE)
    of them exist at once; the sums are float64. Without a generator one is seeded from
    torch's global generator and handed to the merge. Nothing to prepare for the other
    rescales.
    """
    import torch

    if rescale != "l1":
        return {}
    generator = or_global(generator)
    draws = copy.deepcopy(generator)
    flat_base, flats = base.reshape(-1), [m.reshape(-1) for m in models]
    sums = torch.zeros((2, len(flats)), dtype=torch.float64, device=base.device)
    for begin in range(0, flat_base.numel(), PIECE):
        part_of_base = flat_base[begin : begin + PIECE].float()
        magnitudes = torch.stack([f[begin : begin + PIECE].float() for f in flats])
        magnitudes.sub_(part_of_base).abs_()
        sums[0] += magnitudes.sum(dim=1, dtype=torch.float64)
        magnitudes.mul_(random_mask(magnitudes.shape, density, draws, base.device))
        sums[1] += magnitudes.sum(dim=1, dtype=torch.float64)
    bands = [Band(KEEP_ALL, scale=l1_ratio(before, after)) for before, after in sums.T]
    return {"bands": bands, "generator": generator}

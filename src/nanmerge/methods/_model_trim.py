"""A whole-model trim: each model's exact k-th largest task-vector magnitude over all its
tensors, found in two streamed passes without holding the model.

A non-negative float32's bit pattern, read as an integer, orders as the value does. The
first pass counts each model's patterns by their high 15 bits (the sign bit of a magnitude
is 0); the second counts, inside the one bin holding each cut, their low 16 bits. That
two-digit radix select is exact for any ties and holds 2^15 + R * 2^16 int64 counts per
model (R cuts: 0.75 MiB for one, 1.25 MiB for two). Magnitudes are those of float32
tau = theta - theta_0, formed as the merge forms them, so the merge compares the same values.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nanmerge._types import Collect, MergeError
from nanmerge.methods._sparsify import Band, at_least, band_ranks

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

HIGH_BINS, LOW_BITS = 1 << 15, 16


def _patterns(task_vectors: torch.Tensor) -> np.ndarray:
    """|tau| of (M, ...) float32 task vectors as (M, n) int32 bit patterns, on the CPU."""
    magnitudes = task_vectors.reshape(task_vectors.shape[0], -1).abs()
    return magnitudes.cpu().numpy().view(np.int32)


def high_counts(task_vectors: torch.Tensor) -> np.ndarray:
    """(M, HIGH_BINS) int64: how many of each model's magnitudes fall in each high-bit bin."""
    bins = _patterns(task_vectors) >> LOW_BITS
    return np.stack([np.bincount(row, minlength=HIGH_BINS) for row in bins])


@dataclass(frozen=True)
class CutBins:
    """After the first pass: for each model and cut, the high-bit bin holding the
    `ranks[r]`-th largest magnitude (-1 where no select is needed: rank 0 or every entry)
    and how many magnitudes lie in higher bins."""

    numel: int
    ranks: tuple[int, ...]
    bins: np.ndarray  # (M, R)
    above: np.ndarray  # (M, R)


def locate(counts: np.ndarray, ranks: tuple[int, ...]) -> CutBins:
    """The bins holding each model's cuts, from the (M, HIGH_BINS) counts of the whole model."""
    numel = int(counts[0].sum())
    at_or_above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # magnitudes in bin b or higher
    bins = np.full((len(counts), len(ranks)), -1, dtype=np.int64)
    above = np.zeros_like(bins)
    for i, row in enumerate(at_or_above):
        for r, k in enumerate(ranks):
            if 0 < k < numel:
                b = int(np.flatnonzero(row >= k)[-1])
                bins[i, r], above[i, r] = b, row[b] - counts[i, b]
    return CutBins(numel, ranks, bins, above)


def low_counts(located: CutBins, task_vectors: torch.Tensor) -> np.ndarray:
    """(M, R, 2^16) int64: the low bits of the magnitudes inside each cut's bin."""
    patterns = _patterns(task_vectors)
    out = np.zeros((*located.bins.shape, 1 << LOW_BITS), dtype=np.int64)
    for i, row in enumerate(patterns):
        high = row >> LOW_BITS
        for r, b in enumerate(located.bins[i]):
            if b >= 0:
                inside = row[high == b] & ((1 << LOW_BITS) - 1)
                out[i, r] = np.bincount(inside, minlength=1 << LOW_BITS)
    return out


@dataclass
class Selection:
    """The second pass's total, which the method receives: every model's exact cuts."""

    located: CutBins
    counts: np.ndarray  # (M, R, 2^16)

    def combine(self, other: Selection) -> Selection:
        return Selection(self.located, self.counts + other.counts)

    @functools.cached_property
    def thresholds(self) -> list[tuple[float, ...]]:
        """Per model, the ranks[r]-th largest magnitude for each cut: +inf for rank 0 (keeps
        none), -inf for a rank of every entry (keeps all)."""
        out = []
        for i, model_bins in enumerate(self.located.bins):
            cuts = []
            for r, (k, b) in enumerate(zip(self.located.ranks, model_bins, strict=True)):
                if b < 0:
                    cuts.append(math.inf if k <= 0 else -math.inf)
                    continue
                at_or_above = np.cumsum(self.counts[i, r, ::-1])[::-1]
                low = int(np.flatnonzero(at_or_above >= k - self.located.above[i, r])[-1])
                pattern = np.array([(int(b) << LOW_BITS) | low], dtype=np.int32)
                cuts.append(float(pattern.view(np.float32)[0]))
            out.append(tuple(cuts))
        return out


def select(task_vectors: torch.Tensor, ranks: tuple[int, ...]) -> Selection:
    """The same select over (M, ...) task vectors held whole (a direct call's one tensor)."""
    located = locate(high_counts(task_vectors), ranks)
    return Selection(located, low_counts(located, task_vectors))


def model_bands(selection: Selection) -> list[Band]:
    """Each model's band from its cuts over the whole model: every entry at or above the
    keep cut's magnitude kept and every one at or above the drop cut's dropped (ties at a
    cut all fall on one side, so a band may hold a few more or fewer than its count)."""
    return [Band(at_least(keep), at_least(drop)) for keep, drop in selection.thresholds]


def whole_model_cuts(params: Mapping[str, Any]) -> Collect[Any] | None:
    """A trimming method's `collect`: with trim_scope="model", each model's band cuts
    (`band_ranks` of density and gamma) over its whole task vector; else None."""
    scope, density, gamma = params["trim_scope"], params["density"], params.get("gamma", 0.0)
    if isinstance(scope, str) and scope != "model":
        return None  # "tensor"; any other value is reported by the parameter check
    numbers = (isinstance(v, int | float) and not isinstance(v, bool) for v in (density, gamma))
    if not isinstance(scope, str) or not all(numbers):
        raise MergeError(
            "trim_scope: model ranks each model's magnitudes over the whole model, so "
            f"trim_scope, density and gamma take one value each (got trim_scope={scope!r}, "
            f"density={density!r}, gamma={gamma!r}); use trim_scope: tensor to vary them"
        )
    return model_cuts(functools.partial(band_ranks, density=float(density), gamma=float(gamma)))


def model_cuts(ranks: Callable[[int], tuple[int, ...]]) -> Collect[np.ndarray]:
    """The engine's collect for each model's cuts at `ranks(numel)` over its whole task
    vector: high-bit counts in the statistics pass, then one `refine` pass of low-bit counts
    inside the bins holding the cuts. The method receives the `Selection`."""

    def task_vectors(stack: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if base is None:
            raise MergeError("a whole-model trim ranks task vectors (model - base): give a base")
        return stack - base

    def second_look(counts: np.ndarray) -> Collect[Selection]:
        located = locate(counts, ranks(int(counts[0].sum())))

        def partial(_: object, stack: torch.Tensor, base: torch.Tensor | None) -> Selection:
            return Selection(located, low_counts(located, task_vectors(stack, base)))

        return Collect(partial, Selection.combine)

    def first_look(_: object, stack: torch.Tensor, base: torch.Tensor | None) -> np.ndarray:
        return high_counts(task_vectors(stack, base))

    return Collect(first_look, operator.add, second_look)

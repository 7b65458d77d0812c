"""How task vectors are sparsified: by magnitude, by a magnitude band, or at random.

Each mask is computed per model over one tensor. Magnitude masks keep exact counts: the
k-th largest magnitude is found by selection (introselect, linear time), everything above
it is kept, and entries equal to it are kept in index order until the count is exact. No
tensor is sorted. A whole-model trim (`_model_trim`) keeps every entry at or above each
model's k-th largest over all its tensors instead (`at_least`).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Flat entries per random draw; chunked merges use chunks that are multiples of it.
DRAW = 1 << 16
# Entries sampled to locate the k-th largest magnitude before selecting near it.
SAMPLE = 1 << 16


def tensor_generator(seed: int, name: str) -> np.random.Generator:
    """A generator (numpy's PCG64) seeded from (seed, tensor name) through a stable hash.

    Python's `hash()` is salted per process; sha256 is not, so the same (seed, name) gives
    the same draws in any process, thread or tensor order. numpy's rather than torch's: its
    raw 64-bit draws cost a sixth of what torch's CPU generator takes for them here.
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


# A parameter given once for every model, or once per model (in the models' order).
PerModel = float | Sequence[float]


def of_model(value: PerModel, i: int) -> float:
    """Model i's value of a parameter given once for all models or once per model."""
    return value if isinstance(value, int | float) else value[i]


def keep_count(fraction: float, numel: int) -> int:
    """Round fraction * numel half up (`int()` would turn 0.29 * 100 into 28)."""
    return min(numel, math.floor(fraction * numel + 0.5))


@dataclass(frozen=True)
class Cut:
    """The k largest entries of one model's flattened tensor, as a rule that any slice of it
    can apply alone: entries above `threshold`, then entries equal to it whose flat index
    is at most `last_tie` (-1: none)."""

    threshold: float
    last_tie: int

    def mask(self, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The rule over a 1-D slice holding flat entries offset, offset + 1, ...: 1 where
        an entry is kept, else 0, in the values' (floating) dtype. A float mask multiplies in
        one vectorised pass; torch's comparisons into bool, and products with bool, take
        5-10 times longer on the CPU."""
        import torch

        stop = self.last_tie + 1 - offset
        mask = torch.empty_like(values)
        if stop >= values.numel():  # every entry at or before the last kept tie
            return torch.ge(values, self.threshold, out=mask)
        torch.gt(values, self.threshold, out=mask)
        if stop > 0:
            mask[:stop] += values[:stop] == self.threshold
        return mask


KEEP_ALL = Cut(-math.inf, -1)
KEEP_NONE = Cut(math.inf, -1)


@dataclass(frozen=True)
class Band:
    """Keep what `keep` selects and `drop` does not (breadcrumbs drops the top outliers);
    `scale` multiplies the kept entries (an L1 rescale found over the whole tensor)."""

    keep: Cut
    drop: Cut = KEEP_NONE
    scale: float = 1.0

    def mask(self, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """1 where kept, else 0 (see `Cut.mask`): `drop` keeps a subset of what `keep` does,
        both ranking entries by (magnitude, then index), so the band is their difference."""
        mask = self.keep.mask(values, offset)
        if self.drop is not KEEP_NONE:
            mask -= self.drop.mask(values, offset)
        return mask


def band_of(magnitudes: torch.Tensor, *, density: float, gamma: float) -> Band:
    """The band of one model's 1-D magnitudes: drop the round(gamma * numel) largest, keep
    the next max(1, round(density * numel)).

    When the two counts overlap the kept count wins and fewer outliers are dropped (as
    mergekit does). Both cuts break ties in index order, so the nested choice is consistent.
    """
    numel = magnitudes.numel()
    n_keep, n_top = band_counts(numel, density=density, gamma=gamma)
    if n_keep == numel:
        return Band(KEEP_ALL)
    return Band(top_cut(magnitudes, n_top + n_keep), top_cut(magnitudes, n_top))


def band_counts(numel: int, *, density: float, gamma: float) -> tuple[int, int]:
    """(kept, dropped above them): max(1, round(density * numel)) and round(gamma * numel),
    fewer dropped when the two overlap."""
    n_keep = max(1, keep_count(density, numel))
    return n_keep, min(keep_count(gamma, numel), numel - n_keep)


def top_cut(values: torch.Tensor, k: int) -> Cut:
    """The cut keeping exactly k entries of a 1-D tensor: every entry above the k-th
    largest, then entries equal to it in index order, so the choice is deterministic.

    On CPU the k-th largest comes from numpy (a dependency of nanmerge), whose introselect
    is 10-20 times faster than torch's `kthvalue` here; nothing is sorted.
    """
    import torch

    n = values.numel()
    if k <= 0:
        return KEEP_NONE
    if k >= n:
        return KEEP_ALL
    if values.device.type != "cpu":
        threshold = float(values.kthvalue(n - k + 1).values)
        missing = k - int(torch.count_nonzero(values > threshold))
        ties = (values == threshold).nonzero()[: max(missing, 0), 0]
        return Cut(threshold, int(ties[-1]) if len(ties) else -1)
    array = values.detach().numpy()
    if n >= 4 * SAMPLE:
        cut = bracketed_cut([(0, array)], array[:: n // SAMPLE], n, k)
        if cut is not None:
            return cut
    return _cut_among(array, np.arange(n), k)


def bracketed_cut(
    pieces: Iterable[tuple[int, np.ndarray]], sample: np.ndarray, n: int, k: int
) -> Cut | None:
    """The cut keeping the k largest of n magnitudes that arrive as (offset, values) pieces,
    in order (see `BracketedCut`); None when the sample misplaces the k-th largest."""
    bracket = BracketedCut(sample, n, k)
    for offset, piece in pieces:
        bracket.add(offset, piece)
    return bracket.cut()


class BracketedCut:
    """The cut keeping the k largest of n magnitudes, selecting only near the k-th largest.

    `sample` (the entries at flat positions 0, stride, 2 * stride, ...; stride = n //
    SAMPLE) places the k-th largest between two sample values, four standard deviations of
    the sample's rank either side. The magnitudes are then `add`ed as pieces, in order, so
    they need not exist all at once (and several cuts can share one pass over them): each
    piece's entries above the bracket are counted and those inside it gathered (about 2%
    of them at k = n/2).
    """

    def __init__(self, sample: np.ndarray, n: int, k: int) -> None:
        self.low, self.high = _bracket(sample, n, k)
        self.k = k
        self.above = 0
        self.values: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []

    def add(self, offset: int, piece: np.ndarray) -> None:
        """Magnitudes at flat positions offset, offset + 1, ... (read, not kept)."""
        self.above += int(np.count_nonzero(piece > self.high))
        inside = np.flatnonzero((piece >= self.low) & (piece <= self.high))
        self.values.append(piece[inside])
        self.positions.append(inside + offset)

    def cut(self) -> Cut | None:
        """The cut, or None when the k-th largest was not inside the bracket (the caller then
        selects among all entries)."""
        if not 0 < self.k - self.above <= sum(v.size for v in self.values):
            return None
        values, positions = np.concatenate(self.values), np.concatenate(self.positions)
        return _cut_among(values, positions, self.k - self.above)


def _bracket(sample: np.ndarray, n: int, k: int) -> tuple[float, float]:
    """Two values of `sample` (strided from n values) that hold the k-th largest of the n
    between them, unless the sample misleads by more than four standard deviations of its rank."""
    sample = np.sort(sample)
    rank = (n - k) / n * sample.size  # where the k-th largest falls in the ascending sample
    margin = 4.0 * math.sqrt(max(rank * (sample.size - rank) / sample.size, 1.0)) + 2.0
    low = sample[max(0, math.floor(rank - margin))]
    high = sample[min(sample.size - 1, math.ceil(rank + margin))]
    return float(low), float(high)


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of `values` (1 <= k <= size).

    Many values are first narrowed by sampled brackets, as `bracketed_cut` does: linear, and
    a bracket of one repeated value ends it at once. The rest are sorted, not partitioned:
    numpy's partition slows down 20-fold on values with few distinct entries (0.2 s for 1.3M
    magnitudes of bf16 task vectors, against 0.01 s to sort them), and those are common here.
    """
    while values.size >= 4 * SAMPLE:
        low, high = _bracket(values[:: values.size // SAMPLE], values.size, k)
        above = int(np.count_nonzero(values > high))
        inside = values[(values >= low) & (values <= high)]
        if not 0 < k - above <= inside.size or inside.size == values.size:
            break
        if low == high:
            return high
        values, k = inside, k - above
    return float(np.sort(values)[values.size - k])


def _cut_among(values: np.ndarray, positions: np.ndarray, k: int) -> Cut:
    """The cut keeping the k largest of `values` (entries at ascending flat `positions`),
    when every entry not among them is known to be smaller than their k-th largest or kept."""
    threshold = _kth_largest(values, k)
    missing = k - int(np.count_nonzero(values > threshold))
    # fewer ties than missing only with NaN entries, which the engine then reports
    ties = positions[values == threshold][: max(missing, 0)]
    return Cut(threshold, int(ties[-1]) if len(ties) else -1)


def at_least(threshold: float) -> Cut:
    """Every entry >= threshold, ties at it included (+inf keeps none, -inf keeps all)."""
    if threshold == math.inf:
        return KEEP_NONE
    return KEEP_ALL if threshold == -math.inf else Cut(threshold, sys.maxsize)


def band_ranks(numel: int, *, density: float, gamma: float = 0.0) -> tuple[int, int]:
    """The ranks of a band's two cuts among numel magnitudes (see `band_counts`): the k-th
    largest kept, and the k-th largest dropped (0: none)."""
    n_keep, n_top = band_counts(numel, density=density, gamma=gamma)
    return n_top + n_keep, n_top


def keep_probability(density: float) -> float:
    """The probability a random mask keeps an entry: `density` rounded to a multiple of
    2^-16 (at least 2^-16), within 8e-6 of it; DARE rescales by this, so it stays unbiased."""
    return max(1, round(density * 65536)) / 65536


def random_mask(
    shape: torch.Size,
    density: float | Sequence[float],
    generator: np.random.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """1.0 with probability `keep_probability(density)`, else 0.0 (float32), drawn in blocks
    of DRAW flat entries, all models per block, and moved to `device`. A density per model
    (one per row of `shape`) only changes what each row's draws are compared with, so the
    draws, and the masks of models sharing a density, are those of one shared density.

    Each entry compares a 16-bit draw with the probability: one raw 64-bit draw of the
    generator gives four of them. Drawing block by block makes a tensor's masks the same
    whether it is merged whole or in chunks that are multiples of DRAW (each chunk
    continuing the same generator), and drawing on the CPU keeps them the same on a GPU.
    Without a generator, one is seeded from torch's global generator, so that
    `torch.manual_seed` makes the masks reproducible, as in mergekit and PEFT.
    """
    import torch

    generator = or_global(generator)
    m, numel = shape[0], math.prod(shape[1:])
    # kept: a draw below it (one number, or a column of one per model)
    rows = [round(keep_probability(of_model(density, i)) * 65536) for i in range(m)]
    if all(b == 65536 for b in rows):
        return torch.ones(shape, device=device)
    below = rows[0] if isinstance(density, int | float) else np.array(rows).reshape(m, 1, 1)
    keep = np.empty((m, numel), dtype=np.float32)  # float: see `Cut.mask`
    whole = numel - numel % DRAW
    # up to 8 whole blocks per call: one call draws what the calls block by block would
    for begin in range(0, whole, 8 * DRAW):
        blocks = min(8, (whole - begin) // DRAW)
        draws = _draws(generator, (blocks, m), DRAW).transpose(1, 0, 2)
        out = keep[:, begin : begin + blocks * DRAW].reshape(m, blocks, DRAW)
        np.less(draws, below, out=out, casting="unsafe")
    if whole < numel:
        rest = _draws(generator, (m,), numel - whole)
        per_row = below if isinstance(below, int) else below[:, 0]
        np.less(rest, per_row, out=keep[:, whole:], casting="unsafe")
    return torch.from_numpy(keep).reshape(shape).to(device)


def or_global(generator: np.random.Generator | None) -> np.random.Generator:
    """`generator`, or one seeded from torch's global generator, so that `torch.manual_seed`
    makes the draws reproducible, as in mergekit and PEFT."""
    import torch

    if generator is not None:
        return generator
    return np.random.Generator(np.random.PCG64(int(torch.randint(1 << 62, ()))))


def uniform_draws(m: int, numel: int, generator: np.random.Generator | None) -> torch.Tensor:
    """(m, numel) uniform 16-bit draws as int32 (0 to 65535), row after row: an entry with
    keep probability k / 65536 is kept where its draw is below k. Without a generator one is
    seeded from torch's global generator, as in `random_mask`."""
    import torch

    generator = or_global(generator)
    return torch.from_numpy(_draws(generator, (m,), numel).astype(np.int32))


def _draws(generator: np.random.Generator, rows: tuple[int, ...], width: int) -> np.ndarray:
    """`width` uniform 16-bit draws per row: the four 16-bit lanes of raw 64-bit draws, read
    little-endian so they are the same on any machine."""
    words = -(-width // 4)
    raw = generator.bit_generator.random_raw(math.prod(rows) * words)
    lanes = raw.astype("<u8", copy=False).view("<u2").reshape(*rows, 4 * words)
    return lanes[..., :width]

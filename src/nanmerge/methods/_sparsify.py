"""How task vectors are sparsified: by magnitude, by a magnitude band, or at random.

Each mask is computed per model over one tensor. Magnitude masks keep exact counts: the
k-th largest magnitude is found by selection (introselect, linear time), everything above
it is kept, and entries equal to it are kept in index order until the count is exact. No
tensor is sorted.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name) through a stable hash.

    Python's `hash()` is salted per process; sha256 is not, so the same (seed, name) gives
    the same draws in any process, thread or tensor order.
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little"))
    return generator


def keep_count(fraction: float, numel: int) -> int:
    """Round fraction * numel half up (`int()` would turn 0.29 * 100 into 28)."""
    return min(numel, math.floor(fraction * numel + 0.5))


def magnitude_mask(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Per model, True for the k = max(1, round(density * numel)) largest |entries|."""
    return band_mask(task_vectors, density=density, gamma=0.0)


def band_mask(task_vectors: torch.Tensor, *, density: float, gamma: float) -> torch.Tensor:
    """Per model, drop the round(gamma * numel) largest |entries|, keep the next ones.

    The kept count is max(1, round(density * numel)); when the two counts overlap the
    kept count wins and fewer outliers are dropped (as mergekit does).
    """
    m = task_vectors.shape[0]
    flat = task_vectors.reshape(m, -1)
    numel = flat.shape[1]
    n_keep = max(1, keep_count(density, numel))
    n_top = min(keep_count(gamma, numel), numel - n_keep)
    if n_keep == numel:
        return torch.ones_like(task_vectors, dtype=torch.bool)
    mask = torch.empty_like(flat, dtype=torch.bool)
    for row, out in zip(flat, mask, strict=True):
        magnitudes = row.abs()  # one model at a time: one tensor's worth of workspace
        out.copy_(top_mask(magnitudes, n_top + n_keep))
        if n_top:
            out &= ~top_mask(magnitudes, n_top)  # nested: ties are broken the same way in both
    return mask.reshape(task_vectors.shape)


def top_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """True for exactly k entries of a 1-D tensor: every entry above the k-th largest, then
    entries equal to it in index order, so the choice is deterministic.

    On CPU this runs in numpy (a dependency of nanmerge): its introselect and counting are
    10-20 times faster than torch's `kthvalue` and bool reductions, and nothing is sorted.
    """
    n = values.numel()
    if k <= 0 or k >= n:
        return torch.full_like(values, k > 0, dtype=torch.bool)
    if values.device.type != "cpu":
        threshold = values.kthvalue(n - k + 1).values
        mask = values > threshold
        equal = (values == threshold).nonzero()[: k - int(mask.sum()), 0]
        mask[equal] = True
        return mask
    array = values.detach().numpy()
    selected = array.copy()
    selected.partition(n - k)  # selected[n - k] is now the k-th largest
    threshold = selected[n - k]
    del selected
    flags = array > threshold
    missing = k - int(np.count_nonzero(flags))
    if missing > 0:
        flags[np.flatnonzero(array == threshold)[:missing]] = True
    return torch.from_numpy(flags)


def random_mask(
    shape: torch.Size,
    density: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """True with probability `density`, all models drawn in one call on the generator's device.

    Drawing on the generator's device (CPU for `tensor_generator`) keeps the masks the same
    whether the merge runs on CPU or GPU.
    """
    draw_device = generator.device if generator is not None else device
    draws = torch.rand(shape, generator=generator, device=draw_device)
    return (draws < density).to(device)

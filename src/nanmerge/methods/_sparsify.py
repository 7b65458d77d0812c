"""How task vectors are sparsified: by magnitude, by a magnitude band, or at random.

Each mask is computed per model over one tensor. Magnitude masks keep exact counts
(top-k indices, not a threshold), so ties at the threshold never change how many survive.
"""

from __future__ import annotations

import hashlib
import math

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
    flat = task_vectors.reshape(m, -1).abs()
    numel = flat.shape[1]
    n_keep = max(1, keep_count(density, numel))
    n_top = min(keep_count(gamma, numel), numel - n_keep)
    if n_keep == numel:
        return torch.ones_like(task_vectors, dtype=torch.bool)
    order = flat.topk(n_top + n_keep, dim=1, sorted=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order[:, n_top:], True)
    return mask.reshape(task_vectors.shape)


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

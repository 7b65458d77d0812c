"""DELLA: MagPrune, a random drop whose keep probability grows with the entry's magnitude
rank, as one more sparsify step of the task-vector table (`_steps`), with TIES' election
(`della`) or a plain sum (`della_linear`).

Per model and row, the entries' magnitude ranks r = 0 .. c - 1 (ascending) give keep
probabilities p = density - epsilon + 2 epsilon r / (c - 1), in [density - epsilon,
density + epsilon]. Both references rank per row: the authors' `rank_magnitude`
(github.com/declare-lab/della, mergekit/mergekit/sparsify.py) and mergekit 0.1.5's
`della_magprune`; a 1-D tensor is one row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from nanmerge._params import Interval
from nanmerge.methods._bands import Conventions, Rescale, l1_ratio
from nanmerge.methods._registry import Density, Scale, register
from nanmerge.methods._sparsify import PerModel, of_model, or_global, uniform_draws
from nanmerge.methods._steps import Merge, Steps, elect_signs, weighted_sum

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Half the width of the window of keep probabilities around density (the paper's window / 2)
Epsilon = Annotated[float, Interval(ge=0, lt=1)]
# Entries whose ranks are found at once (a block of rows): the sort's workspace is 16 bytes each
RANK_BLOCK = 1 << 22


def rank_probabilities(
    tau: torch.Tensor, *, density: float, epsilon: float, conventions: Conventions
) -> torch.Tensor:
    """Each entry's keep probability (float32, tau's shape) from its magnitude rank in its row.

    nanmerge: rows are the first dimension (a 1-D tensor is one row), equal magnitudes
    ranked in index order (a stable sort). mergekit: the same torch calls as della_magprune
    (an unstable argsort along dimension 1 of the tensor, so a 3-D tensor ranks along its
    second axis). A row of one entry gets p = density (mergekit divides 0 by 0 there).
    """
    import torch

    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    if conventions == "nanmerge":
        rows = rows.reshape(rows.shape[0], -1)
    span = rows.shape[1] - 1
    if span == 0:
        return torch.full(tau.shape, density, dtype=torch.float32, device=tau.device)
    stable = conventions == "nanmerge"
    # each rank scattered to its entry (the inverse of the sort's permutation)
    shape = [1] * rows.dim()
    shape[1] = rows.shape[1]
    counting = torch.arange(rows.shape[1], dtype=torch.float32, device=tau.device).view(shape)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=tau.device)
    # rows rank alone: a block of them at a time bounds the sort's int64 workspace
    step = max(1, RANK_BLOCK // max(1, rows[0].numel()))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].abs()
        order = torch.argsort(block, dim=1, descending=False, stable=stable)
        ranks[start : start + step].scatter_(1, order, counting.expand(order.shape))
    fraction = ranks.div_(span)
    return fraction.mul_(2 * epsilon).add_(density - epsilon).reshape(tau.shape)


def magprune(
    task_vectors: torch.Tensor,
    coef: torch.Tensor,
    *,
    density: PerModel,
    epsilon: PerModel,
    generator: np.random.Generator | None = None,
    rescale: Rescale = "probability",
    conventions: Conventions = "nanmerge",
    **_: object,
) -> torch.Tensor:
    """Keep each entry with its rank's probability p, rounded to a multiple of 2^-16 (at
    least 2^-16): kept where a 16-bit draw from `generator` is below 65536 p. The kept entries
    are divided by that p ("probability", unbiased), or the model's weight is multiplied by
    ||tau_i||_1 / ||kept tau_i||_1 ("l1", mergekit's rescale: true), or neither ("none").
    A model at density 1 keeps every entry (as mergekit does; epsilon unread)."""
    import torch

    m = task_vectors.shape[0]
    generator = or_global(generator)
    scales = [1.0] * m
    for i, tau in enumerate(task_vectors):
        d, e = of_model(density, i), of_model(epsilon, i)
        # model i's draws follow model i - 1's, drawn even where unused: one model's draws
        # at a time, and the same ones whichever models keep everything
        draws = uniform_draws(1, tau.numel(), generator).to(task_vectors.device)
        if d >= 1:
            continue
        p = rank_probabilities(tau, density=d, epsilon=e, conventions=conventions)
        below = p.mul_(65536).round_().clamp_(min=1)  # kept where the draw is below
        kept = torch.lt(draws.view(tau.shape), below).to(tau.dtype)
        if rescale == "l1":
            before = tau.abs().sum()
            scales[i] = l1_ratio(before, tau.mul_(kept).abs().sum())
        else:
            tau.mul_(kept.div_(below.div_(65536)) if rescale == "probability" else kept)
    if rescale != "l1":
        return coef
    return coef * torch.tensor(scales, dtype=coef.dtype, device=coef.device)


DELLA = Steps(magprune, elect_signs)
DELLA_LINEAR = Steps(magprune, weighted_sum)


def _probabilities_fit(params: Mapping[str, Any]) -> list[str]:
    """every keep probability in (0, 1]: density - epsilon > 0 and density + epsilon <= 1
    (one model's values at a time; density 1 keeps everything and reads no epsilon)."""
    density, epsilon = params["density"], params["epsilon"]
    if density >= 1 or (density - epsilon > 0 and density + epsilon <= 1 + 1e-12):
        return []
    return [
        f"density = {density!r} and epsilon = {epsilon!r} give keep probabilities from "
        f"{density - epsilon:g} to {density + epsilon:g}, and every one must lie in (0, 1]; "
        f"choose epsilon below {min(density, 1 - density):g} for this density"
    ]


def _averages(params: Mapping[str, Any]) -> bool:
    return params.get("merge") == "mean"


@register(
    reference="https://arxiv.org/abs/2406.11617",
    needs_base=True,
    validate=_probabilities_fit,
    averages=_averages,
    per_model=("density", "epsilon"),
)
def della(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.5,
    epsilon: Epsilon | tuple[float, ...] = 0.15,
    scale: Scale = 1.0,
    merge: Merge = "mean",
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "probability",
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """DELLA (Deep, Bhardwaj, Poria 2024): MagPrune each task vector, elect signs as TIES
    does, merge the agreeing entries.

    https://arxiv.org/abs/2406.11617. density and epsilon: one value or one per model; every
    keep probability must lie in (0, 1] (checked before any tensor is read). Defaults:
    mergekit's epsilon 0.15, lambda 1 (scale) and normalize true (merge="mean"); mergekit's
    density 1.0 drops nothing, so density defaults to 0.5 (DARE's here). rescale=
    "probability" divides by each entry's keep probability, as the paper and the authors'
    code do; mergekit rescales by the L1 ratio ("l1"). Whole tensor, not chunked: ranks need
    whole rows. The coefficient weighs each tau_i in the election and the sum (as DARE's);
    merge and conventions as in `ties` (mergekit's: its ranks, see `rank_probabilities`; a
    sum >= 0 elects +; a zero "mean" divisor becomes 1). Draws come from the numpy
    `generator` (`tensor_generator(seed, name)`), so they reproduce, but are not mergekit's.
    """
    return DELLA(
        tensors,
        coef,
        base=base,
        scale=scale,
        merge=merge,
        density=density,
        epsilon=epsilon,
        generator=generator,
        conventions=conventions,
        rescale=rescale,
    )


@register(
    reference="https://arxiv.org/abs/2406.11617",
    needs_base=True,
    validate=_probabilities_fit,
    per_model=("density", "epsilon"),
)
def della_linear(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density | tuple[float, ...] = 0.5,
    epsilon: Epsilon | tuple[float, ...] = 0.15,
    scale: Scale = 1.0,
    conventions: Conventions = "nanmerge",
    rescale: Rescale = "probability",
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune, then base + scale * sum_i coef_i tau_i (mergekit's della_linear).

    https://arxiv.org/abs/2406.11617. As `della` without the election: with rescale=
    "probability" its expectation is task arithmetic at this scale. conventions changes
    only the ranks here (a sum needs no other convention).
    """
    return DELLA_LINEAR(
        tensors,
        coef,
        base=base,
        scale=scale,
        density=density,
        epsilon=epsilon,
        generator=generator,
        conventions=conventions,
        rescale=rescale,
    )

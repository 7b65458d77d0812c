"""Elementwise competition between task vectors: MagMax and PCB-merging.

tau_i = tensors[i] - base. MagMax keeps, per entry, the task vector of largest magnitude; PCB
scores every entry of every task vector by its competition within its own model and with
the other models, keeps the best-scored ones and averages by score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from nanmerge._params import Interval
from nanmerge._types import Collect, MemoryCost, MergeError, TensorContext
from nanmerge.methods._registry import Density, Scale, register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# The fraction of magnitudes PCB clamps at each end of a model's task vector (at most 0.1:
# beyond that it is no longer an outlier clamp, and the two cuts could cross).
Clip = Annotated[float, Interval(ge=0, le=0.1)]

# A model's |tau| histogram bins float32 bit patterns (a nonnegative float's bits grow with
# its value) shifted right by 23 - MANTISSA_BITS: any float32 has a bin, and each bin spans a
# factor of at most 1 + 2**-MANTISSA_BITS. EXTREMES magnitudes at each end are kept exactly.
MANTISSA_BITS = 8
_SHIFT = 23 - MANTISSA_BITS
BINS = 1 << (31 - _SHIFT)
EXTREMES = 256


@register(
    reference="https://arxiv.org/abs/2407.06322",
    needs_base=True,
    elementwise=True,
    takes_coefficients=False,
)
def magmax(
    tensors: torch.Tensor, coef: torch.Tensor, *, base: torch.Tensor, scale: Scale = 0.5
) -> torch.Tensor:
    """MagMax: base + scale * (the tau_i of largest magnitude), entry by entry.

    https://arxiv.org/abs/2407.06322 (Marczak et al. 2024; code github.com/danielm1405/magmax,
    FusionBench `fusion_bench/method/magmax`). It selects rather than weighs, so it has no
    coefficient slot (NAN.md: selection methods refuse `coefficients: nan`): a recipe that
    gives coefficients is refused. A direct call's coef scales each tau_i before the
    competition (the largest |coef_i * tau_i| wins); the engine always passes ones. Ties go to
    the later model (the reference folds with >=), so a tie between +x and -x depends on the
    models' order. The default scale 0.5 is the authors' script for independent fine-tunes
    (FusionBench's default too).
    """
    import torch

    weighted = (tensors - base).mul_(coef.view((-1,) + (1,) * (tensors.dim() - 1)))
    chosen = weighted[0]
    for candidate in weighted[1:]:
        chosen = torch.where(candidate.abs() >= chosen.abs(), candidate, chosen)
    return chosen.mul(scale).add_(base)


@dataclass(frozen=True)
class MagnitudeSketch:
    """Each model's distribution of |tau| over the whole model, gathered chunk by chunk.

    `counts` (M, BINS) is a histogram over float32 bit patterns, so it needs no range known in
    advance and adds up exactly; `lowest` and `highest` keep each model's EXTREMES smallest
    (ascending) and largest (descending) magnitudes exactly.
    """

    counts: torch.Tensor
    lowest: torch.Tensor
    highest: torch.Tensor

    @property
    def numel(self) -> int:
        return int(self.counts[0].sum())

    def quantile(self, rank: int) -> torch.Tensor:
        """Each model's rank-th smallest magnitude (0-based), (M,): exact within EXTREMES of
        either end, else interpolated in its histogram bin (relative error < 2**-8)."""
        import torch

        from_top = self.numel - 1 - rank
        if rank < self.lowest.shape[1]:
            return self.lowest[:, rank]
        if from_top < self.highest.shape[1]:
            return self.highest[:, from_top]
        cumulative = self.counts.cumsum(dim=1)
        target = torch.full((len(cumulative), 1), rank, dtype=cumulative.dtype)
        index = torch.searchsorted(cumulative, target.to(cumulative.device), right=True)
        count = self.counts.gather(1, index).squeeze(1)
        before = cumulative.gather(1, index).squeeze(1) - count
        edges = torch.cat([index, index + 1], dim=1).to(torch.int32).bitwise_left_shift(_SHIFT)
        low, high = edges.view(torch.float32).unbind(dim=1)
        within = ((rank - before).double() + 0.5) / count.double()
        value = low + (high - low) * within.float()
        # the exact extremes bracket every interior rank
        return torch.minimum(torch.maximum(value, self.lowest[:, -1]), self.highest[:, -1])


def _sketch_chunk(
    context: TensorContext, stack: torch.Tensor, base: torch.Tensor | None
) -> MagnitudeSketch:
    """One chunk's sketch, one model at a time (a chunk's worth of workspace)."""
    import torch

    counts = torch.zeros((len(stack), BINS), dtype=torch.int64, device=stack.device)
    k = min(EXTREMES, stack.shape[1])
    lowest, highest = [], []
    for row, out in zip(stack, counts, strict=True):
        magnitude = row.abs() if base is None else (row - base).abs_()
        out.copy_(torch.bincount(magnitude.view(torch.int32) >> _SHIFT, minlength=BINS))
        lowest.append(torch.topk(magnitude, k, largest=False).values)
        highest.append(torch.topk(magnitude, k).values)
    return MagnitudeSketch(counts, torch.stack(lowest), torch.stack(highest))


def _merge_sketches(a: MagnitudeSketch, b: MagnitudeSketch) -> MagnitudeSketch:
    """`b` folded into `a`, the running total, whose histogram is reused."""
    import torch

    lowest = torch.cat([a.lowest, b.lowest], dim=1)
    highest = torch.cat([a.highest, b.highest], dim=1)
    k = min(EXTREMES, lowest.shape[1])
    return MagnitudeSketch(
        a.counts.add_(b.counts),
        torch.topk(lowest, k, dim=1, largest=False).values,
        torch.topk(highest, k, dim=1).values,
    )


def _clip_ranks(numel: int, clip: float) -> tuple[int, int]:
    """The reference's clamp positions in ascending order: int(d r) and int(d (1 - r) - 1)."""
    return int(numel * clip), int(numel * (1 - clip) - 1)


def _kth_smallest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th smallest entry (0-based), (M,): one row at a time, since a selection
    copies its input and keeps an index per entry."""
    import torch

    return torch.stack([row.kthvalue(k + 1).values for row in rows])


def _balanced_weights(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Drop and rescale, in place: per model, scores below its int(n (1 - density))-th
    smallest become 0 and the rest are min-max normalized to [0, 1] (0 where a model's
    kept scores are all equal, where the reference divides 0 by 0)."""
    import torch

    cut = int(scores.shape[1] * (1 - density))
    floor = _kth_smallest(scores, cut).unsqueeze(1)
    span = scores.amax(dim=1, keepdim=True).sub_(floor)
    span = torch.where(span > 0, span, math.inf)
    return scores.sub_(floor).clamp_(min=0).div_(span)


@register(
    reference="https://arxiv.org/abs/2410.02396",
    needs_base=True,
    collect=Collect(_sketch_chunk, _merge_sketches),
    # the whole stack, and in the collect pass one model's chunk of magnitudes and its bins;
    # the histograms add about M MiB, a constant the bytes of the bound leave out
    memory=MemoryCost(lambda m: 7 * m + 4, lambda m: 4, "(7M + 4) * L + 4 * C + M MiB"),
)
def pcb(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    density: Density = 0.1,
    clip: Clip = 1e-4,
    scale: Scale = 1.0,
    collected: MagnitudeSketch | None = None,
) -> torch.Tensor:
    """PCB-merging: score each entry by intra- and inter-model competition, keep the top
    `density` of each model's scores, and average the task vectors by score.

    https://arxiv.org/abs/2410.02396 (Du et al. 2024), following the authors' `PCB_merge` in
    github.com/duguodong7/pcb-merging (pcb-merging.py), per model i of M:
    |tau_i| is clamped to its `clip` and 1 - `clip` quantiles [lo_i, hi_i] (sign kept);
    intra_i = exp(M * ((|tau_i| - lo_i) / (hi_i - lo_i))^2) (a softmax up to a factor that the
    later normalization removes); inter_i = tanh(tau_i * sum_j tau_j) on the unclamped tau;
    the score intra_i * inter_i is floored at its int(n (1 - density))-th smallest value and
    min-max normalized into the weight w_i; merged = sum_i coef_i w_i tau_i / max(sum_i w_i,
    1e-12) on the clamped tau; result = base + scale * merged. NAN's coefficient multiplies the
    task vector in the weighted sum (where the authors' search puts its per-model lambdas), not
    the scores; the weights' sum divides, the coefficients' does not, so NAN's scale
    convention matters here. Defaults: density 0.1 (`pcb_ratio` of `PCB_merge`; their search
    script uses 0.05), clip 1e-4, scale 1.0 (the start of their lambda search in [0.8, 1.3]).
    The paper writes inter-balancing as a sum of softmaxes over tau_i * tau_j, and the
    vision code clamps at 1e-2 with another inter term; we follow `PCB_merge`, which the
    README names as the method.

    Whole model versus per tensor: the reference flattens the whole model. Here the clamp
    bounds lo_i, hi_i are whole-model, from the engine's collect pass (`collected`): exact
    when the clamped rank lies within 256 of either end (models up to ~2.5M entries at the
    default clip), else within a relative 2**-8. The score's cut and its normalization are
    per tensor (a documented difference: the score depends on those whole-model bounds, so
    its whole-model quantile would need a second pass). So each tensor keeps its own top
    `density` of scores, and one of at most 1 / density entries (a small bias) keeps none: its
    floor is its maximum, and it stays at the base. Called directly (no `collected`), the
    tensor is the whole model and the bounds are exact.
    """
    import torch

    m = tensors.shape[0]
    tau = (tensors - base).reshape(m, -1)
    if collected is None:
        low_rank, high_rank = _clip_ranks(tau.shape[1], clip)
        magnitudes = tau.abs()
        low, high = _kth_smallest(magnitudes, low_rank), _kth_smallest(magnitudes, high_rank)
        del magnitudes
    else:
        if collected.counts.shape[0] != m:
            raise MergeError(
                f"pcb: the whole-model statistic holds {collected.counts.shape[0]} models but "
                f"this tensor stacks {m}; merge every tensor from the same models"
            )
        low_rank, high_rank = _clip_ranks(collected.numel, clip)
        low = collected.quantile(low_rank).to(tau.device)
        high = collected.quantile(high_rank).to(tau.device)
    low, high = low.unsqueeze(1), high.unsqueeze(1)
    scores = torch.mul(tau, tau.sum(dim=0)).tanh_()
    magnitudes = tau.abs().clamp_(low, high)
    clamped = tau.sign_().mul_(magnitudes)
    span = high - low
    span = torch.where(span > 0, span, math.inf)  # all magnitudes equal: intra is exp(0)
    scores.mul_(magnitudes.sub_(low).div_(span).square_().mul_(m).exp_())
    del magnitudes
    weights = _balanced_weights(scores, density)
    merged = torch.mv(clamped.mul_(weights).t(), coef).div_(weights.sum(dim=0).clamp_(min=1e-12))
    return merged.view(base.shape).mul_(scale).add_(base)

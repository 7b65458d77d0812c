"""Entry-by-entry choices between a base and one fine-tune (mergekit's nearswap and
arcee_fusion): each entry of the result is the base's, the fine-tune's, or between them,
by a rule on that entry. Neither weighs models against each other, so both refuse
coefficients."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from nanmerge._params import Interval
from nanmerge.methods._registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

Threshold = Annotated[float, Interval(ge=0, lt=math.inf)]

# nearswap divides by |base - model| clamped to at least this.
_NEARSWAP_FLOOR = 1e-6
# arcee_fusion adds this to both softmax distributions before their KL divergence.
_FUSION_EPS = 1e-8


@register(
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    needs_base=True,
    min_models=1,
    max_models=1,
    elementwise=True,
    takes_coefficients=False,
)
def nearswap(
    tensors: torch.Tensor, coef: torch.Tensor, *, base: torch.Tensor, t: Threshold
) -> torch.Tensor:
    """w * model + (1 - w) * base, entry by entry, with w = clamp(t / |base - model|, 0, 1)
    (|base - model| clamped to 1e-6): mergekit's `nearswap` (reference: the model card of
    alchemonaut/QuartetAnemoi-70B-t0.0001). Entries within t of the base take the model's
    value; farther ones move from the base toward the model by t / distance, so no entry
    moves more than t. `t` is required, as in mergekit (its scale is the weights'; the
    reference used 0.0001); t = 0 returns the base. The one model is mergekit's non-base
    input, the base its `base_model`. No coefficient slot: coefficients are refused.
    """
    import torch

    model = tensors[0]
    distance = torch.sub(base, model).abs_().clamp_(min=_NEARSWAP_FLOOR)
    weight = distance.reciprocal_().mul_(t).clamp_(0, 1)
    return torch.lerp(base, model, weight)


@register(
    reference="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/arcee_fusion.py",
    needs_base=True,
    min_models=1,
    max_models=1,
    takes_coefficients=False,
)
def arcee_fusion(tensors: torch.Tensor, coef: torch.Tensor, *, base: torch.Tensor) -> torch.Tensor:
    """mergekit's `arcee_fusion` (dynamic threshold fusion): the base, with the model's
    value in the entries whose importance is an upper outlier.

    importance = |model - base| * KL(p || q), p and q the softmax of the model's and the
    base's vectors along the last axis (plus 1e-8 each), one KL per vector; an entry takes
    the model's value where importance >= median + 1.5 (Q3 - Q1). Quantile q is the sorted
    importances' entry floor(q (n - 1)), as in mergekit; mergekit estimates it from 10^6
    entries drawn at random (unseeded) above that size, where this computes it exactly, so
    there the results are deterministic and may differ from mergekit's slightly. The model
    is mergekit's non-base input. No parameters; coefficients are refused.
    """
    import torch

    model = tensors[0]
    if model.numel() == 0:
        return base
    p = torch.softmax(model, dim=-1).add_(_FUSION_EPS)
    q = torch.softmax(base, dim=-1).add_(_FUSION_EPS)
    # p / q as mergekit divides (KL of near-equal rows cancels: its rounding decides ties)
    divergence = torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    importance = torch.sub(model, base).abs_().mul_(divergence)
    flat, last = importance.reshape(-1), importance.numel() - 1
    # one order statistic at a time: a copy each, where a sort would hold three
    q1, median, q3 = (flat.kthvalue(i + 1).values for i in (last // 4, last // 2, 3 * last // 4))
    threshold = median + 1.5 * (q3 - q1)  # in float32, as mergekit compares
    return torch.where(importance >= threshold, model, base)

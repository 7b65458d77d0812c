"""Spherical linear interpolation between exactly two models."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from nanmerge._types import MergeError
from nanmerge.methods._registry import Fraction, register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# Above this |cos| the two tensors are treated as colinear and interpolated linearly
# (the angle is too small, or too close to pi, for sin(angle) to divide by safely).
_COLINEAR = 0.9995


@register(
    reference="https://github.com/arcee-ai/mergekit",
    needs_base=False,
    min_models=2,
    max_models=2,
)
def slerp(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    t: Fraction = 0.5,
) -> torch.Tensor:
    """Interpolate along the arc from model 0 (t=0) to model 1 (t=1), per flattened tensor.

    https://github.com/arcee-ai/mergekit (slerp). The coefficients reweight the step:
    t_eff = t*c1 / ((1-t)*c0 + t*c1), so uniform coef gives t and the result is unchanged by
    swapping the models together with t -> 1 - t. Falls back to linear interpolation when
    |cos| > 0.9995 or either norm is zero. Like mergekit, the angle comes from the
    normalized tensors and the weights apply to the unnormalized ones. `base` is ignored
    (mergekit uses its base model as model 0).
    """
    c0, c1 = (float(c) for c in coef)
    denominator = (1 - t) * c0 + t * c1
    t_eff = t * c1 / denominator if denominator != 0 else math.nan
    if not 0 <= t_eff <= 1:
        raise MergeError(
            f"slerp: coefficients {coef.tolist()} with t = {t} give an interpolation step of "
            f"{t_eff}, outside [0, 1]; give coefficients of one sign, not both zero"
        )
    v0, v1 = tensors[0], tensors[1]
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    norms = float(a.norm()) * float(b.norm())
    cos = float(a @ b) / norms if norms > 0 else 1.0
    if abs(cos) > _COLINEAR:
        return (1 - t_eff) * v0 + t_eff * v1
    angle = math.acos(max(-1.0, min(1.0, cos)))
    w0 = math.sin((1 - t_eff) * angle) / math.sin(angle)
    w1 = math.sin(t_eff * angle) / math.sin(angle)
    return w0 * v0 + w1 * v1

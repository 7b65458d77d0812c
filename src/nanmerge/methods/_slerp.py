"""The spherical family: slerp between two models, mergekit's multislerp and nuslerp, and
the Karcher mean on the sphere."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from nanmerge._params import Interval
from nanmerge._types import MergeError, TensorContext
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


# multislerp's eps, karcher's tol: a positive, finite number.
Positive = Annotated[float, Interval(gt=0, lt=math.inf)]
Iterations = Annotated[int, Interval(ge=0)]


def _normalized(coef: torch.Tensor, method: str) -> torch.Tensor:
    """coef / sum(coef): the per-model weights of a method that normalizes them."""
    total = float(coef.sum())
    if total == 0:
        raise MergeError(
            f"{method}: the coefficients {coef.tolist()} sum to 0, so they cannot be "
            "normalized; give coefficients with a nonzero sum"
        )
    return coef / total


@register(
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    needs_base=False,
    averages=lambda params: bool(params["normalize_weights"]),
)
def multislerp(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    context: TensorContext | None = None,
    normalize_weights: bool = True,
    eps: Positive = 1e-8,
) -> torch.Tensor:
    """mergekit's multislerp (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
    interpolation of M models on the sphere, relative to `base` when one is given.

    coef is mergekit's per-model `weight` (uniform = equal weights), divided by its sum when
    `normalize_weights` (mergekit's default: true; eps 1e-8). Each flattened (task) vector x_i
    is projected to u_i = x_i / (|x_i| + eps); the result points along m = sum_i w_i u_i and
    has length sum_i w_i |x_i|. mergekit 0.1.5 then projects the u_i on the tangent plane at
    m / |m| and maps their weighted sum back with the exponential map, but that weighted sum
    is zero by construction (it is m minus its own projection), so the map returns m / |m|:
    computed directly here. So multislerp of two models with weights (1 - t, t) is not
    slerp(t): it is the normalized linear interpolation of the directions (equal to slerp
    only at t = 0, 1/2 with equal norms, and 1). As in mergekit, one model is returned as
    is, and |m| < eps falls back to the weighted sum for two models and is an error for more.
    """
    import torch

    m = tensors.shape[0]
    if m == 1:
        return tensors[0]
    vectors = (tensors if base is None else tensors - base).reshape(m, -1)
    weights = _normalized(coef, "multislerp") if normalize_weights else coef
    norms = torch.linalg.vector_norm(vectors, dim=1)
    direction = torch.mv((vectors / (norms + eps).unsqueeze(1)).t(), weights)
    length = torch.linalg.vector_norm(direction)
    if length >= eps:
        merged = direction.mul_(float(weights @ norms) / length)
    elif m == 2:
        merged = torch.mv(vectors.t(), weights)
    else:
        where = f" in tensor '{context.name}'" if context is not None else ""
        raise MergeError(
            f"multislerp: the weighted mean of the {m} models' directions{where} "
            f"(shape {tuple(tensors.shape[1:])}) is zero (opposite models whose weights "
            "cancel), so it has no direction; change the coefficients or the models"
        )
    merged = merged.view(tensors.shape[1:])
    return merged if base is None else merged + base


# nuslerp treats two rows as colinear where 1 - cos^2 <= this (mergekit's eps squared),
# and clamps a row's norm to at least _NUSLERP_FLOOR before dividing by it.
_NUSLERP_COLINEAR = 1e-16
_NUSLERP_FLOOR = 1e-7


@register(
    reference="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
    needs_base=False,
    min_models=2,
    max_models=2,
    averages=lambda params: True,
)
def nuslerp(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """mergekit's nuslerp: slerp between two models (or their task vectors, when `base` is
    given) at t = w1 / (w0 + w1) from the per-model weights.

    coef is mergekit's per-model `weight`: uniform gives t = 1/2; t is not restricted to
    [0, 1] (mergekit extrapolates along the arc), and weights summing to |w0 + w1| < 1e-6
    are refused (mergekit then silently uses t = 1/2). mergekit's defaults: with
    `nuslerp_flatten` (true) the whole tensor is one vector; without it each vector along
    the last axis is interpolated on its own, or along the first axis with
    `nuslerp_row_wise`. Rows within 1 - cos^2 <= 1e-16 of colinear are interpolated
    linearly; norms are clamped to 1e-7, so a zero row counts as orthogonal (mergekit's
    behaviour, unlike slerp's linear fallback). Angles are computed in float64.
    """
    c0, c1 = (float(c) for c in coef)
    if abs(c0 + c1) < 1e-6:
        raise MergeError(
            f"nuslerp: the coefficients {coef.tolist()} sum to about 0, so they give no "
            "interpolation step t = w1 / (w0 + w1); give coefficients with a nonzero sum"
        )
    t = c1 / (c0 + c1)
    v0, v1 = (tensors if base is None else tensors - base).unbind(0)
    if nuslerp_flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif nuslerp_row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    w0, w1 = _arc_weights(t, v0, v1)
    merged = (w0 * v0).add_(w1 * v1)
    if nuslerp_row_wise and not nuslerp_flatten:
        merged = merged.transpose(0, -1)
    merged = merged.reshape(tensors.shape[1:])
    return merged if base is None else merged + base


def _arc_weights(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slerp weights (sin((1-t)θ) / sin θ, sin(tθ) / sin θ) of each pair of vectors
    along the last axis, shaped (..., 1) in float32; (1 - t, t) where they are colinear."""
    import torch

    def norm(v: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.float64)
        return norms.clamp(min=_NUSLERP_FLOOR)

    dot = torch.sum(v0 * v1, dim=-1, keepdim=True, dtype=torch.float64)
    cos = (dot / (norm(v0) * norm(v1))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _NUSLERP_COLINEAR
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    w0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    w1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return w0.float(), w1.float()


@register(
    reference="https://arxiv.org/abs/2603.04972",
    needs_base=False,
    averages=lambda params: True,
)
def karcher(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    max_iter: Iterations = 10,
    tol: Positive = 1e-5,
) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the models' directions on the unit sphere,
    rescaled by the weighted mean of their norms: mergekit's `karcher`
    (https://arxiv.org/abs/2603.04972; defaults max_iter 10, tol 1e-5).

    coef gives the weights a_i = coef_i / sum(coef) (mergekit uses 1/M, which uniform coef
    reproduces); they must be >= 0. Models of norm <= tol take no part in the direction. The
    start is the normalized weighted mean of the unit vectors (the first unit vector when
    that is shorter than tol); each step moves along the exponential map of
    sum_i a_i θ_i / sin(θ_i) (u_i - cos(θ_i) mean), skipping θ_i < tol, and stops when
    that step is shorter than tol or after max_iter steps. Two models of equal weight meet
    at once at the arc's midpoint: slerp(1/2) of their unit vectors. `base` is ignored:
    mergekit averages its base model as one more point, so list it among the models.
    """
    import torch

    m = tensors.shape[0]
    if m == 1:
        return tensors[0]
    if bool((coef < 0).any()):
        raise MergeError(
            f"karcher: coefficients {coef.tolist()} include negative weights, and a mean "
            "takes weights >= 0; give non-negative coefficients"
        )
    alphas = _normalized(coef, "karcher")
    flat = tensors.reshape(m, -1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0])
    units = flat[valid] / norms[valid].unsqueeze(1)
    weights = alphas[valid] / alphas[valid].sum()
    start = torch.mv(units.t(), weights)
    length = float(torch.linalg.vector_norm(start))
    mean = units[0].clone() if length < tol else start.div_(length)
    for _ in range(max_iter):
        cos = torch.mv(units, mean).clamp_(-1, 1)
        theta = torch.acos(cos)
        pull = torch.where(theta < tol, 0.0, weights * theta / torch.sin(theta))
        tangent = torch.mv(units.t(), pull).sub_(mean, alpha=float(pull @ cos))
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean.div_(length)
    return mean.mul_(float(alphas @ norms)).view(tensors.shape[1:])

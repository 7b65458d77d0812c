"""multislerp, nuslerp and karcher against their formulas written out here, closed forms on
the circle, and the invariants that hold (and one that does not: multislerp is not slerp)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanmerge._types import MergeError
from nanmerge.methods import karcher, multislerp, nuslerp, slerp

GEN = torch.Generator().manual_seed(0)
MODELS = torch.randn(4, 5, 6, generator=GEN)
BASE = torch.randn(5, 6, generator=GEN)


def _on_circle(angle: float, norm: float = 1.0) -> torch.Tensor:
    return torch.tensor([norm * math.cos(angle), norm * math.sin(angle)])


def _slerp_written_out(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ the angle between a and b (float64)."""
    a64, b64 = a.double(), b.double()
    theta = math.acos(float((a64 * b64).sum() / (a64.norm() * b64.norm())))
    out = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return out.float()


# ---------------------------------------------------------------- multislerp


def _multislerp_written_out(
    x: torch.Tensor, w: list[float], base: torch.Tensor | None = None, normalize: bool = True
) -> torch.Tensor:
    """Direction: the weighted sum of unit vectors x_i / (|x_i| + 1e-8), normalized;
    length: sum_i w_i |x_i|; relative to base when given."""
    if normalize:
        w = [wi / sum(w) for wi in w]
    vectors = [(xi if base is None else xi - base).reshape(-1).double() for xi in x]
    mean = sum(wi * v / (v.norm() + 1e-8) for wi, v in zip(w, vectors, strict=True))
    assert isinstance(mean, torch.Tensor)
    length = sum(wi * float(v.norm()) for wi, v in zip(w, vectors, strict=True))
    out = (mean / mean.norm() * length).float().reshape(x.shape[1:])
    return out if base is None else out + base


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_is_the_normalized_weighted_direction_at_the_weighted_mean_norm(
    m: int, with_base: bool
) -> None:
    w = [0.5, 1.0, 2.0, 3.0][:m]
    base = BASE if with_base else None
    out = multislerp(MODELS[:m], torch.tensor(w), base=base)
    torch.testing.assert_close(out, _multislerp_written_out(MODELS[:m], w, base))


def test_multislerp_without_normalizing_uses_the_weights_as_given() -> None:
    w = [0.5, 1.0, 2.0]
    out = multislerp(MODELS[:3], torch.tensor(w), base=BASE, normalize_weights=False)
    torch.testing.assert_close(out, _multislerp_written_out(MODELS[:3], w, BASE, normalize=False))
    # the weights' sum scales the result's distance from the base
    doubled = multislerp(MODELS[:3], 2 * torch.tensor(w), base=BASE, normalize_weights=False)
    torch.testing.assert_close(doubled - BASE, 2 * (out - BASE))


def test_multislerp_endpoint_weights_return_that_model() -> None:
    torch.testing.assert_close(multislerp(MODELS[:2], torch.tensor([1.0, 0.0])), MODELS[0])
    torch.testing.assert_close(multislerp(MODELS[:2], torch.tensor([0.0, 1.0])), MODELS[1])


def test_multislerp_at_equal_weights_and_norms_is_slerp_one_half() -> None:
    a, b = _on_circle(0.2, 3.0), _on_circle(1.9, 3.0)
    out = multislerp(torch.stack([a, b]), torch.ones(2))
    torch.testing.assert_close(out, _on_circle((0.2 + 1.9) / 2, 3.0))
    torch.testing.assert_close(out, slerp(torch.stack([a, b]), torch.ones(2), t=0.5))


def test_multislerp_with_weights_one_minus_t_and_t_is_not_slerp_t() -> None:
    """mergekit's tangent step vanishes, so the direction is the normalized lerp."""
    e1_e2 = torch.eye(2)
    out = multislerp(e1_e2, torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(out, torch.tensor([0.7, 0.3]) / math.hypot(0.7, 0.3))
    assert not torch.allclose(out, slerp(e1_e2, torch.ones(2), t=0.3), atol=1e-3)


def test_multislerp_of_one_model_returns_it_even_with_a_base() -> None:
    torch.testing.assert_close(multislerp(MODELS[:1], torch.ones(1), base=BASE), MODELS[0])


def test_multislerp_of_two_opposite_models_falls_back_to_the_weighted_sum() -> None:
    a = torch.tensor([1.0, -2.0, 0.5])
    base = torch.ones(3)
    # equal weights on opposite directions: their weighted sum is zero, so no direction
    out = multislerp(torch.stack([base + a, base - 3 * a]), torch.ones(2), base=base)
    torch.testing.assert_close(out, base - a)  # base + (tau - 3 tau) / 2


def test_multislerp_of_three_cancelling_directions_is_an_error() -> None:
    star = torch.stack([_on_circle(0.0), _on_circle(2 * math.pi / 3), _on_circle(4 * math.pi / 3)])
    with pytest.raises(MergeError, match="no direction"):
        multislerp(star, torch.ones(3))


@pytest.mark.parametrize(
    ("params", "coef", "match"),
    [
        ({"eps": 0.0}, [1.0, 1.0], "eps"),
        ({"eps": -1e-8}, [1.0, 1.0], "eps"),
        ({"normalize_weights": 1}, [1.0, 1.0], "normalize_weights"),
        ({"weights": [1.0, 2.0]}, [1.0, 1.0], "unknown parameter"),
        ({}, [1.0, -1.0], "sum to 0"),
    ],
)
def test_multislerp_bad_input_is_a_merge_error(
    params: dict[str, Any], coef: list[float], match: str
) -> None:
    with pytest.raises(MergeError, match=match):
        multislerp(MODELS[:2], torch.tensor(coef), **params)


# ---------------------------------------------------------------- nuslerp


@pytest.mark.parametrize("coef", [[1.0, 1.0], [1.0, 3.0], [0.4, 0.1]])
def test_nuslerp_flattened_is_slerp_at_the_weights_share(coef: list[float]) -> None:
    t = coef[1] / sum(coef)
    out = nuslerp(MODELS[:2], torch.tensor(coef))
    torch.testing.assert_close(out, _slerp_written_out(t, MODELS[0], MODELS[1]))
    # and the existing slerp at that t agrees
    torch.testing.assert_close(out, slerp(MODELS[:2], torch.ones(2), t=t))


def test_nuslerp_with_a_base_interpolates_the_task_vectors() -> None:
    out = nuslerp(MODELS[:2], torch.tensor([1.0, 2.0]), base=BASE)
    expected = BASE + _slerp_written_out(2 / 3, MODELS[0] - BASE, MODELS[1] - BASE)
    torch.testing.assert_close(out, expected)


def test_nuslerp_unflattened_interpolates_each_last_axis_vector_on_its_own() -> None:
    out = nuslerp(MODELS[:2], torch.tensor([1.0, 3.0]), nuslerp_flatten=False)
    rows = [_slerp_written_out(0.75, a, b) for a, b in zip(MODELS[0], MODELS[1], strict=True)]
    torch.testing.assert_close(out, torch.stack(rows))


def test_nuslerp_row_wise_interpolates_each_first_axis_vector_on_its_own() -> None:
    out = nuslerp(
        MODELS[:2], torch.tensor([1.0, 3.0]), nuslerp_flatten=False, nuslerp_row_wise=True
    )
    columns = [
        _slerp_written_out(0.75, a, b) for a, b in zip(MODELS[0].T, MODELS[1].T, strict=True)
    ]
    torch.testing.assert_close(out, torch.stack(columns, dim=1))


def test_nuslerp_colinear_vectors_are_lerped_and_a_zero_vector_counts_as_orthogonal() -> None:
    a = torch.tensor([1.0, 2.0, 2.0])
    torch.testing.assert_close(nuslerp(torch.stack([a, 3 * a]), torch.ones(2)), 2 * a)
    # mergekit clamps the zero norm, so cos = 0: sin(t pi/2) b, not the lerp b / 2
    out = nuslerp(torch.stack([torch.zeros(3), a]), torch.ones(2))
    torch.testing.assert_close(out, math.sin(math.pi / 4) * a)


def test_nuslerp_swapping_models_with_their_weights_changes_nothing() -> None:
    coef = torch.tensor([0.3, 1.7])
    torch.testing.assert_close(
        nuslerp(MODELS[:2], coef, nuslerp_flatten=False),
        nuslerp(MODELS[:2].flip(0), coef.flip(0), nuslerp_flatten=False),
    )


@pytest.mark.parametrize(
    ("m", "params", "coef", "match"),
    [
        (3, {}, [1.0, 1.0, 1.0], "exactly 2"),
        (2, {"nuslerp_flatten": "no"}, [1.0, 1.0], "nuslerp_flatten"),
        (2, {"t": 0.3}, [1.0, 1.0], "unknown parameter"),
        (2, {}, [1.0, -1.0], "sum to about 0"),
    ],
)
def test_nuslerp_bad_input_is_a_merge_error(
    m: int, params: dict[str, Any], coef: list[float], match: str
) -> None:
    with pytest.raises(MergeError, match=match):
        nuslerp(MODELS[:m], torch.tensor(coef), **params)


# ---------------------------------------------------------------- karcher


def test_karcher_of_identical_models_returns_them() -> None:
    unit = MODELS[0] / MODELS[0].norm()
    torch.testing.assert_close(karcher(torch.stack([unit] * 3), torch.ones(3)), unit)
    torch.testing.assert_close(karcher(MODELS[:1].expand(3, 5, 6), torch.ones(3)), MODELS[0])


def test_karcher_of_two_models_is_the_arc_midpoint_at_their_mean_norm() -> None:
    a, b = MODELS[0], MODELS[1]
    midpoint = _slerp_written_out(0.5, a / a.norm(), b / b.norm())
    expected = midpoint * (a.norm() + b.norm()) / 2
    torch.testing.assert_close(karcher(MODELS[:2], torch.ones(2)), expected)


@pytest.mark.parametrize("coef", [[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [0.2, 0.0, 0.5]])
def test_karcher_on_a_circle_is_the_weighted_mean_angle(coef: list[float]) -> None:
    """On an arc shorter than pi the Karcher mean's angle is the weighted mean angle."""
    angles, norms = [0.1, 0.9, 2.0], [1.0, 2.0, 4.0]
    x = torch.stack([_on_circle(a, n) for a, n in zip(angles, norms, strict=True)])
    w = [c / sum(coef) for c in coef]
    mean_angle = sum(wi * a for wi, a in zip(w, angles, strict=True))
    mean_norm = sum(wi * n for wi, n in zip(w, norms, strict=True))
    out = karcher(x, torch.tensor(coef), max_iter=100, tol=1e-7)
    torch.testing.assert_close(out, _on_circle(mean_angle, mean_norm), atol=1e-5, rtol=1e-5)


def test_karcher_stops_after_max_iter_steps() -> None:
    """With no step, the start: the normalized mean of the unit vectors at the mean norm."""
    x = torch.stack([_on_circle(0.0, 1.0), _on_circle(0.5, 2.0), _on_circle(2.5, 3.0)])
    start = sum(_on_circle(a) for a in (0.0, 0.5, 2.5))
    assert isinstance(start, torch.Tensor)
    torch.testing.assert_close(karcher(x, torch.ones(3), max_iter=0), start / start.norm() * 2.0)
    converged = karcher(x, torch.ones(3), max_iter=100, tol=1e-7)
    torch.testing.assert_close(converged, _on_circle(1.0, 2.0), atol=1e-5, rtol=1e-5)


def test_karcher_leaves_a_zero_model_out_of_the_direction_but_not_the_norm() -> None:
    x = torch.stack([_on_circle(0.3, 2.0), torch.zeros(2)])
    torch.testing.assert_close(karcher(x, torch.ones(2)), _on_circle(0.3, 1.0))
    torch.testing.assert_close(karcher(torch.zeros(2, 3), torch.ones(2)), torch.zeros(3))


def test_karcher_ignores_the_base() -> None:
    torch.testing.assert_close(
        karcher(MODELS[:3], torch.ones(3), base=BASE), karcher(MODELS[:3], torch.ones(3))
    )


@pytest.mark.parametrize(
    ("params", "coef", "match"),
    [
        ({"max_iter": -1}, [1.0, 1.0], "max_iter"),
        ({"max_iter": 2.5}, [1.0, 1.0], "max_iter"),
        ({"tol": 0.0}, [1.0, 1.0], "tol"),
        ({}, [1.0, -0.5], "negative"),
        ({}, [0.0, 0.0], "sum to 0"),
    ],
)
def test_karcher_bad_input_is_a_merge_error(
    params: dict[str, Any], coef: list[float], match: str
) -> None:
    with pytest.raises(MergeError, match=match):
        karcher(MODELS[:2], torch.tensor(coef), **params)


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(3)), st.integers(0, 2**16))
def test_karcher_and_multislerp_do_not_depend_on_the_models_order(
    order: list[int], seed: int
) -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
    coef = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(multislerp(x[order], coef[order]), multislerp(x, coef))
    # karcher stops once a step is shorter than tol (1e-5): the order's rounding can decide
    # whether one more step is taken, so the two agree to about tol
    torch.testing.assert_close(
        karcher(x[order], coef[order]), karcher(x, coef), atol=1e-4, rtol=1e-4
    )

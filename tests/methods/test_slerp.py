from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanmerge._types import MergeError
from nanmerge.methods import slerp

E1_E2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("t", [0.0, 1 / 3, 0.5, 0.8, 1.0])
def test_orthogonal_unit_vectors_follow_the_quarter_circle(t: float) -> None:
    out = slerp(E1_E2, torch.ones(2), t=t)
    expected = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
    torch.testing.assert_close(out, expected)


def test_120_degree_vectors_meet_at_60_degrees() -> None:
    tensors = torch.tensor([[2.0, 0.0], [-1.0, math.sqrt(3.0)]])  # both of norm 2
    out = slerp(tensors, torch.ones(2), t=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, math.sqrt(3.0)]))


def test_endpoints_return_the_inputs() -> None:
    tensors = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(slerp(tensors, torch.ones(2), t=0.0), tensors[0])
    torch.testing.assert_close(slerp(tensors, torch.ones(2), t=1.0), tensors[1])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_colinear_tensors_fall_back_to_lerp(sign: float) -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    out = slerp(torch.stack([a, sign * 2 * a]), torch.ones(2), t=0.25)
    torch.testing.assert_close(out, 0.75 * a + 0.25 * sign * 2 * a)


def test_zero_norm_falls_back_to_lerp() -> None:
    out = slerp(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), torch.ones(2), t=0.3)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.6]))


def test_coefficients_reweight_the_step() -> None:
    tensors = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    # t_eff = 0.5 * 3 / (0.5 * 1 + 0.5 * 3) = 0.75
    torch.testing.assert_close(
        slerp(tensors, torch.tensor([1.0, 3.0]), t=0.5), slerp(tensors, torch.ones(2), t=0.75)
    )
    torch.testing.assert_close(
        slerp(tensors, torch.tensor([2.0, 2.0]), t=0.3), slerp(tensors, torch.ones(2), t=0.3)
    )


def test_swapping_models_and_t_gives_the_same_point() -> None:
    tensors = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    coef = torch.tensor([0.7, 1.9])
    torch.testing.assert_close(
        slerp(tensors, coef, t=0.3), slerp(tensors.flip(0), coef.flip(0), t=0.7)
    )


@pytest.mark.parametrize("m", [1, 3])
def test_needs_exactly_two_models(m: int) -> None:
    with pytest.raises(MergeError, match="exactly 2"):
        slerp(torch.ones(m, 3), torch.ones(m))


def test_coefficients_that_cancel_are_rejected() -> None:
    with pytest.raises(MergeError, match="outside"):
        slerp(E1_E2, torch.tensor([1.0, -1.0]), t=0.5)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-100, 100, width=32), min_size=6, max_size=6),
    st.tuples(st.floats(0.1, 10), st.floats(0.1, 10)),
)
def test_swapping_slerp_models_at_t_one_half_leaves_output_unchanged(
    values: list[float], coef_values: tuple[float, float]
) -> None:
    tensors = torch.tensor(values).reshape(2, 3)
    coef = torch.tensor(coef_values)
    torch.testing.assert_close(
        slerp(tensors.flip(0), coef.flip(0), t=0.5),
        slerp(tensors, coef, t=0.5),
        atol=1e-4,
        rtol=1e-4,
    )

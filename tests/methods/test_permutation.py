"""Permuting the input models (tensors and coef together) changes no deterministic output."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanmerge.methods import breadcrumbs, slerp, task_arithmetic, ties, weight_average

Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Small integers keep every product and sum exact, so TIES' sign election cannot flip on
# rounding (an exact tie elects nothing, which is itself order independent).
METHODS: dict[str, Method] = {
    "weight_average": lambda x, c, b: weight_average(x, c),
    "task_arithmetic": lambda x, c, b: task_arithmetic(x, c, base=b),
    "ties_mean": lambda x, c, b: ties(x, c, base=b, density=0.5),
    "ties_sum": lambda x, c, b: ties(x, c, base=b, density=0.7, merge="sum"),
    "breadcrumbs": lambda x, c, b: breadcrumbs(x, c, base=b, density=0.6, gamma=0.2),
}


@st.composite
def models(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    m = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    ints = st.integers(-8, 8)
    tensors = torch.tensor(
        draw(st.lists(st.lists(ints, min_size=n, max_size=n), min_size=m, max_size=m))
    )
    coef = torch.tensor(draw(st.lists(st.integers(1, 4), min_size=m, max_size=m)))
    base = torch.tensor(draw(st.lists(ints, min_size=n, max_size=n)))
    order = draw(st.permutations(range(m)))
    return tensors.float(), coef.float(), base.float(), order


@settings(max_examples=200, deadline=None)
@given(models(), st.sampled_from(sorted(METHODS)))
def test_permuting_models_leaves_output_unchanged(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]], name: str
) -> None:
    tensors, coef, base, order = case
    method = METHODS[name]
    torch.testing.assert_close(
        method(tensors[order], coef[order], base), method(tensors, coef, base)
    )


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

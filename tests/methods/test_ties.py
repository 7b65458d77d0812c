from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import task_arithmetic, ties

BASE = torch.ones(4)
TAU = torch.tensor(
    [
        [3.0, -1.0, 2.0, 1.5],  # top 3 by magnitude: 3, 2, 1.5
        [-2.0, 4.0, -1.0, 2.5],  # top 3: 4, 2.5, -2
        [1.0, -5.0, -3.0, 0.5],  # top 3: -5, -3, 1
    ]
)
COEF = torch.tensor([1.0, 1.0, 2.0])
# trimmed * coef: [3, 0, 2, 1.5], [-2, 4, 0, 2.5], [2, -10, -6, 0]
# elected sign of the column sums [3, -6, -4, 4]: [+, -, -, +]
# kept: col0 models 0 and 2; col1 model 2; col2 model 2; col3 models 0 and 1


def test_ties_mean_matches_hand_computation() -> None:
    out = ties(BASE + TAU, COEF, base=BASE, density=0.75, scale=1.0, merge="mean")
    # (3 + 2) / (1 + 2), -10 / 2, -6 / 2, (1.5 + 2.5) / (1 + 1)
    torch.testing.assert_close(out, BASE + torch.tensor([5 / 3, -5.0, -3.0, 2.0]))


def test_ties_sum_matches_hand_computation() -> None:
    out = ties(BASE + TAU, COEF, base=BASE, density=0.75, scale=0.5, merge="sum")
    torch.testing.assert_close(out, BASE + 0.5 * torch.tensor([5.0, -10.0, -6.0, 4.0]))


def test_a_perfect_sign_conflict_keeps_nothing() -> None:
    base = torch.zeros(1)
    out = ties(torch.tensor([[1.0], [-1.0]]), torch.ones(2), base=base, density=1.0)
    assert out.tolist() == [0.0]


@pytest.mark.parametrize(
    ("density", "kept"),
    [(0.001, 1), (0.01, 10), (0.2, 200), (0.2345, 235), (0.5, 500), (1.0, 1000)],
)
def test_trimming_keeps_exactly_round_density_times_numel_largest(
    density: float, kept: int
) -> None:
    values = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).float() + 1
    signs = torch.where(torch.arange(1000) % 3 == 0, -1.0, 1.0)
    tau = (values * signs).reshape(1, 10, 100)
    base = torch.zeros(10, 100)
    out = ties(base + tau, torch.ones(1), base=base, density=density, scale=1.0)
    survivors = out != 0
    assert int(survivors.sum()) == kept
    assert float(out.abs()[survivors].min()) == 1000 - kept + 1  # the largest ones


def test_trimming_count_is_exact_when_magnitudes_tie() -> None:
    signs = torch.where(torch.arange(100) % 2 == 0, -1.0, 1.0)
    out = ties(signs.reshape(1, 100), torch.ones(1), base=torch.zeros(100), density=0.3)
    assert int((out != 0).sum()) == 30


def test_full_density_agreeing_signs_and_sum_equal_task_arithmetic() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen)
    tau = torch.rand(3, 6, 5, generator=gen) + 0.1
    tau[:, 2] *= -1  # one row negative in every model: signs still agree per entry
    coef = torch.tensor([0.5, 1.0, 2.0])
    expected = task_arithmetic(base + tau, coef, base=base, scale=0.7)
    out = ties(base + tau, coef, base=base, density=1.0, scale=0.7, merge="sum")
    torch.testing.assert_close(out, expected)


def test_a_model_with_zero_coefficient_contributes_nothing() -> None:
    base = torch.zeros(3)
    tensors = torch.tensor([[1.0, 2.0, 3.0], [9.0, -9.0, 9.0]])
    out = ties(tensors, torch.tensor([1.0, 0.0]), base=base, density=1.0)
    assert out.tolist() == [1.0, 2.0, 3.0]


def test_unknown_merge_is_rejected_on_call() -> None:
    with pytest.raises(MergeError, match="merge"):
        ties(torch.ones(2, 3), torch.ones(2), base=torch.zeros(3), merge="median")  # type: ignore[arg-type]

from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import weight_average


def test_weighted_average_matches_hand_computation() -> None:
    tensors = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    # w = (1, 3) / 4 = (0.25, 0.75): 0.25 * 1 + 0.75 * 3 = 2.5, 0.25 * 2 + 0.75 * 6 = 5.0
    out = weight_average(tensors, torch.tensor([1.0, 3.0]))
    assert out.tolist() == [2.5, 5.0]


def test_equal_coefficients_give_the_plain_mean() -> None:
    tensors = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    out = weight_average(tensors, torch.ones(4))
    torch.testing.assert_close(out, tensors.mean(dim=0))


def test_scaling_all_coefficients_changes_nothing() -> None:
    tensors = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    coef = torch.tensor([0.2, 1.5, 0.7])
    torch.testing.assert_close(weight_average(tensors, coef * 7.3), weight_average(tensors, coef))


def test_coefficients_summing_to_zero_are_rejected() -> None:
    with pytest.raises(MergeError, match="sum to 0"):
        weight_average(torch.ones(2, 3), torch.tensor([1.0, -1.0]))


def test_base_is_ignored_and_output_is_float32_of_the_tensor_shape() -> None:
    tensors = torch.ones(2, 2, 3, dtype=torch.float16)
    out = weight_average(tensors, torch.ones(2), base=torch.full((2, 3), 9.0))
    assert out.dtype == torch.float32
    assert out.shape == (2, 3)
    assert bool((out == 1).all())


def test_without_normalize_it_is_the_plain_weighted_sum() -> None:
    tensors = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    # 0.5 * (1, 2) + 2 * (3, 6) = (6.5, 13), not divided by 2.5 (mergekit's normalize: false)
    out = weight_average(tensors, torch.tensor([0.5, 2.0]), normalize=False)
    assert out.tolist() == [6.5, 13.0]
    # weights summing to 0 are fine when nothing is divided by their sum
    assert weight_average(tensors, torch.tensor([1.0, -1.0]), normalize=False).tolist() == [-2, -4]

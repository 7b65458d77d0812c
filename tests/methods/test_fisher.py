from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import fisher, get_method, weight_average


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_equal_fisher_equals_weight_average() -> None:
    tensors = torch.randn(3, 4, 5, generator=_gen(0))
    info = torch.rand(4, 5, generator=_gen(1)).expand(3, 4, 5)
    coef = torch.tensor([0.5, 1.0, 2.0])
    out = fisher(tensors, coef, fisher=info)
    torch.testing.assert_close(out, weight_average(tensors, coef))


def test_matches_hand_computation() -> None:
    tensors = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    info = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    # entry 0: (1*1 + 3*3) / (1 + 3) = 2.5; entry 1: (0*4 + 2*0) / 2 = 0
    out = fisher(tensors, torch.ones(2), fisher=info, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([2.5, 0.0]))


def test_coefficients_multiply_the_fisher_weights() -> None:
    tensors = torch.tensor([[1.0], [3.0]])
    info = torch.tensor([[1.0], [1.0]])
    # weights c_i F_i = (3, 1): (3 * 1 + 1 * 3) / 4 = 1.5
    out = fisher(tensors, torch.tensor([3.0, 1.0]), fisher=info, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([1.5]))


def test_zero_fisher_falls_back_to_the_coefficient_weighted_average() -> None:
    tensors = torch.randn(2, 6, generator=_gen(2))
    coef = torch.tensor([1.0, 3.0])
    out = fisher(tensors, coef, fisher=torch.zeros(2, 6))
    torch.testing.assert_close(out, weight_average(tensors, coef))


def test_fisher_is_an_input_not_a_hyperparameter() -> None:
    spec = get_method("fisher")
    assert spec.statistics == ("fisher",)
    assert spec.params == {"eps": 1e-8}


def test_shape_mismatch_and_negative_fisher_are_clear_errors() -> None:
    with pytest.raises(MergeError, match=r"shape \(2, 3\).*\(2, 4\)"):
        fisher(torch.ones(2, 4), torch.ones(2), fisher=torch.ones(2, 3))
    with pytest.raises(MergeError, match="negative"):
        fisher(torch.ones(2, 4), torch.ones(2), fisher=-torch.ones(2, 4))
    with pytest.raises(MergeError, match=">= 0"):
        fisher(torch.ones(2, 4), torch.tensor([1.0, -1.0]), fisher=torch.ones(2, 4))


def test_permuting_models_with_their_fisher_leaves_the_output_unchanged() -> None:
    tensors = torch.randn(3, 4, 2, generator=_gen(3))
    info = torch.rand(3, 4, 2, generator=_gen(4))
    coef = torch.tensor([0.5, 1.0, 2.0])
    perm = torch.tensor([2, 0, 1])
    out = fisher(tensors, coef, fisher=info)
    torch.testing.assert_close(fisher(tensors[perm], coef[perm], fisher=info[perm]), out)

from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import task_arithmetic


def test_task_arithmetic_matches_hand_computation() -> None:
    base = torch.tensor([1.0, 1.0, 1.0])
    tensors = torch.tensor([[2.0, 0.0, 1.0], [1.0, 3.0, -1.0]])
    # tau = [[1, -1, 0], [0, 2, -2]]; 1 * tau0 + 2 * tau1 = [1, 3, -4]; * 0.5 = [0.5, 1.5, -2]
    out = task_arithmetic(tensors, torch.tensor([1.0, 2.0]), base=base, scale=0.5)
    assert out.tolist() == [1.5, 2.5, -1.0]


def test_default_scale_is_the_papers_0_3() -> None:
    base = torch.zeros(2)
    tensors = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = task_arithmetic(tensors, torch.ones(2), base=base)
    torch.testing.assert_close(out, torch.tensor([1.2, 1.8]))


def test_missing_base_is_a_merge_error() -> None:
    with pytest.raises(MergeError, match="give a base"):
        task_arithmetic(torch.ones(2, 3), torch.ones(2))  # type: ignore[call-arg]


def test_base_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(MergeError, match=r"\(4,\).*\(3,\)"):
        task_arithmetic(torch.ones(2, 3), torch.ones(2), base=torch.zeros(4))


def test_coefficient_count_must_match_model_count() -> None:
    with pytest.raises(MergeError, match=r"shape \(2,\)"):
        task_arithmetic(torch.ones(2, 3), torch.ones(3), base=torch.zeros(3))


def test_non_finite_coefficients_are_rejected() -> None:
    with pytest.raises(MergeError, match="finite"):
        task_arithmetic(torch.ones(2, 3), torch.tensor([1.0, float("nan")]), base=torch.zeros(3))


def test_integer_tensors_are_rejected() -> None:
    with pytest.raises(MergeError, match="floating point"):
        task_arithmetic(torch.ones(2, 3, dtype=torch.int64), torch.ones(2), base=torch.zeros(3))

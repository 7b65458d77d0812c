from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import breadcrumbs, task_arithmetic


def test_breadcrumbs_matches_hand_computation() -> None:
    tau = torch.tensor([[5.0, -4.0, 3.0, -2.0, 1.0], [1.0, 2.0, -3.0, 4.0, -5.0]])
    # gamma 0.2 of 5 drops 1 outlier, density 0.4 of 5 keeps the next 2:
    # model 0 -> [0, -4, 3, 0, 0], model 1 -> [0, 0, -3, 4, 0]
    # 1 * model0 + 2 * model1 = [0, -4, -3, 8, 0]; * 0.5
    base = torch.full((5,), 10.0)
    out = breadcrumbs(
        base + tau, torch.tensor([1.0, 2.0]), base=base, density=0.4, gamma=0.2, scale=0.5
    )
    assert out.tolist() == [10.0, 8.0, 8.5, 14.0, 10.0]


@pytest.mark.parametrize(
    ("density", "gamma", "top", "kept"),
    [(0.9, 0.01, 10, 900), (0.5, 0.1, 100, 500), (0.1, 0.0, 0, 100), (0.25, 0.75, 750, 250)],
)
def test_band_drops_top_gamma_and_keeps_next_density_exactly(
    density: float, gamma: float, top: int, kept: int
) -> None:
    magnitudes = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).float() + 1
    tau = -magnitudes.reshape(1, 1000)
    base = torch.zeros(1000)
    out = breadcrumbs(tau, torch.ones(1), base=base, density=density, gamma=gamma, scale=1.0)
    survivors = out != 0
    assert int(survivors.sum()) == kept
    # ranks 1..1000 by magnitude: the survivors are exactly ranks top+1 .. top+kept from the top
    assert float(out.abs()[survivors].max()) == 1000 - top
    assert float(out.abs()[survivors].min()) == 1000 - top - kept + 1


def test_no_trimming_is_task_arithmetic() -> None:
    gen = torch.Generator().manual_seed(2)
    base, tensors = torch.randn(4, 3, generator=gen), torch.randn(3, 4, 3, generator=gen)
    coef = torch.tensor([1.0, 0.5, 2.0])
    torch.testing.assert_close(
        breadcrumbs(tensors, coef, base=base, density=1.0, gamma=0.0, scale=0.3),
        task_arithmetic(tensors, coef, base=base, scale=0.3),
    )


def test_gamma_plus_density_over_one_is_rejected_on_call() -> None:
    with pytest.raises(MergeError, match="gamma \\+ density"):
        breadcrumbs(torch.ones(2, 3), torch.ones(2), base=torch.zeros(3), density=0.9, gamma=0.2)

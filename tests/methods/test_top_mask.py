"""Trimming by selection keeps exactly k entries, the largest, with ties broken by index."""

from __future__ import annotations

import pytest
import torch

from nanmerge.methods._sparsify import band_mask, top_mask


def reference_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Independent truth: a stable descending sort keeps equal values in index order."""
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[order] = True
    return mask


def layouts(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    sparse = torch.zeros(n)
    sparse[: n // 4] = torch.rand(n // 4, generator=gen)
    return {
        "continuous": torch.randn(n, generator=gen).abs(),
        "few values": torch.randint(0, 4, (n,), generator=gen).float(),
        "mostly zeros": sparse,
        "ascending": torch.arange(n, dtype=torch.float32),
        "constant": torch.full((n,), 0.5),
    }


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
def test_top_mask_is_the_stable_sort_prefix(n: int) -> None:
    for layout, values in layouts(n).items():
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            mask = top_mask(values, k)
            assert mask.dtype == torch.bool and mask.shape == values.shape
            assert torch.equal(mask, reference_top(values, k)), (layout, k)


def test_top_mask_does_not_modify_its_input() -> None:
    values = torch.randn(5000).abs()
    copy = values.clone()
    top_mask(values, 1234)
    assert torch.equal(values, copy)


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.0), (0.3, 0.1), (0.9, 0.05)])
def test_band_mask_drops_exactly_the_top_and_keeps_exactly_the_next(
    density: float, gamma: float
) -> None:
    tau = torch.randint(-3, 4, (3, 40, 50), generator=torch.Generator().manual_seed(1)).float()
    band = band_mask(tau, density=density, gamma=gamma).reshape(3, -1)
    for row, kept in zip(tau.reshape(3, -1).abs(), band, strict=True):
        n_top, n_keep = round(gamma * 2000), round(density * 2000)
        expected = reference_top(row, n_top + n_keep) & ~reference_top(row, n_top)
        assert torch.equal(kept, expected)
        assert int(kept.sum()) == n_keep

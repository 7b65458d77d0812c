"""Trimming by selection keeps exactly k entries, the largest, with ties broken by index;
the cut, applied to slices on their own, gives the same entries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nanmerge.methods._bands import PIECE, task_vector_bands
from nanmerge.methods._sparsify import SAMPLE, Cut, _kth_largest, band_of, bracketed_cut, top_cut
from tests.methods.test_sparsify import band_mask


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
        # every entry a strided sample would see is 0: the sample misplaces the k-th largest
        "misleading sample": torch.rand(n, generator=gen).index_fill_(
            0, torch.arange(0, n, max(1, n // SAMPLE)), 0.0
        ),
    }


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003, 4 * SAMPLE + 5])  # the last: bracketed
def test_top_cut_is_the_stable_sort_prefix(n: int) -> None:
    for layout, values in layouts(n).items():
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            mask = top_cut(values, k).mask(values)
            assert mask.dtype == values.dtype and mask.shape == values.shape
            assert torch.equal(mask, reference_top(values, k).to(values.dtype)), (layout, k)


def test_top_cut_does_not_modify_its_input() -> None:
    values = torch.randn(5000).abs()
    copy = values.clone()
    top_cut(values, 1234)
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


@pytest.mark.parametrize("step", [1, 7, 64, 1000])
def test_cuts_applied_slice_by_slice_equal_the_whole_mask(step: int) -> None:
    for layout, values in layouts(1000).items():
        for density, gamma in [(0.5, 0.0), (0.3, 0.2), (0.999, 0.0)]:
            band = band_of(values, density=density, gamma=gamma)
            parts = [band.mask(values[i : i + step], offset=i) for i in range(0, 1000, step)]
            assert torch.equal(torch.cat(parts), band.mask(values)), (layout, density, gamma)


def test_the_bracket_is_used_when_the_sample_is_fair_and_refused_when_it_misleads() -> None:
    n = 4 * SAMPLE + 5
    shapes = layouts(n)

    def bracket(values: torch.Tensor, pieces: int = 1) -> Cut | None:
        array = values.numpy()
        bounds = [round(i * n / pieces) for i in range(pieces + 1)]
        parts = [(b, array[b:e]) for b, e in itertools.pairwise(bounds)]
        return bracketed_cut(parts, array[:: n // SAMPLE], n, n // 2)

    for layout in ("continuous", "few values", "mostly zeros"):
        fair = bracket(shapes[layout])
        assert fair is not None and fair == top_cut(shapes[layout], n // 2), layout
        assert bracket(shapes[layout], pieces=7) == fair  # pieces of any size, same cut
    assert bracket(shapes["misleading sample"]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.0), (0.2, 0.05), (0.9, 0.1)])
def test_streamed_bands_equal_the_bands_of_the_whole_task_vectors(
    dtype: torch.dtype, density: float, gamma: float
) -> None:
    n = 4 * SAMPLE + 3 * PIECE // 2  # several pieces, the last partial
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=gen).to(dtype)
    models = [base + 0.01 * torch.randn(n, generator=gen).to(dtype) for _ in range(2)]
    models.append(base.clone())  # tau = 0 everywhere: every magnitude ties
    misleading = base.clone()  # the strided sample sees tau = 0, the rest does not
    misleading += 0.01 * torch.rand(n, generator=gen).to(dtype)
    misleading[:: n // SAMPLE] = base[:: n // SAMPLE]
    models.append(misleading)
    streamed = task_vector_bands(models, base, density=density, gamma=gamma)["bands"]
    for model, band in zip(models, streamed, strict=True):
        magnitudes = (model.float() - base.float()).abs()
        assert band == band_of(magnitudes, density=density, gamma=gamma)


@pytest.mark.parametrize("k", [1, 5 * SAMPLE, 10 * SAMPLE - 1, 20 * SAMPLE])
def test_kth_largest_of_many_tied_values_is_the_sorted_entry(k: int) -> None:
    # 20 SAMPLE values, 70% of them one value (as bf16 task vectors' magnitudes are): brackets
    # narrow to that value, or to the few around it, before anything is sorted
    gen = torch.Generator().manual_seed(7)
    n = 20 * SAMPLE
    values = torch.randint(0, 50, (n,), generator=gen).float() * 1e-4
    values[torch.rand(n, generator=gen) < 0.7] = 7e-4
    for layout in (values, torch.sort(values).values, torch.rand(n, generator=gen)):
        array = layout.numpy()
        assert _kth_largest(array, k) == float(np.sort(array)[n - k])

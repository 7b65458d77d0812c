"""conventions="mergekit" against mergekit 0.1.5's rules written out here: its int() keep
counts, the kept set from the very torch.argsort / torch.sort it calls (its order among equal
magnitudes), a zero elected sum electing +, its divisors, and its L1 rescale."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import breadcrumbs, breadcrumbs_ties, dare_ties, ties

GEN = torch.Generator().manual_seed(3)
BASE = torch.randint(-5, 6, (40, 50), generator=GEN).float()
# small integers: many equal magnitudes at every cut, and elected sums of exactly zero
MODELS = BASE + torch.randint(-3, 4, (3, 40, 50), generator=GEN).float()
COEF = torch.tensor([1.0, 0.5, 2.0])


def mk_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's `magnitude`: the first max(1, int(density n)) of a descending argsort."""
    if density >= 1:
        return torch.ones_like(tau)
    w = tau.abs().reshape(-1)
    mask = torch.zeros(w.numel())
    mask[torch.argsort(w, descending=True)[: max(1, int(density * w.numel()))]] = 1
    return mask.reshape(tau.shape)


def mk_outliers(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's `magnitude_outliers`: skip the n - target - n_top smallest, keep target."""
    if density >= 1:
        return torch.ones_like(tau)
    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mask = torch.zeros(n)
    mask[torch.sort(tau.abs().reshape(-1), descending=False).indices[n_bot : n_bot + target]] = 1
    return mask.reshape(tau.shape)


def mk_l1(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor with RescaleNorm.l1."""
    masked = tau * mask
    before, after = tau.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mk_merge(
    deltas: torch.Tensor, weights: torch.Tensor, *, consensus: bool, normalize: bool, lam: float
) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge after sparsification."""
    w = weights.reshape(-1, 1, 1)
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(0) >= 0).float() * 2 - 1
        mask = (deltas.sign() == majority).float()
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return BASE + lam * mixed


def sparsified(masks: list[torch.Tensor], rescale: bool) -> torch.Tensor:
    taus = MODELS - BASE
    return torch.stack(
        [mk_l1(t, m) if rescale else t * m for t, m in zip(taus, masks, strict=True)]
    )


@pytest.mark.parametrize("density", [0.1, 0.29, 0.5, (0.2, 0.37, 0.9)])
@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("rescale", ["none", "l1"])
def test_ties_keeps_mergekits_entries_and_elects_as_it_does(
    density: Any, merge: str, rescale: str
) -> None:
    ds = density if isinstance(density, tuple) else (density,) * 3
    masks = [mk_magnitude(t, d) for t, d in zip(MODELS - BASE, ds, strict=True)]
    expected = mk_merge(
        sparsified(masks, rescale == "l1"), COEF, consensus=True, normalize=merge == "mean", lam=1
    )
    out = ties(
        MODELS,
        COEF,
        base=BASE,
        density=density,
        merge=merge,
        conventions="mergekit",
        rescale=rescale,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.2), (1.0, 0.01), (0.3, 0.0)])
@pytest.mark.parametrize("rescale", ["none", "l1"])
def test_breadcrumbs_keeps_what_magnitude_outliers_keeps(
    density: float, gamma: float, rescale: str
) -> None:
    masks = [mk_outliers(t, density, gamma) for t in MODELS - BASE]
    deltas = sparsified(masks, rescale == "l1")
    kw = dict(density=density, gamma=gamma, scale=0.7, conventions="mergekit", rescale=rescale)
    linear = mk_merge(deltas, COEF, consensus=False, normalize=False, lam=0.7)
    torch.testing.assert_close(breadcrumbs(MODELS, COEF, base=BASE, **kw), linear)
    elected = mk_merge(deltas, COEF, consensus=True, normalize=False, lam=0.7)
    torch.testing.assert_close(
        breadcrumbs_ties(MODELS, COEF, base=BASE, merge="sum", **kw), elected
    )


def test_mergekit_keeps_int_density_n_where_nanmerge_rounds_half_up() -> None:
    tau = torch.arange(1.0, 101.0).reshape(1, 100)  # distinct magnitudes
    base = torch.zeros(100)
    for conventions, kept in (("mergekit", 28), ("nanmerge", 29)):  # 0.29 * 100 = 28.999...
        out = ties(tau, torch.ones(1), base=base, density=0.29, conventions=conventions)
        assert int(torch.count_nonzero(out)) == kept


def test_a_zero_elected_sum_elects_plus_under_mergekit_and_nothing_under_nanmerge() -> None:
    models, base = torch.tensor([[2.0], [-2.0]]), torch.zeros(1)
    for fn in (ties, dare_ties):
        kw: dict[str, Any] = {"density": 1.0, "merge": "mean"}
        mk = fn(models, torch.ones(2), base=base, conventions="mergekit", **kw)
        ours = fn(models, torch.ones(2), base=base, **kw)
        assert mk.tolist() == [2.0] and ours.tolist() == [0.0]


def test_a_zero_mean_divisor_becomes_one_under_mergekit() -> None:
    # weights 1 and -1 on opposite task vectors: both agree (+1 each), divisor 1 - 1 = 0
    models, base, coef = torch.tensor([[1.0], [-1.0]]), torch.zeros(1), torch.tensor([1.0, -1.0])
    mk = ties(models, coef, base=base, density=1.0, conventions="mergekit")
    assert mk.tolist() == [2.0]
    assert ties(models, coef, base=base, density=1.0).tolist() == [0.0]


def test_dare_ties_under_mergekit_elects_as_get_mask_sum() -> None:
    # density 1 drops nothing: only the election and the divisor differ
    expected = mk_merge(MODELS - BASE, COEF, consensus=True, normalize=True, lam=1)
    out = dare_ties(MODELS, COEF, base=BASE, density=1.0, conventions="mergekit")
    torch.testing.assert_close(out, expected)


def test_mergekit_conventions_with_a_whole_model_trim_are_refused() -> None:
    with pytest.raises(MergeError, match="trim_scope: tensor, or conventions: nanmerge"):
        ties(MODELS, COEF, base=BASE, conventions="mergekit", trim_scope="model")


def test_breadcrumbs_counts_may_overlap_under_mergekit_only() -> None:
    with pytest.raises(MergeError, match="gamma \\+ density must be <= 1"):
        breadcrumbs(MODELS, COEF, base=BASE, density=1.0, gamma=0.01)
    breadcrumbs(MODELS, COEF, base=BASE, density=1.0, gamma=0.01, conventions="mergekit")

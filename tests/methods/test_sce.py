"""SCE against its steps written out here (FuseChat / mergekit 0.1.5): selection by variance
across models, weights from mean squares, erase by the elected sign, weighted mean; where the
coefficient enters; and mergekit's conventions (int() count, torch.topk, >= 0, 1e-6 floors)."""

from __future__ import annotations

import math

import pytest
import torch

from nanmerge.methods import sce

GEN = torch.Generator().manual_seed(4)
BASE = torch.randn(6, 10, generator=GEN)
MODELS = BASE + torch.randn(3, 6, 10, generator=GEN)


def written_out(
    models: torch.Tensor, base: torch.Tensor, coef: list[float], topk: float
) -> torch.Tensor:
    """Entry by entry: the top round(topk * #nonzero-variance) entries by variance kept
    (ties by index); w_i = c_i m_i / sum m_j; model i kept where sign(c_i tau_i) equals
    sign(sum_j c_j tau_j) != 0; sum w_i tau_i / sum w_i over the kept (0 if none)."""
    taus = (models - base).reshape(len(models), -1).tolist()
    n, m = len(taus[0]), len(taus)
    if topk < 1:
        var = [sum((t[e] - sum(u[e] for u in taus) / m) ** 2 for t in taus) / m for e in range(n)]
        nonzero = sum(v != 0 for v in var)
        k = math.floor(topk * nonzero + 0.5)
        chosen = set(sorted(range(n), key=lambda e: (-var[e], e))[:k])
        taus = [[t[e] if e in chosen else 0.0 for e in range(n)] for t in taus]
    squares = [sum(x * x for x in t) / n for t in taus]
    weights = [c * s / sum(squares) for c, s in zip(coef, squares, strict=True)]
    out = []
    for e in range(n):
        total = sum(c * t[e] for c, t in zip(coef, taus, strict=True))
        sign = (total > 0) - (total < 0)
        kept = [i for i in range(m) if sign != 0 and (coef[i] * taus[i][e]) * sign > 0]
        divisor = sum(weights[i] for i in kept)
        out.append(sum(weights[i] * taus[i][e] for i in kept) / divisor if kept else 0.0)
    return base + torch.tensor(out).reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.15])
@pytest.mark.parametrize("coef", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0]])
def test_sce_is_its_formula_with_the_coefficient_in_the_weights_and_the_election(
    topk: float, coef: list[float]
) -> None:
    out = sce(MODELS, torch.tensor(coef), base=BASE, select_topk=topk)
    torch.testing.assert_close(out, written_out(MODELS, BASE, coef, topk))


def test_select_topk_keeps_that_fraction_of_the_entries() -> None:
    out = sce(MODELS, torch.ones(3), base=BASE, select_topk=0.25)
    assert int(torch.count_nonzero(out - BASE)) <= 15  # round(0.25 * 60)


def test_a_coefficient_changes_the_weights_but_uniform_ones_give_the_published_merge() -> None:
    uniform = sce(MODELS, torch.ones(3), base=BASE)
    assert torch.equal(uniform, sce(MODELS, torch.full((3,), 2.0), base=BASE))  # weights' ratio
    assert not torch.allclose(uniform, sce(MODELS, torch.tensor([1.0, 1.0, 5.0]), base=BASE))


def mergekit_sce(models: torch.Tensor, base: torch.Tensor, topk: float) -> torch.Tensor:
    """mergekit 0.1.5's sce_merge, written out."""
    tvs = models - base
    if topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        mask = torch.zeros_like(var)
        if k > 0:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask
    majority = (tvs.sum(0) >= 0).float() * 2 - 1
    erase = (tvs.sign() == majority).float()
    w = tvs.square().reshape(len(tvs), -1).mean(1)
    w = torch.ones_like(w) / len(w) if abs(float(w.sum())) < 1e-6 else w / float(w.sum())
    erased = w.reshape(-1, 1, 1) * erase
    return base + (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.37])
def test_mergekit_conventions_reproduce_mergekits_sce(topk: float) -> None:
    base = torch.randint(-3, 4, (6, 10), generator=GEN).float()
    models = base + torch.randint(-2, 3, (3, 6, 10), generator=GEN).float()  # zero sums, ties
    out = sce(models, torch.ones(3), base=base, select_topk=topk, conventions="mergekit")
    torch.testing.assert_close(out, mergekit_sce(models, base, topk))
    # tiny task vectors: mergekit's 1e-6 floor makes the weights uniform there
    small = base + 1e-4 * (models - base)
    out = sce(small, torch.ones(3), base=base, select_topk=topk, conventions="mergekit")
    torch.testing.assert_close(out, mergekit_sce(small, base, topk))

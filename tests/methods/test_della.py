"""DELLA's MagPrune against its formula written out here: keep probabilities from magnitude
ranks per row in [density - epsilon, density + epsilon], the empirical keep rate per rank
band, 1/p rescaling (unbiased: E[della_linear] is task arithmetic), the coefficient slot,
mergekit's ranks, and keep probabilities outside (0, 1] refused before any work."""

from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import METHODS, check_params, della, della_linear, tensor_generator
from nanmerge.methods._della import rank_probabilities

GEN = torch.Generator().manual_seed(2)
BASE = torch.randn(8, 16, generator=GEN)
MODELS = BASE + torch.randn(3, 8, 16, generator=GEN)
COEF = torch.tensor([1.0, 0.5, 2.0])


def probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row: the entry of ascending magnitude rank r of c gets density - epsilon +
    2 epsilon r / (c - 1); equal magnitudes ranked by index."""
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() > 1 else tau.reshape(1, -1)
    out = torch.empty_like(rows)
    c = rows.shape[1]
    for i, row in enumerate(rows):
        order = sorted(range(c), key=lambda j: (abs(float(row[j])), j))
        for rank, j in enumerate(order):
            out[i, j] = density - epsilon + 2 * epsilon * rank / (c - 1)
    return out.reshape(tau.shape)


def test_probabilities_grow_with_the_magnitude_rank_in_each_row() -> None:
    tau = torch.tensor([[0.3, -2.0, 0.1, 0.3], [5.0, 1.0, -3.0, 0.0]])
    got = rank_probabilities(tau, density=0.5, epsilon=0.3, conventions="nanmerge")
    torch.testing.assert_close(got, probabilities(tau, 0.5, 0.3))
    assert got[0].tolist() == pytest.approx([0.4, 0.8, 0.2, 0.6])  # tie: index order


def test_mergekit_ranks_are_della_magprunes() -> None:
    tau = torch.randint(-3, 4, (6, 9), generator=GEN).float()
    # mergekit's della_magprune, written out
    ranks = torch.argsort(tau.abs(), dim=1, descending=False).argsort(dim=1).float() + 1
    low, high = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    expected = (0.5 - 0.2) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * 0.2
    got = rank_probabilities(tau, density=0.5, epsilon=0.2, conventions="mergekit")
    torch.testing.assert_close(got, expected)


def test_each_kept_entry_is_divided_by_its_keep_probability() -> None:
    base = torch.zeros(4, 500)
    tau = torch.randn(1, 4, 500, generator=GEN)
    out = della_linear(
        base + tau,
        torch.ones(1),
        base=base,
        density=0.5,
        epsilon=0.4,
        generator=tensor_generator(1, "w"),
    )
    p = probabilities(tau[0], 0.5, 0.4)
    p_drawn = (p * 65536).round() / 65536  # drawn at 16-bit resolution
    kept = out != 0
    # within one 16-bit step of p (float32 rounding of p can land on either side of a step)
    torch.testing.assert_close(out[kept], (tau[0] / p_drawn)[kept], rtol=2e-4, atol=0)
    assert 0.4 < float(kept.float().mean()) < 0.6


def test_the_keep_rate_of_each_rank_band_is_its_probability() -> None:
    n = 20000
    tau = torch.randperm(n, generator=GEN).float().add_(1).reshape(1, n)  # distinct magnitudes
    base = torch.zeros(n)
    counts = torch.zeros(n)
    for seed in range(5):
        out = della_linear(
            base + tau,
            torch.ones(1),
            base=base,
            density=0.5,
            epsilon=0.3,
            rescale="none",
            generator=tensor_generator(seed, "w"),
        )
        counts += (out != 0).float()
    rank = tau[0].argsort().argsort()  # ascending magnitude rank
    for band in range(10):
        inside = (rank >= band * n // 10) & (rank < (band + 1) * n // 10)
        expected = 0.2 + 0.6 * (band + 0.5) / 10  # the band's mean probability
        assert abs(float(counts[inside].mean()) / 5 - expected) < 0.02


def test_della_linear_is_task_arithmetic_in_expectation() -> None:
    expected = BASE + 0.7 * (COEF.reshape(-1, 1, 1) * (MODELS - BASE)).sum(0)
    outs = [
        della_linear(
            MODELS,
            COEF,
            base=BASE,
            density=0.5,
            epsilon=0.2,
            scale=0.7,
            generator=tensor_generator(s, "w"),
        )
        for s in range(1500)
    ]
    mean = torch.stack(outs).mean(0)
    torch.testing.assert_close(mean, expected, atol=0.15, rtol=0)
    assert float((mean - expected).abs().mean()) < 0.03


def test_the_coefficient_weighs_each_pruned_task_vector() -> None:
    def run(coef: torch.Tensor) -> torch.Tensor:
        return (
            della_linear(
                MODELS,
                coef,
                base=BASE,
                density=0.4,
                epsilon=0.1,
                generator=tensor_generator(3, "w"),
            )
            - BASE
        )

    parts = [run(torch.eye(3)[i]) for i in range(3)]
    torch.testing.assert_close(run(COEF), sum(c * p for c, p in zip(COEF, parts, strict=True)))


def test_della_elects_signs_over_the_pruned_task_vectors() -> None:
    # one model: the election keeps every surviving entry, so della is della_linear
    model = MODELS[:1]
    kw = {"density": 0.5, "epsilon": 0.2, "scale": 1.0}
    a = della(
        model, torch.ones(1), base=BASE, merge="sum", generator=tensor_generator(4, "w"), **kw
    )
    b = della_linear(model, torch.ones(1), base=BASE, generator=tensor_generator(4, "w"), **kw)
    torch.testing.assert_close(a, b)
    # two opposite models of equal weight: every elected sum is 0, nothing is kept
    zero = torch.zeros(8, 16)
    pair = torch.stack([zero + 1, zero - 1])
    assert torch.equal(della(pair, torch.ones(2), base=zero, density=1.0, epsilon=0.0), zero)


def test_the_same_generator_gives_the_same_merge() -> None:
    def run(name: str) -> torch.Tensor:
        return della(MODELS, COEF, base=BASE, generator=tensor_generator(9, name))

    assert torch.equal(run("a"), run("a")) and not torch.equal(run("a"), run("b"))


def test_a_model_at_density_one_keeps_every_entry_and_reads_no_epsilon() -> None:
    out = della_linear(MODELS, COEF, base=BASE, density=(1.0, 1.0, 1.0), epsilon=0.15, scale=1.0)
    torch.testing.assert_close(out, BASE + (COEF.reshape(-1, 1, 1) * (MODELS - BASE)).sum(0))


def test_an_epsilon_pushing_a_probability_outside_0_1_names_the_model_and_values() -> None:
    spec = METHODS["della"]
    problems = check_params(spec, {"density": (0.5, 0.2, 0.9), "epsilon": (0.1, 0.25, 0.1)})
    assert len(problems) == 1
    assert "model 2" in problems[0] and "-0.05" in problems[0] and "0.45" in problems[0]
    assert check_params(spec, {"density": 0.9, "epsilon": 0.1}) == []  # p = 1 allowed
    with pytest.raises(MergeError, match=r"model 3's values.*1\.1"):
        della_linear(MODELS, COEF, base=BASE, density=(0.5, 0.5, 0.9), epsilon=(0, 0, 0.2))

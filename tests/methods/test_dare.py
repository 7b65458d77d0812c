from __future__ import annotations

import torch

from nanmerge.methods import dare_linear, dare_ties, task_arithmetic, tensor_generator

GEN = torch.Generator().manual_seed(5)
BASE = torch.randn(8, 16, generator=GEN)
TENSORS = BASE + torch.randn(3, 8, 16, generator=GEN)
COEF = torch.tensor([1.0, 0.5, 2.0])


def test_full_density_is_task_arithmetic() -> None:
    expected = task_arithmetic(TENSORS, COEF, base=BASE, scale=0.3)
    out = dare_linear(TENSORS, COEF, base=BASE, density=1.0, generator=tensor_generator(0, "w"))
    torch.testing.assert_close(out, expected)


def test_full_density_agreeing_signs_summed_is_task_arithmetic() -> None:
    tau = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    base = torch.zeros(5)
    out = dare_ties(base + tau, torch.ones(2), base=base, density=1.0, scale=1.0, merge="sum")
    torch.testing.assert_close(out, tau.sum(dim=0))


def test_each_entry_is_dropped_or_rescaled_by_one_over_density() -> None:
    base = torch.zeros(2000)
    tau = torch.full((1, 2000), 3.0)
    for method in (dare_linear, dare_ties):
        out = method(
            base + tau,
            torch.ones(1),
            base=base,
            density=0.25,
            scale=1.0,
            generator=tensor_generator(7, "layer.weight"),
        )
        values = set(out.unique().tolist())
        assert values <= {0.0, 12.0}  # 3 / 0.25
        assert 0.2 < float((out != 0).float().mean()) < 0.3


def test_same_seed_and_name_is_bitwise_reproducible() -> None:
    def run(name: str) -> torch.Tensor:
        return dare_ties(TENSORS, COEF, base=BASE, generator=tensor_generator(11, name))

    assert torch.equal(run("a.weight"), run("a.weight"))
    assert not torch.equal(run("a.weight"), run("b.weight"))


def test_dare_linear_is_unbiased_over_seeds() -> None:
    expected = task_arithmetic(TENSORS, COEF, base=BASE, scale=0.3)
    outs = [
        dare_linear(TENSORS, COEF, base=BASE, density=0.5, generator=tensor_generator(s, "w"))
        for s in range(2000)
    ]
    mean = torch.stack(outs).mean(dim=0)
    # per entry the std of the mean is about |0.3 * coef * tau| / sqrt(2000): a few percent
    torch.testing.assert_close(mean, expected, atol=0.1, rtol=0.0)
    assert float((mean - expected).abs().mean()) < 0.02


def test_default_generator_is_the_global_one() -> None:
    torch.manual_seed(123)
    first = dare_linear(TENSORS, COEF, base=BASE)
    torch.manual_seed(123)
    assert torch.equal(dare_linear(TENSORS, COEF, base=BASE), first)

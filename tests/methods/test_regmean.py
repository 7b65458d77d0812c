from __future__ import annotations

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import get_method, regmean, task_arithmetic, weight_average


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_alpha_one_reproduces_the_joint_least_squares_solution() -> None:
    # Task i: Y_i = X_i A_i + noise with its own least-squares solution W_i (out x in, as
    # nn.Linear stores it). The joint solution over all tasks' data is the RegMean merge.
    d_in, d_out, gen = 6, 3, _gen(0)
    xs = [torch.randn(n, d_in, generator=gen, dtype=torch.float64) for n in (20, 50, 200)]
    ys = [x @ torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) for x in xs]
    ys = [y + 0.3 * torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in ys]
    weights = torch.stack(
        [torch.linalg.lstsq(x, y).solution.T for x, y in zip(xs, ys, strict=True)]
    )
    grams = torch.stack([x.T @ x for x in xs])
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    out = regmean(weights.float(), torch.ones(3), gram=grams.float(), alpha=1.0)
    torch.testing.assert_close(out.double(), joint, atol=1e-5, rtol=1e-5)


def test_equal_grams_equal_weight_average() -> None:
    tensors = torch.randn(3, 4, 5, generator=_gen(1))
    x = torch.randn(30, 5, generator=_gen(2))
    coef = torch.tensor([0.2, 1.0, 1.8])
    out = regmean(tensors, coef, gram=(x.T @ x).expand(3, 5, 5), alpha=0.7)
    torch.testing.assert_close(out, weight_average(tensors, coef), atol=1e-5, rtol=1e-5)


def test_alpha_zero_weights_each_input_column_by_its_variance() -> None:
    tensors = torch.tensor([[[1.0, 1.0]], [[3.0, 3.0]]])
    grams = torch.tensor([[[1.0, 5.0], [5.0, 3.0]], [[3.0, 5.0], [5.0, 1.0]]])
    # diagonal only: column 0 weights (1, 3) -> 2.5; column 1 weights (3, 1) -> 1.5
    out = regmean(tensors, torch.ones(2), gram=grams, alpha=0.0)
    torch.testing.assert_close(out, torch.tensor([[2.5, 1.5]]))


def test_a_bias_is_averaged_by_its_input_count() -> None:
    biases = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    counts = torch.tensor([[[10.0]], [[30.0]]])
    # (10 * 1 + 30 * 4) / 40 = 3.25; (10 * 2 + 30 * 8) / 40 = 6.5; coef 2 on model 0 -> 2.8
    out = regmean(biases, torch.ones(2), gram=counts)
    torch.testing.assert_close(out, torch.tensor([3.25, 6.5]))
    out = regmean(biases, torch.tensor([2.0, 1.0]), gram=counts, alpha=0.5)
    torch.testing.assert_close(out, torch.tensor([2.8, 5.6]))


def test_tensors_without_a_gram_use_the_fallback_method() -> None:
    base = torch.randn(4, generator=_gen(3))
    tensors = base + torch.randn(2, 4, generator=_gen(4))
    coef = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(regmean(tensors, coef), weight_average(tensors, coef))
    out = regmean(tensors, coef, base=base, fallback="task_arithmetic")
    torch.testing.assert_close(out, task_arithmetic(tensors, coef, base=base))


def test_singular_gram_gives_the_average_on_dead_inputs() -> None:
    tensors = torch.randn(2, 3, 4, generator=_gen(5))
    x = torch.randn(10, 4, generator=_gen(6))
    x[:, 3] = 0.0  # input 3 never fires: its column is not determined by the data
    grams = (x.T @ x).expand(2, 4, 4)
    out = regmean(tensors, torch.ones(2), gram=grams, alpha=1.0)
    torch.testing.assert_close(out, tensors.mean(0), atol=1e-4, rtol=1e-4)


def test_gram_is_an_input_and_fallback_is_checked() -> None:
    spec = get_method("regmean")
    assert spec.statistics == ("gram",)
    assert spec.params == {"alpha": 0.9, "fallback": "weight_average"}
    with pytest.raises(MergeError, match="fallback"):
        regmean(torch.ones(2, 3), torch.ones(2), fallback="regmean")
    with pytest.raises(MergeError, match="alpha"):
        regmean(torch.ones(2, 3), torch.ones(2), alpha=1.5)


def test_shapes_that_do_not_fit_are_a_clear_error() -> None:
    with pytest.raises(MergeError, match=r"\(M, in, in\).*\(2, 3, 4\).*\(2, 3, 3\)"):
        regmean(torch.ones(2, 3, 4), torch.ones(2), gram=torch.ones(2, 3, 3))
    with pytest.raises(MergeError, match="2-D weights"):
        regmean(torch.ones(2, 4), torch.ones(2), gram=torch.ones(2, 4, 4))


def test_permuting_models_with_their_grams_leaves_the_output_unchanged() -> None:
    tensors = torch.randn(3, 2, 4, generator=_gen(7))
    xs = torch.randn(3, 9, 4, generator=_gen(8))
    grams = xs.transpose(1, 2) @ xs
    coef = torch.tensor([0.5, 1.0, 2.0])
    perm = torch.tensor([2, 0, 1])
    out = regmean(tensors, coef, gram=grams)
    torch.testing.assert_close(regmean(tensors[perm], coef[perm], gram=grams[perm]), out)

"""WIDEN against the authors' rule, written out again here, and by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nanmerge
from nanmerge._types import MergeError, TensorContext
from nanmerge.methods import widen

EMBEDDING = TensorContext("model.embed_tokens.weight", None, None, "embedding")


def _rank_rows(values: torch.Tensor) -> torch.Tensor:
    """Each entry's position in its row sorted ascending (ties by index), over the row length."""
    out = torch.zeros_like(values, dtype=torch.float64)
    for i, row in enumerate(values.tolist()):
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        for position, j in enumerate(order):
            out[i, j] = position / len(row)
    return out


def _importance(significance: torch.Tensor, t: float, s: float) -> torch.Tensor:
    exp = torch.exp(significance - significance.max(dim=0).values)
    scores = exp / exp.sum(dim=0)
    above = significance > t * significance.mean(dim=1, keepdim=True)
    return torch.where(above, torch.full_like(scores, s), scores)


def widen_reference(
    tensors: torch.Tensor, base: torch.Tensor, t: float, s: float, *, embedding: bool = False
) -> torch.Tensor:
    """The authors' widen_merging for one (out, in) matrix or one vector, in float64."""
    tensors, base = tensors.double(), base.double()
    tau = tensors - base
    if base.dim() == 1:
        return (base + (tau * _importance(tau.abs(), t, s)).sum(0)).float()
    if embedding:
        tensors, base, tau = tensors.mT, base.T, tau.mT
    base_direction = base / base.norm(dim=0)
    magnitude_diff, direction_diff = [], []
    for model in tensors:
        direction = model / model.norm(dim=0)
        magnitude_diff.append((model.norm(dim=0) - base.norm(dim=0)).abs())
        cosine = (direction * base_direction).sum(0) / (
            direction.norm(dim=0) * base_direction.norm(dim=0)
        )
        direction_diff.append(1 - cosine)
    weights = 0.5 * (
        _importance(_rank_rows(torch.stack(magnitude_diff)), t, s)
        + _importance(_rank_rows(torch.stack(direction_diff)), t, s)
    )
    merged = base + (tau * weights.unsqueeze(1)).sum(0)
    return (merged.T if embedding else merged).float()


def _random(m: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    spread = torch.rand((m, *shape[1:]), generator=gen).unsqueeze(1) if len(shape) > 1 else 1
    return base + 0.5 * spread * torch.randn((m, *shape), generator=gen), base


def test_widen_on_a_vector_by_hand() -> None:
    """tau_1 = (2, 1), tau_2 = (1, 3): model 1's mean |tau| is 1.5, so only its entry 0 is
    above average (score 1); model 2's mean is 2, so only its entry 1 is (score 1); the
    others keep their softmax over the models: e / (e + 1)'s partner 1 / (e + 1) for model 2
    at entry 0, and 1 / (1 + e^2) for model 1 at entry 1."""
    base = torch.tensor([1.0, -1.0])
    tau = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    merged = widen(base + tau, torch.ones(2), base=base)
    e = math.e
    expected = [2 * 1 + 1 * (1 / (e + 1)), 1 * (1 / (1 + e**2)) + 3 * 1]
    torch.testing.assert_close(merged, base + torch.tensor(expected))


@pytest.mark.parametrize(("t", "s"), [(1.0, 1.0), (0.5, 0.8), (1.7, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("shape", [(7, 5), (9,), (4, 12)])
def test_widen_matches_the_authors_formula(t: float, s: float, shape: tuple[int, ...]) -> None:
    tensors, base = _random(3, shape, seed=1)
    merged = widen(tensors, torch.ones(3), base=base, threshold=t, calibration=s)
    torch.testing.assert_close(merged, widen_reference(tensors, base, t, s))


def test_widen_weighs_an_embedding_per_token_row() -> None:
    tensors, base = _random(2, (6, 4), seed=2)
    merged = widen(tensors, torch.ones(2), base=base, context=EMBEDDING)
    torch.testing.assert_close(merged, widen_reference(tensors, base, 1.0, 1.0, embedding=True))
    # the same as merging the transposed matrices column by column
    columns = widen(tensors.mT.contiguous(), torch.ones(2), base=base.T.contiguous())
    torch.testing.assert_close(merged, columns.T)
    assert not torch.allclose(merged, widen(tensors, torch.ones(2), base=base))


def test_widen_coefficients_scale_each_task_vector_after_the_weights() -> None:
    tensors, base = _random(2, (5, 3), seed=3)
    coef = torch.tensor([2.0, 0.5])
    # the weights depend on the models only: each model's term is linear in its coefficient
    first = widen(tensors, torch.tensor([1.0, 0.0]), base=base) - base
    second = widen(tensors, torch.tensor([0.0, 1.0]), base=base) - base
    torch.testing.assert_close(widen(tensors, torch.ones(2), base=base) - base, first + second)
    torch.testing.assert_close(widen(tensors, coef, base=base) - base, 2 * first + 0.5 * second)
    assert not torch.allclose(first, second)


def test_one_model_with_unit_calibration_is_returned_unchanged() -> None:
    tensors, base = _random(1, (6, 5), seed=4)
    torch.testing.assert_close(widen(tensors, torch.ones(1), base=base), tensors[0])


def test_widen_merges_a_higher_dimensional_tensor_as_a_matrix() -> None:
    tensors, base = _random(2, (3, 2, 2, 2), seed=5)
    merged = widen(tensors, torch.ones(2), base=base)
    flat = widen_reference(tensors.reshape(2, 3, 8), base.reshape(3, 8), 1.0, 1.0)
    torch.testing.assert_close(merged, flat.reshape(3, 2, 2, 2))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.permutations(range(3)))
def test_widen_is_blind_to_the_models_order(seed: int, order: list[int]) -> None:
    tensors, base = _random(3, (6, 4), seed)
    coef = torch.tensor([1.0, 0.5, 2.0])
    torch.testing.assert_close(
        widen(tensors[order], coef[order], base=base), widen(tensors, coef, base=base)
    )


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"threshold": -0.5}, "threshold"),
        ({"calibration": math.inf}, "calibration"),
        ({"calibration": -1.0}, "calibration"),
    ],
)
def test_widen_rejects_parameters_out_of_range_before_reading_tensors(
    params: dict[str, float], named: str
) -> None:
    with pytest.raises(MergeError, match=named):
        widen(torch.zeros(2, 3), torch.ones(2), base=torch.zeros(5), **params)


def test_widen_needs_a_base() -> None:
    with pytest.raises(MergeError, match="base"):
        widen(torch.zeros(2, 3), torch.ones(2))


def test_widen_through_the_engine_weighs_the_token_embedding_per_token(tmp_path: Path) -> None:
    """The engine hands WIDEN each tensor's context: the embedding (by its name) per token
    row, other matrices per column, the norm's vector entry by entry."""
    shapes = {
        "model.embed_tokens.weight": (10, 4),
        "model.layers.0.mlp.up_proj.weight": (6, 4),
        "model.norm.weight": (4,),
    }
    gen = torch.Generator().manual_seed(6)
    models = []
    for name in ("base", "ft0", "ft1"):
        tensors = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        if models:
            tensors = {k: models[0][k] + 0.3 * v for k, v in tensors.items()}
        models.append(tensors)
        save_file(tensors, tmp_path / f"{name}.safetensors")
    recipe = {
        "base": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "ft0.safetensors"), str(tmp_path / "ft1.safetensors")],
        "method": "widen",
    }
    merged = nanmerge.merge(recipe)
    assert isinstance(merged, dict)
    for name in shapes:
        stack = torch.stack([ft[name] for ft in models[1:]])
        embedding = name == "model.embed_tokens.weight"
        expected = widen_reference(stack, models[0][name], 1.0, 1.0, embedding=embedding)
        torch.testing.assert_close(merged[name], expected)

"""MagMax and PCB-merging against their published rules, written out again here, and by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nanmerge
from nanmerge._types import MergeError, TensorContext
from nanmerge.methods import magmax, pcb
from nanmerge.methods._competition import _merge_sketches, _sketch_chunk


def magmax_reference(tensors: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """Entry by entry, the task vector of largest magnitude, the later model winning ties."""
    tau = (tensors - base).reshape(len(tensors), -1)
    picked = []
    for j in range(tau.shape[1]):
        best = 0
        for i in range(1, len(tau)):
            if abs(float(tau[i, j])) >= abs(float(tau[best, j])):
                best = i
        picked.append(tau[best, j])
    return base + scale * torch.stack(picked).reshape(base.shape)


def _sorted_at(rows: torch.Tensor, position: int) -> torch.Tensor:
    return rows.sort(dim=1).values[:, position : position + 1]


def pcb_reference(
    tensors: torch.Tensor,
    base: torch.Tensor,
    *,
    density: float,
    clip: float,
    scale: float,
    whole: torch.Tensor | None = None,
) -> torch.Tensor:
    """The authors' PCB_merge on this tensor, in float64; the clamp bounds come from `whole`
    ((M, d) task vectors of the whole model) when given, else from this tensor."""
    tau = (tensors - base).reshape(len(tensors), -1).double()
    m, n = tau.shape
    source = (tau if whole is None else whole.double()).abs()
    d = source.shape[1]
    low, high = _sorted_at(source, int(d * clip)), _sorted_at(source, int(d * (1 - clip) - 1))
    clamped_abs = torch.minimum(torch.maximum(tau.abs(), low), high)
    intra = torch.exp(m * ((clamped_abs - low) / (high - low)) ** 2)
    inter = torch.tanh(tau * tau.sum(dim=0))
    score = intra * inter
    floored = torch.maximum(score, _sorted_at(score, int(n * (1 - density))))
    lowest = floored.min(dim=1, keepdim=True).values
    span = floored.max(dim=1, keepdim=True).values - lowest
    # where every kept score is equal the reference divides 0 by 0; nanmerge keeps nothing
    weight = torch.where(span > 0, (floored - lowest) / span, 0.0)
    merged = (tau.sign() * clamped_abs * weight).sum(0) / weight.sum(0).clamp(min=1e-12)
    return (base.double() + scale * merged.reshape(base.shape)).float()


def _random(m: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base + 0.5 * torch.randn((m, *shape), generator=gen), base


# MagMax


def test_magmax_takes_each_entrys_largest_task_vector_entry() -> None:
    base = torch.tensor([10.0, 10.0, 10.0])
    tau = torch.tensor([[1.0, -3.0, 0.5], [-2.0, 2.0, 0.25]])
    merged = magmax(base + tau, torch.ones(2), base=base, scale=1.0)
    assert merged.tolist() == [8.0, 7.0, 10.5]


def test_magmax_breaks_a_tie_of_magnitudes_towards_the_later_model() -> None:
    base = torch.zeros(1)
    assert magmax(torch.tensor([[1.0], [-1.0]]), torch.ones(2), base=base, scale=1.0) == -1.0
    assert magmax(torch.tensor([[-1.0], [1.0]]), torch.ones(2), base=base, scale=1.0) == 1.0


def test_magmax_coefficients_scale_the_task_vectors_before_the_competition() -> None:
    base = torch.zeros(2)
    tensors = torch.tensor([[1.0, 1.0], [-2.0, -4.0]])
    merged = magmax(tensors, torch.tensor([3.0, 1.0]), base=base, scale=0.5)
    # |3 * 1| > |-2| picks model 0's scaled entry; |3 * 1| < |-4| picks model 1's
    assert merged.tolist() == [1.5, -2.0]


@pytest.mark.parametrize("scale", [0.5, 1.0, -0.3])
def test_magmax_matches_the_reference_rule(scale: float) -> None:
    tensors, base = _random(4, (7, 3), seed=1)
    merged = magmax(tensors, torch.ones(4), base=base, scale=scale)
    torch.testing.assert_close(merged, magmax_reference(tensors, base, scale))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.permutations(range(4)))
def test_magmax_is_blind_to_the_models_order_without_ties(seed: int, order: list[int]) -> None:
    tensors, base = _random(4, (5, 4), seed)  # continuous: no two magnitudes are equal
    coef = torch.tensor([1.0, 0.5, 2.0, 1.5])
    torch.testing.assert_close(
        magmax(tensors[order], coef[order], base=base), magmax(tensors, coef, base=base)
    )


# PCB


def test_pcb_on_two_models_by_hand() -> None:
    """clip 0 (bounds = min and max), density 0.75 (one of four scores floored away).

    |tau_1| = (1, 0, 2, 1) and |tau_2| = (1, 1, 2, 0) both span [0, 2]; sum = (2, 1, 0, -1);
    scores: model 1 (e^.5 tanh 2, 0, 0, e^.5 tanh 1), model 2 (e^.5 tanh 2, e^.5 tanh 1, 0, 0);
    each floored at its 2nd smallest, 0, and divided by its max: weights (1, 0, 0, r) and
    (1, r, 0, 0), r = tanh 1 / tanh 2. Entry 3 (+2 against -2) is dropped by both.
    """
    base = torch.full((4,), 5.0)
    tau = torch.tensor([[1.0, 0.0, 2.0, -1.0], [1.0, 1.0, -2.0, 0.0]])
    merged = pcb(base + tau, torch.ones(2), base=base, density=0.75, clip=0.0, scale=1.0)
    torch.testing.assert_close(merged, base + torch.tensor([1.0, 1.0, 0.0, -1.0]))
    # coefficients (2, 1) weigh the task vectors, not the scores: entry 0 is (2 + 1) / 2
    r = math.tanh(1) / math.tanh(2)
    weighted = pcb(base + tau, torch.tensor([2.0, 1.0]), base=base, density=0.75, clip=0.0)
    expected = [(2 * 1 + 1 * 1) / 2, (1 * r) / r, 0.0, (2 * -1 * r) / r]
    torch.testing.assert_close(weighted, base + torch.tensor(expected))


@pytest.mark.parametrize(
    ("density", "clip", "scale"), [(0.1, 1e-4, 1.0), (0.5, 0.1, 0.7), (1.0, 0.0, 1.3)]
)
def test_pcb_matches_the_authors_formula(density: float, clip: float, scale: float) -> None:
    tensors, base = _random(3, (20, 10), seed=2)
    merged = pcb(tensors, torch.ones(3), base=base, density=density, clip=clip, scale=scale)
    expected = pcb_reference(tensors, base, density=density, clip=clip, scale=scale)
    torch.testing.assert_close(merged, expected)


def test_pcb_clamps_outliers_to_the_clip_quantiles() -> None:
    """With one huge entry per model, the merge stays within the clamp bound of the rest."""
    tensors, base = _random(2, (100,), seed=3)
    tensors[:, 7] = base[7] + 1e6
    merged = pcb(tensors, torch.ones(2), base=base, density=1.0, clip=0.01)
    assert float((merged - base).abs().max()) < 10
    torch.testing.assert_close(
        merged, pcb_reference(tensors, base, density=1.0, clip=0.01, scale=1.0)
    )


@pytest.mark.parametrize("n", [1, 4, 10])
def test_pcb_keeps_nothing_of_a_tensor_of_at_most_one_over_density_entries(n: int) -> None:
    """Its score floor is its maximum, so every weight is 0 (the reference: 0 / 0)."""
    tensors, base = _random(3, (n,), seed=6)
    assert torch.equal(pcb(tensors, torch.ones(3), base=base, density=0.1), base)
    assert not torch.equal(pcb(tensors, torch.ones(3), base=base, density=0.5), base) or n == 1


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.permutations(range(3)))
def test_pcb_is_blind_to_the_models_order(seed: int, order: list[int]) -> None:
    tensors, base = _random(3, (8, 6), seed)
    coef = torch.tensor([1.0, 0.5, 2.0])
    torch.testing.assert_close(
        pcb(tensors[order], coef[order], base=base), pcb(tensors, coef, base=base)
    )


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"clip": 0.2}, "clip"),
        ({"clip": -0.1}, "clip"),
        ({"scale": math.inf}, "scale"),
    ],
)
def test_pcb_rejects_parameters_out_of_range_before_reading_tensors(
    params: dict[str, float], named: str
) -> None:
    wrong_shape = torch.zeros(2, 3)  # would fail on the base's shape if it were read
    with pytest.raises(MergeError, match=named):
        pcb(wrong_shape, torch.ones(2), base=torch.zeros(5), **params)


def test_magmax_rejects_a_scale_that_is_not_finite() -> None:
    with pytest.raises(MergeError, match="scale"):
        magmax(torch.zeros(2, 3), torch.ones(2), base=torch.zeros(5), scale=math.nan)


def test_the_magnitude_sketch_gives_exact_extremes_and_close_interior_quantiles() -> None:
    gen = torch.Generator().manual_seed(4)
    tau = torch.randn((2, 300_000), generator=gen) * torch.logspace(-6, 0, 300_000)
    where = TensorContext("w", None, None, "other")
    pieces = [_sketch_chunk(where, tau[:, i : i + 70_000], None) for i in range(0, 300_000, 70_000)]
    sketch = pieces[0]
    for piece in pieces[1:]:
        sketch = _merge_sketches(sketch, piece)
    exact = tau.abs().sort(dim=1).values
    assert sketch.numel == 300_000
    for rank in (0, 30, 255, 299_744, 299_999):  # within 256 of an end: exact
        assert torch.equal(sketch.quantile(rank), exact[:, rank])
    for rank in (256, 1_000, 150_000, 299_000):
        error = (sketch.quantile(rank) / exact[:, rank] - 1).abs().max()
        assert float(error) < 2**-8


# PCB through the engine: the clamp bounds come from the whole model

SHAPES = {
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.1.mlp.down_proj.weight": (700, 1000),  # more than one chunk
    "model.norm.weight": (4,),
}


def test_pcb_through_the_engine_clamps_with_whole_model_bounds(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    models = []
    for i, name in enumerate(("base", "ft0", "ft1")):
        scale = 1.0 if i == 0 else 0.1 * i  # the models differ in task-vector size
        tensors = {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        if i:
            tensors = {k: models[0][k] + v for k, v in tensors.items()}
        models.append(tensors)
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    recipe = {
        "base": str(tmp_path / "base"),
        "models": [str(tmp_path / "ft0"), str(tmp_path / "ft1")],
        "method": "pcb",
    }
    merged = nanmerge.merge(recipe)
    assert isinstance(merged, dict)
    base = models[0]
    whole = torch.stack(
        [torch.cat([(ft[k] - base[k]).reshape(-1) for k in SHAPES]) for ft in models[1:]]
    )
    for name in SHAPES:
        stack = torch.stack([ft[name] for ft in models[1:]])
        expected = pcb_reference(stack, base[name], density=0.1, clip=1e-4, scale=1.0, whole=whole)
        torch.testing.assert_close(merged[name], expected)
    # each small tensor alone would clamp at its own bounds, and merge differently
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        alone = pcb(torch.stack([ft[name] for ft in models[1:]]), torch.ones(2), base=base[name])
        assert not torch.allclose(merged[name], alone)


@pytest.mark.parametrize("coefficients", ["nan", "manual"])
def test_magmax_refuses_coefficients_it_has_no_slot_for(tmp_path: Path, coefficients: str) -> None:
    gen = torch.Generator().manual_seed(6)
    for name in ("base", "ft0", "ft1"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.randn(4, 3, generator=gen)}, tmp_path / name / "model.safetensors")
    models: list[object] = [str(tmp_path / "ft0"), str(tmp_path / "ft1")]
    if coefficients == "manual":
        models = [
            {"path": str(m), "coefficient": c} for m, c in zip(models, (1.0, 2.0), strict=True)
        ]
    recipe = {
        "base": str(tmp_path / "base"),
        "models": models,
        "method": "magmax",
        "coefficients": coefficients,
    }
    with pytest.raises(MergeError, match="'magmax' has no coefficient slot"):
        nanmerge.merge(recipe)

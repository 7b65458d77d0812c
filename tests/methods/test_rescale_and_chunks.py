"""`rescale` on the sparsifying methods (1/p, L1 matching, none), and every elementwise
method with every conventions/rescale setting merged chunk by chunk equal to the whole merge,
called directly (prepare over the whole tensor, then offsets) and through the engine."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

import nanmerge
from nanmerge._types import MergeError
from nanmerge.engine import _stream
from nanmerge.methods import METHODS, _bands, _sparsify, tensor_generator
from tests.conftest import build_family

SPARSIFYING = ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties"]
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def _settings(name: str) -> list[dict[str, Any]]:
    """Every valid (conventions, rescale) pair, with a density (and gamma) that trims."""
    rescales = ["probability", "l1", "none"] if name in RANDOM else ["l1", "none"]
    extra: dict[str, Any] = {"density": 0.4}
    if "breadcrumbs" in name:
        extra["gamma"] = 0.05
    return [
        {"conventions": c, "rescale": r, **extra}
        for c, r in itertools.product(["nanmerge", "mergekit"], rescales)
    ]


CASES = [(name, p) for name in SPARSIFYING for p in _settings(name)]


L1_CASES = [
    (name, p)
    for name in [*SPARSIFYING, "della", "della_linear"]
    for p in _settings(name)
    if p["rescale"] == "l1"
]


@pytest.mark.parametrize(("name", "params"), L1_CASES)
def test_l1_rescale_gives_each_models_kept_entries_its_original_l1_norm(
    name: str, params: dict[str, Any]
) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(30, 40, generator=gen)
    model = base + torch.randn(1, 30, 40, generator=gen)
    draws = {"generator": tensor_generator(0, "w")} if METHODS[name].uses_generator else {}
    merge = {"merge": "sum"} if "merge" in METHODS[name].params else {}
    out = METHODS[name].fn(model, torch.ones(1), base=base, scale=1.0, **params, **merge, **draws)
    kept = out - base
    assert int(torch.count_nonzero(kept)) < kept.numel()  # something was dropped
    torch.testing.assert_close(kept.abs().sum(), (model - base).abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_without_rescale_keeps_the_plain_entries(name: str) -> None:
    base, tau = torch.zeros(2000), torch.full((1, 2000), 3.0)
    out = METHODS[name].fn(
        base + tau,
        torch.ones(1),
        base=base,
        density=0.25,
        scale=1.0,
        rescale="none",
        generator=tensor_generator(7, "w"),
    )
    assert set(out.unique().tolist()) == {0.0, 3.0}


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_a_magnitude_trim_refuses_the_probability_rescale(name: str) -> None:
    stack, base = torch.randn(2, 10), torch.zeros(10)
    with pytest.raises(MergeError, match=r"rescale: l1 .* or rescale: none"):
        METHODS[name].fn(stack, torch.ones(2), base=base, rescale="probability")


@pytest.mark.parametrize(("name", "params"), CASES)
def test_chunks_after_prepare_equal_the_whole_tensor_merge(
    name: str, params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sparsify, "DRAW", 50)  # random masks drawn in blocks dividing 100
    monkeypatch.setattr(_bands, "PIECE", 200)  # DARE's L1 sums over five pieces
    spec = METHODS[name]
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-4, 5, (1000,), generator=gen).float()  # ties at the cuts
    stack = base + torch.randint(-3, 4, (3, 1000), generator=gen).float()
    coef = torch.tensor([0.5, 1.0, 2.0])

    def draws() -> dict[str, Any]:
        return {"generator": tensor_generator(0, "w")} if spec.uses_generator else {}

    whole = spec.fn(stack, coef, base=base, **params, **draws())
    inputs = draws()
    prepared = spec.prepare(list(stack), base, **{**spec.params, **params, **inputs})
    inputs |= prepared
    parts = [
        spec.fn(stack[:, i : i + 100], coef, base=base[i : i + 100], **params, **inputs, offset=i)
        for i in range(0, 1000, 100)
    ]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_l1_preparation_draws_at_most_one_piece_of_masks_at_a_time(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sparsify, "DRAW", 50)
    monkeypatch.setattr(_bands, "PIECE", 200)
    shapes: list[tuple[int, ...]] = []
    draw = _bands.random_mask

    def spy(shape: torch.Size, *args: Any) -> torch.Tensor:
        shapes.append(tuple(shape))
        return draw(shape, *args)

    monkeypatch.setattr(_bands, "random_mask", spy)
    base = torch.zeros(1030)
    stack = torch.randn(3, 1030, generator=torch.Generator().manual_seed(2))
    METHODS[name].prepare(
        list(stack), base, density=0.3, rescale="l1", generator=tensor_generator(0, "w")
    )
    assert shapes == [(3, 200)] * 5 + [(3, 30)]


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if c[1]["rescale"] != "none"])
def test_the_engine_merges_in_chunks_what_it_merges_whole(
    tmp_path: Path, name: str, params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    family = build_family(tmp_path, shapes={"w": (24, 50), "v": (7,)}, dtype=torch.bfloat16)
    recipe = {
        "base": str(family.base),
        "models": [str(p) for p in family.models],
        "method": name,
        "parameters": params,
        "coefficients": "nan",
        "seed": 5,
    }
    monkeypatch.setattr(_sparsify, "DRAW", 50)
    monkeypatch.setattr(_stream, "CHUNK", 1 << 20)
    whole = nanmerge.merge(recipe)
    monkeypatch.setattr(_stream, "CHUNK", 100)  # 12 chunks of the 1200-entry tensor
    chunked = nanmerge.merge(recipe)
    assert isinstance(whole, dict) and isinstance(chunked, dict)
    for k in whole:
        assert torch.equal(chunked[k], whole[k]), k

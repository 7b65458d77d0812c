"""model_stock, nearswap and arcee_fusion against their formulas written out here (Model
Stock's paper, mergekit 0.1.5's definitions), closed cases and bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanmerge import merge
from nanmerge._types import MergeError
from nanmerge.methods import arcee_fusion, model_stock, nearswap
from tests.conftest import build_family

GEN = torch.Generator().manual_seed(1)
BASE = torch.randn(5, 6, generator=GEN)
MODELS = BASE + 0.3 * torch.randn(4, 5, 6, generator=GEN) + 0.2  # task vectors share a part


# ---------------------------------------------------------------- model_stock


def _model_stock_written_out(
    x: torch.Tensor, base: torch.Tensor, angle: str = "mean_cosine", coef: list[float] | None = None
) -> torch.Tensor:
    """t = k cos θ / (1 + (k-1) cos θ) over the whole flattened tensor; cos θ the mean of
    the pairs' cosines, or the cosine of their mean angle."""
    k = len(x)
    taus = [(xi - base).reshape(-1).double() for xi in x]
    cosines = [float((a @ b) / (a.norm() * b.norm())) for a, b in itertools.combinations(taus, 2)]
    if angle == "mean_cosine":
        cos = sum(cosines) / len(cosines)
    else:
        cos = math.cos(sum(math.acos(c) for c in cosines) / len(cosines))
    t = k * cos / (1 + (k - 1) * cos)
    w = [1.0] * k if coef is None else coef
    average = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sum(w)
    return t * average + (1 - t) * base


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("angle", ["mean_cosine", "mean_angle"])
def test_model_stock_moves_from_the_base_to_the_average_by_the_papers_ratio(
    k: int, angle: str
) -> None:
    out = model_stock(MODELS[:k], torch.ones(k), base=BASE, angle=angle)
    torch.testing.assert_close(out, _model_stock_written_out(MODELS[:k], BASE, angle))


def test_model_stock_mean_angle_and_mean_cosine_differ_for_three_models_only() -> None:
    two = [
        model_stock(MODELS[:2], torch.ones(2), base=BASE, angle=a)
        for a in ("mean_cosine", "mean_angle")
    ]
    torch.testing.assert_close(two[0], two[1])
    three = [
        model_stock(MODELS[:3], torch.ones(3), base=BASE, angle=a)
        for a in ("mean_cosine", "mean_angle")
    ]
    assert not torch.allclose(three[0], three[1], atol=1e-4)


def test_model_stock_filter_wise_takes_one_ratio_per_last_axis_vector() -> None:
    out = model_stock(MODELS[:3], torch.ones(3), base=BASE, filter_wise=True)
    rows = [
        _model_stock_written_out(MODELS[:3, r : r + 1], BASE[r : r + 1])
        for r in range(BASE.shape[0])
    ]
    torch.testing.assert_close(out, torch.cat(rows))
    vector = model_stock(MODELS[:3, 0], torch.ones(3), base=BASE[0], filter_wise=True)
    torch.testing.assert_close(vector, _model_stock_written_out(MODELS[:3, 0], BASE[0]))


def test_model_stock_of_two_identical_fine_tunes_is_that_fine_tune() -> None:
    twins = torch.stack([MODELS[0], MODELS[0]])
    torch.testing.assert_close(model_stock(twins, torch.ones(2), base=BASE), MODELS[0])


def test_model_stock_of_orthogonal_task_vectors_keeps_the_base() -> None:
    base = torch.tensor([1.0, 2.0, 3.0])
    x = base + torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    torch.testing.assert_close(model_stock(x, torch.ones(2), base=base), base)


def test_model_stock_of_opposite_task_vectors_keeps_the_base_at_the_singularity() -> None:
    base = torch.tensor([1.0, 2.0, 3.0])
    tau = torch.tensor([0.5, -1.0, 2.0])
    x = torch.stack([base + tau, base - 2 * tau])  # 1 + cos θ = 0: no finite ratio
    torch.testing.assert_close(model_stock(x, torch.ones(2), base=base), base)


def test_model_stock_coefficients_weigh_the_average_not_the_ratio() -> None:
    coef = [1.0, 3.0, 2.0]
    out = model_stock(MODELS[:3], torch.tensor(coef), base=BASE)
    torch.testing.assert_close(out, _model_stock_written_out(MODELS[:3], BASE, coef=coef))
    # a common factor changes nothing (the average divides by the coefficients' sum)
    torch.testing.assert_close(model_stock(MODELS[:3], 5 * torch.tensor(coef), base=BASE), out)


@pytest.mark.parametrize(
    ("m", "params", "kwargs", "match"),
    [
        (1, {}, {"base": BASE}, "at least 2"),
        (2, {}, {}, "give a base"),
        (2, {"angle": "max_angle"}, {"base": BASE}, "angle"),
        (2, {"filter_wise": "yes"}, {"base": BASE}, "filter_wise"),
    ],
)
def test_model_stock_bad_input_is_a_merge_error(
    m: int, params: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(MergeError, match=match):
        model_stock(MODELS[:m], torch.ones(m), **params, **kwargs)


# ---------------------------------------------------------------- nearswap


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 10.0])
def test_nearswap_weights_each_entry_by_t_over_its_distance(t: float) -> None:
    out = nearswap(MODELS[:1], torch.ones(1), base=BASE, t=t)
    a, b = BASE.reshape(-1).tolist(), MODELS[0].reshape(-1).tolist()
    expected = []
    for ai, bi in zip(a, b, strict=True):
        w = min(1.0, max(0.0, t / max(abs(ai - bi), 1e-6)))
        expected.append(w * bi + (1 - w) * ai)
    torch.testing.assert_close(out, torch.tensor(expected).reshape(BASE.shape))


def test_nearswap_takes_near_entries_from_the_model_and_moves_far_ones_by_t() -> None:
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.05, -0.1, 1.0, -3.0])
    out = nearswap(model[None], torch.ones(1), base=base, t=0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, 0.9]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-10, 10, width=32), min_size=8, max_size=8),
    st.floats(0.0, 3.0),
)
def test_nearswap_moves_no_entry_further_than_t_from_the_base(
    values: list[float], t: float
) -> None:
    x = torch.tensor(values).reshape(2, 4)
    out = nearswap(x[1:], torch.ones(1), base=x[0], t=t)
    assert bool(((out - x[0]).abs() <= t + 1e-5).all())


@pytest.mark.parametrize(
    ("m", "params", "match"),
    [
        (1, {}, "'t' is required"),
        (1, {"t": -0.1}, "'t'"),
        (1, {"t": math.inf}, "'t'"),
        (2, {"t": 0.1}, "exactly 1"),
    ],
)
def test_nearswap_bad_input_is_a_merge_error(m: int, params: dict[str, Any], match: str) -> None:
    with pytest.raises(MergeError, match=match):
        nearswap(MODELS[:m], torch.ones(m), base=BASE, **params)


# ---------------------------------------------------------------- arcee_fusion


def _fusion_written_out(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """importance = |model - base| * KL(softmax(model) || softmax(base)) per last-axis vector
    (1e-8 added to both); the model's entries where importance >= median + 1.5 IQR, the
    quantile q being the sorted entry floor(q (n - 1))."""
    p = torch.softmax(model.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    importance = ((model.double() - base.double()).abs() * kl).reshape(-1)
    ordered = sorted(importance.tolist())
    n = len(ordered)
    q1, median, q3 = (ordered[math.floor(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    take = importance.reshape(model.shape) >= median + 1.5 * (q3 - q1)
    return torch.where(take, model, base)


@pytest.mark.parametrize("shape", [(5, 6), (7,), (3, 4, 5)])
def test_arcee_fusion_takes_the_model_where_importance_is_an_upper_outlier(
    shape: tuple[int, ...],
) -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=gen)
    model = base + 0.01 * torch.randn(shape, generator=gen)
    model.view(-1)[[3, 4]] += torch.tensor([2.0, -1.5])  # two entries that changed a lot
    out = arcee_fusion(model[None], torch.ones(1), base=base)
    torch.testing.assert_close(out, _fusion_written_out(model, base))
    taken = out == model
    assert bool(taken.view(-1)[[3, 4]].all()) and int(taken.sum()) < model.numel() // 2


def test_arcee_fusion_of_a_model_equal_to_the_base_is_the_base() -> None:
    torch.testing.assert_close(arcee_fusion(BASE[None], torch.ones(1), base=BASE), BASE)


@pytest.mark.parametrize(
    ("m", "params", "kwargs", "match"),
    [
        (1, {"t": 0.5}, {"base": BASE}, "unknown parameter"),
        (2, {}, {"base": BASE}, "exactly 1"),
        (1, {}, {}, "give a base"),
    ],
)
def test_arcee_fusion_bad_input_is_a_merge_error(
    m: int, params: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(MergeError, match=match):
        arcee_fusion(MODELS[:m], torch.ones(m), **params, **kwargs)


@pytest.mark.parametrize(("method", "params"), [("nearswap", {"t": 0.01}), ("arcee_fusion", {})])
def test_selection_methods_refuse_coefficients_in_a_recipe(
    tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    family = build_family(tmp_path / "in", m=1)
    recipe = {
        "base": str(family.base),
        "models": [str(p) for p in family.models],
        "method": method,
        "parameters": params,
        "coefficients": "nan",
        "output": str(tmp_path / "out"),
    }
    with pytest.raises(MergeError, match="has no coefficient slot"):
        merge(recipe)

"""NAN coefficients against hand computations and the invariants NAN.md states."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanmerge._types import TensorNorms
from nanmerge.coefficients import nan, uniform

MODELS2 = ("a", "b")


def stats_of(*sumsq: tuple[float, ...], tau: tuple[float, ...] | None = None) -> TensorNorms:
    return TensorNorms(numel=1, sumsq_finetuned=sumsq[0], sumsq_task_vector=tau)


def test_model_level_weights_are_normalized_inverse_norms_times_m() -> None:
    # norms 2 and 4 -> inverse 1/2, 1/4 -> a = (2/3, 1/3) -> mean_one multiplies by M = 2
    coefs = nan({"w": stats_of((4.0, 16.0))}, MODELS2)
    assert coefs.per_model == pytest.approx((4 / 3, 2 / 3))


@pytest.mark.parametrize(
    ("convention", "expected"),
    [
        ("sum_one", (0.5, 0.25, 0.25)),
        ("mean_one", (1.5, 0.75, 0.75)),
        ("half_m", (0.75, 0.375, 0.375)),
    ],
)
def test_conventions_only_rescale_the_normalized_weights(
    convention: str, expected: tuple[float, ...]
) -> None:
    # norms 1, 2, 2 -> inverse 1, 1/2, 1/2 -> a = (1/2, 1/4, 1/4)
    coefs = nan({"w": stats_of((1.0, 4.0, 4.0))}, ("a", "b", "c"), convention=convention)  # type: ignore[arg-type]
    assert coefs.per_model == pytest.approx(expected)


def test_model_norm_sums_squares_over_all_tensors() -> None:
    # tensor sums of squares add up: (1 + 3, 4 + 12) = (4, 16) -> norms 2, 4
    stats = {"x": stats_of((1.0, 4.0)), "y": stats_of((3.0, 12.0))}
    assert nan(stats, MODELS2).per_model == pytest.approx((4 / 3, 2 / 3))


def test_tensor_granularity_gives_one_vector_per_tensor() -> None:
    stats = {"x": stats_of((1.0, 4.0)), "y": stats_of((9.0, 9.0))}
    coefs = nan(stats, MODELS2, granularity="tensor")
    assert coefs.per_model is None
    assert coefs.per_tensor["x"] == pytest.approx((4 / 3, 2 / 3))
    assert coefs.per_tensor["y"] == pytest.approx((1.0, 1.0))


def test_task_vector_norms_are_used_when_asked() -> None:
    stats = {"w": stats_of((1.0, 1.0), tau=(1.0, 9.0))}
    coefs = nan(stats, MODELS2, norm_of="task_vector")
    # tau norms 1 and 3 -> inverse 1, 1/3 -> a = (3/4, 1/4) -> x2
    assert coefs.per_model == pytest.approx((1.5, 0.5))


def test_zero_task_vector_gets_coefficient_zero_and_a_warning() -> None:
    stats = {"w": stats_of((1.0, 1.0, 1.0), tau=(0.0, 4.0, 4.0))}
    coefs = nan(stats, ("a", "b", "c"), norm_of="task_vector")
    assert coefs.per_model == pytest.approx((0.0, 1.5, 1.5))
    assert all(math.isfinite(c) for c in coefs.per_model or ())
    assert any("zero" in w and "a" in w for w in coefs.warnings)


def test_all_zero_norms_fall_back_to_uniform() -> None:
    stats = {"w": stats_of((1.0, 1.0), tau=(0.0, 0.0))}
    coefs = nan(stats, MODELS2, norm_of="task_vector")
    assert coefs.per_model == pytest.approx((1.0, 1.0))


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_all_zero_norms_warn_with_the_coefficient_actually_used(granularity: str) -> None:
    stats = {"w": stats_of((1.0, 1.0), tau=(0.0, 0.0))}
    coefs = nan(stats, MODELS2, norm_of="task_vector", granularity=granularity)  # type: ignore[arg-type]
    assert (coefs.per_model or coefs.per_tensor["w"]) == pytest.approx((1.0, 1.0))
    assert any("every model" in w for w in coefs.warnings)
    assert not any("coefficient 0" in w for w in coefs.warnings)


def test_per_tensor_warnings_separate_partly_zero_from_all_zero_tensors() -> None:
    stats = {
        "x": stats_of((1.0, 1.0), tau=(0.0, 4.0)),
        "y": stats_of((1.0, 1.0), tau=(0.0, 0.0)),
    }
    coefs = nan(stats, MODELS2, norm_of="task_vector", granularity="tensor")
    assert coefs.per_tensor == {"x": (0.0, 2.0), "y": (1.0, 1.0)}
    (some,) = [w for w in coefs.warnings if "coefficient 0" in w]
    (every,) = [w for w in coefs.warnings if "every model" in w]
    assert "x (models a)" in some and "y" not in some
    assert every.endswith("in tensors: y")


def test_near_uniform_coefficients_are_flagged() -> None:
    close = nan({"w": stats_of((1.0, 1.02**2))}, MODELS2)
    far = nan({"w": stats_of((1.0, 1.5**2))}, MODELS2)
    assert any("within ±2%" in w for w in close.warnings)
    assert not any("within ±2%" in w for w in far.warnings)


def test_task_vector_without_base_statistics_is_an_error() -> None:
    from nanmerge import MergeError

    with pytest.raises(MergeError, match="base"):
        nan({"w": stats_of((1.0, 1.0))}, MODELS2, norm_of="task_vector")


norms = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@given(norm=norms, m=st.integers(min_value=1, max_value=8))
def test_equal_norms_reproduce_uniform(norm: float, m: int) -> None:
    models = tuple(str(i) for i in range(m))
    coefs = nan({"w": stats_of((norm**2,) * m)}, models)
    assert coefs.per_model == pytest.approx(uniform({}, models).per_model)


@given(values=st.lists(norms, min_size=2, max_size=6), data=st.data())
def test_permuting_models_permutes_coefficients(values: list[float], data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(len(values))))
    models = tuple(str(i) for i in range(len(values)))
    original = nan({"w": stats_of(tuple(v**2 for v in values))}, models).per_model
    permuted = nan({"w": stats_of(tuple(values[i] ** 2 for i in perm))}, models).per_model
    assert original is not None and permuted is not None
    assert permuted == pytest.approx(tuple(original[i] for i in perm))


@given(values=st.lists(norms, min_size=2, max_size=6))
def test_coefficients_are_inversely_ordered_to_norms(values: list[float]) -> None:
    models = tuple(str(i) for i in range(len(values)))
    coefs = nan({"w": stats_of(tuple(v**2 for v in values))}, models).per_model
    assert coefs is not None
    assert sum(coefs) == pytest.approx(len(values))
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:
                assert coefs[i] >= coefs[j]

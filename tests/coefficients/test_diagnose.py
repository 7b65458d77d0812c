"""diagnose(): spread, rank correlations and verdicts, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from nanmerge._types import Coefficients, MergeError
from nanmerge.coefficients._diagnose import diagnose, spearman


def _coefs(per_model: tuple[float, ...], **norms: tuple[float, ...]) -> Coefficients:
    names = tuple(f"m{i}" for i in range(len(per_model)))
    return Coefficients(names, "nan", per_model=per_model, norms=dict(norms))


def test_spearman_matches_the_hand_computed_value_without_ties() -> None:
    # ranks equal the values; d = (-1, 1, -1, 1, 0), sum d^2 = 4: 1 - 6*4 / (5*(25-1)) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_spearman_gives_tied_values_their_average_rank() -> None:
    # x ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))


def test_spearman_is_plus_and_minus_one_for_monotone_orders() -> None:
    assert spearman([1, 5, 9], [10, 20, 1000]) == pytest.approx(1.0)
    assert spearman([9, 5, 1], [10, 20, 1000]) == pytest.approx(-1.0)


def test_spearman_is_nan_when_one_side_is_constant() -> None:
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))


def test_spread_is_relative_to_the_mean_coefficient() -> None:
    report = diagnose(_coefs((0.5, 1.0, 1.5)))
    assert report["spread"]["max_over_min"] == pytest.approx(3.0)
    assert report["spread"]["max_abs_deviation_from_uniform"] == pytest.approx(0.5)
    # the same weights in another convention (summing to 1) give the same spread
    scaled = diagnose(_coefs((0.5 / 3, 1.0 / 3, 1.5 / 3)))
    assert scaled["spread"] == pytest.approx(report["spread"])


def test_near_uniform_coefficients_are_called_out() -> None:
    report = diagnose(_coefs((0.99, 1.0, 1.01)))
    assert "NAN changes almost nothing" in report["verdict"][0]


def test_inverse_norms_are_ranked_against_data_sizes() -> None:
    # theta norms fall as data grows (1/||theta|| rises: +1); tau norms grow with data (-1)
    coefs = _coefs((0.6, 1.0, 1.4), finetuned=(4.0, 2.0, 1.0), task_vector=(1.0, 2.0, 4.0))
    report = diagnose(coefs, data_sizes=[10, 100, 1000])
    rho = report["spearman_with_data_size"]
    assert rho["inverse_finetuned_norm"] == pytest.approx(1.0)
    assert rho["inverse_task_vector_norm"] == pytest.approx(-1.0)
    verdict = " ".join(report["verdict"])
    assert "1/||theta|| ranks models in the same order as their data sizes" in verdict
    assert "not proof that the weights reflect data size" in verdict
    assert "1/||tau|| ranks models opposite to their data sizes" in verdict
    assert "premise does not hold" in verdict
    # the estimate used theta (the default), so the tau sentence speaks conditionally
    assert "NAN on this norm would give more weight to models with less data" in verdict


def test_the_consequence_is_stated_for_the_norm_the_coefficients_used() -> None:
    coefs = _coefs((1.4, 1.0, 0.6), finetuned=(4.0, 2.0, 1.0), task_vector=(1.0, 2.0, 4.0))
    coefs.params["norm_of"] = "task_vector"
    verdict = " ".join(diagnose(coefs, data_sizes=[10, 100, 1000])["verdict"])
    assert "these coefficients give more weight to models with less data" in verdict


def test_weak_rank_correlation_is_not_read_as_support() -> None:
    # inverse norms (1/2, 1/3, 1, 1/4) rank (3, 2, 4, 1) against sizes (1, 2, 3, 4):
    # d^2 = 4 + 0 + 1 + 9 = 14, rho = 1 - 6*14 / (4*15) = -0.4
    coefs = _coefs((1.0,) * 4, finetuned=(2.0, 3.0, 1.0, 4.0))
    report = diagnose(coefs, data_sizes=[1, 2, 3, 4])
    assert report["spearman_with_data_size"]["inverse_finetuned_norm"] == pytest.approx(-0.4)
    assert "not supported" in " ".join(report["verdict"])


def test_equal_data_sizes_and_missing_sizes_say_what_cannot_be_judged() -> None:
    coefs = _coefs((0.9, 1.1, 1.0), finetuned=(1.0, 2.0, 3.0))
    assert "all data sizes are equal" in " ".join(diagnose(coefs, [5, 5, 5])["verdict"])
    assert "no data sizes given" in " ".join(diagnose(coefs)["verdict"])
    assert diagnose(coefs)["spearman_with_data_size"] == {}


def test_per_tensor_deviation_is_reported() -> None:
    coefs = Coefficients(
        ("a", "b"), "nan", per_model=(1.0, 1.0), per_tensor={"w": (0.8, 1.2), "b": (1.0, 1.0)}
    )
    report = diagnose(coefs)
    assert report["per_tensor_max_abs_deviation_from_uniform"] == pytest.approx(0.2)


def test_data_sizes_must_match_the_models() -> None:
    with pytest.raises(MergeError, match="2 data sizes for 3 models"):
        diagnose(_coefs((1.0, 1.0, 1.0)), data_sizes=[1, 2])

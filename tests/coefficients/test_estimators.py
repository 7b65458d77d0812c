"""uniform, manual and from_file estimators, the registry and the statistics they read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanmerge import Coefficients, MergeError
from nanmerge._types import TensorNorms
from nanmerge.coefficients import (
    RecipeFacts,
    cancellation_warning,
    check_options,
    from_file,
    get_estimator,
    manual,
    model_norms,
    nan,
    tensor_norms,
)
from nanmerge.coefficients import uniform as uniform_estimator


def test_uniform_is_one_per_model() -> None:
    assert uniform_estimator({}, ("a", "b", "c")).per_model == (1.0, 1.0, 1.0)


def test_manual_keeps_the_given_values() -> None:
    assert manual({}, ("a", "b"), values=[0.3, 0.7]).per_model == (0.3, 0.7)


def test_manual_rejects_a_count_mismatch_and_non_finite_values() -> None:
    with pytest.raises(MergeError, match="2 values for 3 models"):
        manual({}, ("a", "b", "c"), values=[1.0, 2.0])
    with pytest.raises(MergeError, match="finite"):
        manual({}, ("a", "b"), values=[1.0, float("nan")])


def test_from_file_round_trips_model_and_tensor_coefficients(tmp_path: Path) -> None:
    stats = {"x": TensorNorms(1, (1.0, 4.0)), "y": TensorNorms(1, (4.0, 1.0))}
    written = nan(stats, ("a", "b"), granularity="tensor")
    path = tmp_path / "coefs.json"
    path.write_text(json.dumps(written.to_json()))
    loaded = from_file({}, ("a", "b"), path=str(path))
    assert loaded.per_tensor == written.per_tensor
    assert torch.equal(loaded.for_tensor("x"), written.for_tensor("x"))
    assert loaded.params["source_estimator"] == "nan"


def test_from_file_reads_the_coefficients_inside_a_merge_report(tmp_path: Path) -> None:
    coefs = Coefficients(("a", "b"), "nan", per_model=(1.2, 0.8))
    path = tmp_path / "merge_report.json"
    path.write_text(json.dumps({"method": {}, "coefficients": coefs.to_json()}))
    assert from_file({}, ("a", "b"), path=str(path)).per_model == (1.2, 0.8)


def test_from_file_rejects_a_model_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(Coefficients(("a",), "manual", per_model=(1.0,)).to_json()))
    with pytest.raises(MergeError, match="1 models but the recipe has 2"):
        from_file({}, ("a", "b"), path=str(path))


def test_from_file_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="not found"):
        from_file({}, ("a",), path=str(tmp_path / "nope.json"))


def test_unknown_estimator_lists_valid_ones_and_suggests_closest() -> None:
    with pytest.raises(MergeError, match=r"'unifrom' \(did you mean 'uniform'\?\)") as info:
        get_estimator("unifrom")
    assert "nan" in str(info.value) and "manual" in str(info.value)


def test_manual_reads_each_models_coefficient_and_needs_one_on_every_model() -> None:
    spec = get_estimator("manual")
    assert spec.reads_coefficients == "values" and "values" not in spec.signature.annotations
    assert check_options(spec, {}, RecipeFacts(has_base=False, coefficients=(1.0, 2.0))) == []
    problems = check_options(
        spec, {"values": [1, 2, 3]}, RecipeFacts(has_base=False, coefficients=(1.0, None, None))
    )
    assert problems == [
        "coefficients: manual reads each model's `coefficient`; remove the `values` option",
        "estimator 'manual': needs a `coefficient` on every model; models 1, 2 have none",
    ]


def test_coefficients_on_models_need_an_estimator_that_reads_them() -> None:
    (problem,) = check_options(
        get_estimator("uniform"), {}, RecipeFacts(has_base=True, coefficients=(0.5, None))
    )
    assert problem == (
        "models carry a `coefficient` but coefficients is 'uniform'; "
        "set `coefficients: manual` to use them, or remove them"
    )


@pytest.mark.parametrize(("has_base", "expected"), [(True, 0), (False, 1)])
def test_nan_of_task_vectors_needs_a_base(has_base: bool, expected: int) -> None:
    facts = RecipeFacts(has_base=has_base, coefficients=(None, None))
    problems = check_options(get_estimator("nan"), {"norm_of": "task_vector"}, facts)
    assert len(problems) == expected
    assert all("norm_of: task_vector needs a `base` model" in p for p in problems)
    assert check_options(get_estimator("nan"), {}, facts) == []  # the default reads weights


def test_estimator_options_report_every_problem_at_once() -> None:
    facts = RecipeFacts(has_base=False, coefficients=(None,))
    problems = check_options(
        get_estimator("nan"), {"norm": "x", "granularity": "layer", "eps": -1.0}, facts
    )
    assert problems == [
        "estimator 'nan': unknown option 'norm' (did you mean 'norm_of'?); "
        "valid options: norm_of, granularity, convention, eps",
        "estimator 'nan': option 'granularity' = 'layer' is invalid; "
        "it must be one of 'model', 'tensor'",
        "estimator 'nan': option 'eps' = -1.0 is invalid; it must be a finite number with x >= 0",
    ]
    (missing,) = check_options(get_estimator("from_file"), {}, facts)
    assert missing == (
        "estimator 'from_file': option 'path' is required; "
        "it must be the path of a coefficients JSON file"
    )


def test_tensor_stats_are_sums_of_squares_of_weights_and_task_vectors() -> None:
    stack = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    base = torch.tensor([1.0, 1.0])
    st = tensor_norms(stack, base)
    assert st.numel == 2
    assert st.sumsq_finetuned == pytest.approx((5.0, 25.0))
    assert st.sumsq_task_vector == pytest.approx((1.0, 13.0))


def test_model_norms_are_square_roots_of_summed_squares() -> None:
    norms = model_norms(
        [TensorNorms(1, (1.0, 4.0), (0.0, 1.0)), TensorNorms(1, (3.0, 5.0), (4.0, 3.0))]
    )
    assert norms["finetuned"] == pytest.approx((2.0, 3.0))
    assert norms["task_vector"] == pytest.approx((2.0, 2.0))


def test_coefficients_without_an_entry_for_a_tensor_raise() -> None:
    with pytest.raises(MergeError, match="no entry for tensor 'z'"):
        Coefficients(("a",), "nan", per_tensor={"x": (1.0,)}).for_tensor("z")


@pytest.mark.parametrize(
    ("values", "warns"),
    [
        ((1.0, -0.9995), True),  # |sum| 5e-4 < 1e-3 * 1.9995
        ((1.0, -0.99), False),  # |sum| 0.01 > 1e-3 * 1.99
        ((1.0, -1.0), True),  # exactly zero
        ((0.0, 0.0), False),  # nothing to amplify
        ((1.0, 1.0), False),
    ],
)
def test_cancellation_warning_fires_below_a_thousandth_of_the_magnitudes(
    values: tuple[float, ...], warns: bool
) -> None:
    coefs = Coefficients(("a", "b"), "manual", per_model=values)
    assert (cancellation_warning(coefs) is not None) == warns


def test_cancellation_warning_names_the_tensor_and_counts_the_others() -> None:
    coefs = Coefficients(
        ("a", "b"),
        "from_file",
        per_tensor={"x": (1.0, 1.0), "y": (2.0, -2.0), "z": (1.0, -1.0)},
    )
    warning = cancellation_warning(coefs)
    assert warning is not None
    assert "tensor 'y'" in warning and "1 more tensors" in warning and "infx" in warning

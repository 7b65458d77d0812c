from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.methods import METHODS, check_params, get_method, ties


def test_every_method_is_registered_under_its_function_name() -> None:
    for name, spec in METHODS.items():
        assert spec.name == name == spec.fn.__name__
        assert spec.reference.startswith("https://")


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        cast(Any, METHODS)["mine"] = METHODS["ties"]


def test_params_are_the_keyword_only_hyperparameters_with_defaults() -> None:
    assert get_method("ties").params == {
        "density": 0.2,
        "scale": 1.0,
        "merge": "mean",
        "trim_scope": "tensor",
        "conventions": "nanmerge",
        "rescale": "none",
    }
    assert get_method("dare_linear").params == {
        "density": 0.5,
        "scale": 0.3,
        "conventions": "nanmerge",
        "rescale": "probability",
    }
    assert get_method("breadcrumbs").params == {
        "density": 0.9,
        "gamma": 0.01,
        "scale": 0.3,
        "trim_scope": "tensor",
        "conventions": "nanmerge",
        "rescale": "none",
    }
    assert get_method("slerp").params == {"t": 0.5}
    assert get_method("weight_average").params == {"normalize": True}


def test_base_and_model_count_requirements() -> None:
    assert get_method("ties").needs_base and not get_method("weight_average").needs_base
    slerp = get_method("slerp")
    assert (slerp.min_models, slerp.max_models) == (2, 2)
    assert get_method("dare_ties").uses_generator and not get_method("ties").uses_generator


def test_registered_fn_is_the_public_function() -> None:
    assert get_method("ties").fn is ties


def test_unknown_method_lists_valid_names_and_suggests_the_closest() -> None:
    with pytest.raises(MergeError) as info:
        get_method("tie")
    message = str(info.value)
    assert "did you mean 'ties'" in message
    assert all(name in message for name in METHODS)


def test_check_params_reports_every_problem_at_once() -> None:
    problems = check_params(
        get_method("ties"),
        {"desnity": 0.5, "density": 0.0, "merge": "median", "scale": float("inf")},
    )
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "unknown parameter 'desnity'" in text and "did you mean 'density'" in text
    assert "'density' = 0.0" in text and "it must be a number with 0 < x <= 1" in text
    assert "'merge' = 'median'" in text
    assert "'scale' = inf" in text
    assert all(p.startswith("ties:") for p in problems)


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan"), "0.5", True])
def test_check_params_rejects_densities_outside_zero_one(density: object) -> None:
    assert len(check_params(get_method("dare_ties"), {"density": density})) == 1


@pytest.mark.parametrize("density", [1, 1.0, 0.2, 1e-6])
def test_check_params_accepts_densities_in_zero_one(density: object) -> None:
    assert check_params(get_method("dare_ties"), {"density": density}) == []


def test_check_params_rules_for_gamma_and_t() -> None:
    breadcrumbs = get_method("breadcrumbs")
    assert check_params(breadcrumbs, {"gamma": 0.1, "density": 0.9}) == []
    assert len(check_params(breadcrumbs, {"gamma": 1.0})) == 1
    (problem,) = check_params(breadcrumbs, {"gamma": 0.2})  # with the default density 0.9
    assert "gamma + density must be <= 1" in problem and "1.1" in problem
    assert len(check_params(get_method("slerp"), {"t": 1.01})) == 1
    assert check_params(get_method("slerp"), {"t": 0}) == []


def test_calls_check_their_parameters_too() -> None:
    with pytest.raises(MergeError, match="did you mean 'density'"):
        ties(torch.ones(2, 3), torch.ones(2), base=torch.zeros(3), desnity=0.5)  # type: ignore[call-arg]

"""mergekit's per-model `density` and `gamma` translated to nanmerge's per-model values."""

from __future__ import annotations

import pytest

from nanmerge import MergeError
from nanmerge.recipes import from_mergekit


def breadcrumbs(*models: dict[str, object]) -> dict[str, object]:
    return {
        "merge_method": "breadcrumbs",
        "base_model": "b",
        "models": [{"model": f"m{i}", "parameters": p} for i, p in enumerate(models)],
    }


def test_differing_densities_and_gammas_become_each_models_own_values() -> None:
    recipe = from_mergekit(
        breadcrumbs(
            {"weight": 1.0, "density": 0.5, "gamma": 0.1},
            {"weight": 1.0, "density": [0.2, 0.9], "gamma": 0.1},
        )
    )
    assert "density" not in recipe["parameters"]
    assert recipe["parameters"]["gamma"] == 0.1  # the same for both: one value
    assert [m["parameters"] for m in recipe["models"]] == [
        {"density": 0.5},
        {"density": {"schedule": [0.2, 0.9]}},
    ]


def test_gamma_and_density_beyond_one_pass_as_given_to_mergekits_conventions() -> None:
    """mergekit drops fewer outliers where gamma + density > 1, counting in its own integer
    counts: the translated method does that (conventions: mergekit), from the values given."""
    recipe = from_mergekit(
        breadcrumbs(
            {"weight": 1.0, "density": 0.95, "gamma": 0.1},
            {"weight": 1.0, "density": 0.5, "gamma": 0.1},
        )
    )
    assert recipe["parameters"]["gamma"] == 0.1
    assert recipe["parameters"]["conventions"] == "mergekit"
    assert [m["parameters"] for m in recipe["models"]] == [{"density": 0.95}, {"density": 0.5}]


def test_a_per_model_filter_falls_back_to_the_global_value() -> None:
    data = breadcrumbs(
        {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.3}]}, {"weight": 1.0}
    )
    data["parameters"] = {"density": 0.6}
    first, second = (m.get("parameters", {}).get("density") for m in from_mergekit(data)["models"])
    # unmatched tensors: the global value (mergekit's default 1.0 after it is never reached)
    assert first[:2] == [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    assert second == 0.6


def test_differing_densities_within_a_slice_are_one_clear_error() -> None:
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "slices": [
            {
                "sources": [
                    {"model": "b", "layer_range": [0, 2]},
                    {"model": "x", "layer_range": [0, 2], "parameters": {"density": 0.3}},
                    {"model": "y", "layer_range": [0, 2], "parameters": {"density": 0.5}},
                ]
            }
        ],
    }
    with pytest.raises(MergeError) as info:
        from_mergekit(data)
    message = str(info.value)
    assert "1 feature(s)" in message
    assert "slices[0]: per-model density that differs between sources" in message

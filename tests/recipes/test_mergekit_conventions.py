"""mergekit recipes of the sparsifying methods run with mergekit's conventions: the
translated recipe names `conventions: mergekit`, mergekit's `rescale` (its L1 rescale or
none), DELLA's per-model epsilon, and refuses keep probabilities outside (0, 1] up front.
mergekit 0.1.5's defaults, from its merge_methods/registry.py, are written out here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nanmerge import MergeError, load_recipe
from nanmerge.recipes import from_mergekit
from tests.recipes._helpers import SHAPES, hf_model, merge_yaml, merged, run

# mergekit method -> (nanmerge method, its default rescale as translated, merge or None)
DEFAULTS: dict[str, tuple[str, str, str | None]] = {
    "ties": ("ties", "none", "mean"),  # rescale false, normalize true
    "dare_linear": ("dare_linear", "l1", None),  # rescale true, normalize false
    "dare_ties": ("dare_ties", "l1", "sum"),
    "breadcrumbs": ("breadcrumbs", "none", None),
    "breadcrumbs_ties": ("breadcrumbs_ties", "none", "sum"),
    "della": ("della", "l1", "mean"),  # rescale true, normalize true
    "della_linear": ("della_linear", "l1", None),
}


def recipe(method: str, *models: dict[str, Any], **glob: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "merge_method": method,
        "base_model": "b",
        "models": [{"model": "b"}]
        + [{"model": f"m{i}", "parameters": {"weight": 1.0, **p}} for i, p in enumerate(models)],
    }
    return data | ({"parameters": glob} if glob else {})


@pytest.mark.parametrize("method", DEFAULTS)
def test_each_sparsifying_method_runs_with_mergekits_conventions_and_default_rescale(
    method: str,
) -> None:
    name, rescale, merge = DEFAULTS[method]
    out = from_mergekit(recipe(method, {"density": 0.5}, {"density": 0.5}))
    expected: dict[str, Any] = {"density": 0.5, "scale": 1.0}
    expected |= {"gamma": 0.01} if "breadcrumbs" in method else {}
    expected |= {"epsilon": 0.15} if "della" in method else {}  # mergekit's default
    expected |= {"merge": merge} if merge else {}
    assert out["method"] == name
    assert out["parameters"] == expected | {"rescale": rescale, "conventions": "mergekit"}
    assert [m["path"] for m in out["models"]] == ["m0", "m1"]  # base_model's entry skipped


@pytest.mark.parametrize("method", DEFAULTS)
@pytest.mark.parametrize(("flag", "rescale"), [(True, "l1"), (False, "none")])
def test_every_rescale_setting_maps_l1_or_none(method: str, flag: bool, rescale: str) -> None:
    out = from_mergekit(recipe(method, {"density": 0.4}, rescale=flag))
    assert out["parameters"]["rescale"] == rescale
    assert out["parameters"]["scale"] == 1.0  # nothing folded into the scale any more


def test_task_arithmetic_has_no_sparsifier_so_rescale_changes_nothing() -> None:
    out = from_mergekit(recipe("task_arithmetic", {}, rescale=True))
    assert out["parameters"] == {"scale": 1.0}


def test_della_epsilon_differs_per_model_and_is_not_checked_where_nothing_is_dropped() -> None:
    out = from_mergekit(
        recipe(
            "della_linear",
            {"density": 0.5, "epsilon": 0.1},
            {"density": 0.6},  # mergekit's default epsilon, 0.15
            {},  # density 1: mergekit keeps every entry and never reads epsilon
            {"density": [{"filter": "mlp", "value": 0.5}]},  # 1 elsewhere: only mlp drops
        )
    )
    assert "epsilon" not in out["parameters"] and "density" not in out["parameters"]
    assert [m["parameters"] for m in out["models"]] == [
        {"density": 0.5, "epsilon": 0.1},
        {"density": 0.6, "epsilon": 0.15},
        {"density": 1.0, "epsilon": 0.15},
        {"density": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}], "epsilon": 0.15},
    ]


def test_a_global_epsilon_is_one_value_and_a_per_model_one_overrides_it() -> None:
    out = from_mergekit(recipe("della", {"density": 0.5}, {"density": 0.5}, epsilon=0.2))
    assert out["parameters"]["epsilon"] == 0.2
    out = from_mergekit(
        recipe("della", {"density": 0.5, "epsilon": 0.05}, {"density": 0.5}, epsilon=0.2)
    )
    assert [m["parameters"]["epsilon"] for m in out["models"]] == [0.05, 0.2]


@pytest.mark.parametrize(
    ("params", "low", "high"),
    [
        ({"density": 0.1, "epsilon": 0.1}, "0", "0.2"),  # density - epsilon = 0
        ({"density": 0.9}, "0.75", "1.05"),  # density + default epsilon > 1
        ({"density": [0.2, 0.8], "epsilon": 0.25}, "-0.05", "1.05"),  # a gradient's ends
        ({"density": [1, 0.5]}, "0.35", "1.15"),  # its layers between reach 1 - epsilon
        ({"density": [{"filter": "mlp", "value": 0.95}, {"value": 0.5}]}, "0.35", "1.1"),
    ],
)
def test_keep_probabilities_outside_zero_one_are_refused(
    params: dict[str, Any], low: str, high: str
) -> None:
    with pytest.raises(MergeError) as info:
        from_mergekit(recipe("della", params))
    assert f"reach [{low}, {high}], outside (0, 1]" in str(info.value)


def test_bad_epsilons_of_several_models_are_listed_with_every_other_problem() -> None:
    data = recipe(
        "della",
        {"density": 0.9, "epsilon": 0.2},
        {"density": 0.5},  # fine
        {"density": 0.05},
    )
    data |= {"chat_template": "llama3", "modules": {}}
    with pytest.raises(MergeError) as info:
        from_mergekit(data)
    message = str(info.value)
    assert "4 feature(s)" in message
    assert "of model m0: keep probabilities" in message
    assert "of model m2: keep probabilities" in message and "of model m1" not in message


def test_epsilon_is_refused_where_the_method_has_none() -> None:
    with pytest.raises(MergeError, match="parameter 'epsilon' of model m0"):
        from_mergekit(recipe("dare_ties", {"density": 0.5, "epsilon": 0.1}))


def test_breadcrumbs_ties_takes_gamma_per_model_as_given() -> None:
    out = from_mergekit(
        recipe(
            "breadcrumbs_ties",
            {"density": 0.5, "gamma": 0.2},
            {"density": 0.95},  # + mergekit's 0.01 > 1: its conventions drop fewer outliers
        )
    )
    assert out["parameters"]["merge"] == "sum"
    assert [m["parameters"] for m in out["models"]] == [
        {"density": 0.5, "gamma": 0.2},
        {"density": 0.95, "gamma": 0.01},
    ]


def test_breadcrumbs_ties_normalize_true_is_the_kept_weights_mean() -> None:
    out = from_mergekit(recipe("breadcrumbs_ties", {"density": 0.5}, normalize=True))
    assert out["parameters"]["merge"] == "mean"


def test_sce_takes_select_topk_with_mergekits_default_and_no_weights() -> None:
    data: dict[str, Any] = {
        "merge_method": "sce",
        "base_model": "b",
        "models": [{"model": "b"}, {"model": "x"}, {"model": "y"}],
    }
    out = from_mergekit(data)
    assert out["parameters"] == {"select_topk": 1.0, "conventions": "mergekit"}
    assert out["models"] == [{"path": "x"}, {"path": "y"}]
    out = from_mergekit(data | {"parameters": {"select_topk": 0.3, "int8_mask": True}})
    assert out["parameters"]["select_topk"] == 0.3 and "int8_mask" in out["notes"][0]
    data["models"][1]["parameters"] = {"weight": 0.5}
    with pytest.raises(MergeError, match="parameter 'weight' of model x"):
        from_mergekit(data)


def test_model_stock_averages_cosines_as_mergekit_does() -> None:
    data = {"merge_method": "model_stock", "base_model": "b", "models": ["x", "y"]}
    assert from_mergekit(data)["parameters"]["angle"] == "mean_cosine"


def test_nanmerge_recipes_keep_nanmerges_conventions() -> None:
    own = load_recipe({"method": "ties", "base": "b", "models": ["x", "y"]})
    assert "conventions" not in own.parameters and "rescale" not in own.parameters


def mergekit_at_density_one(method: str, tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's update at density 1 (nothing dropped), written out: della and
    breadcrumbs_ties elect a sign (a sum >= 0 elects +) and keep the agreeing entries, della
    divides by their weights' sum (1 where it is 0); sce elects by the plain sum of the task
    vectors and weighs each by its mean square (normalized to sum 1) instead of a weight."""
    if method == "sce":
        weights = tau.pow(2).flatten(1).mean(1)
        weights = weights / weights.sum()
    weighted = tau * weights.view(-1, *[1] * (tau.dim() - 1))
    if method == "della_linear":
        return weighted.sum(0)
    sign = torch.where((tau if method == "sce" else weighted).sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == sign).float()
    total = (weights.view(-1, *[1] * (tau.dim() - 1)) * agree).sum(0)
    if method == "breadcrumbs_ties":
        return (weighted * agree).sum(0)
    if method == "sce":
        return (weighted * agree).sum(0) / total.clamp(min=1e-6)
    return (weighted * agree).sum(0) / torch.where(total == 0, 1.0, total)


@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs_ties", "sce"])
def test_new_methods_merge_a_mergekit_recipe_as_mergekit_computes(
    tmp_path: Path, method: str
) -> None:
    models = {name: hf_model(tmp_path / name, seed) for seed, name in enumerate("bxy")}
    weights = {"x": 0.7, "y": 0.4}
    entries = [
        {"model": str(tmp_path / n)}
        | ({} if method == "sce" else {"parameters": {"weight": weights[n]}})
        for n in "xy"
    ]
    data = {"merge_method": method, "base_model": str(tmp_path / "b"), "models": entries}
    result = run(["run", str(merge_yaml(tmp_path, data)), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = merged(tmp_path / "out")
    for name in SHAPES:
        base = models["b"][name]
        tau = torch.stack([models[n][name] - base for n in "xy"])
        update = mergekit_at_density_one(method, tau, torch.tensor([weights[n] for n in "xy"]))
        torch.testing.assert_close(out[name], base + update)

"""Parameters and coefficients that vary by layer, role or name, merged end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from nanmerge import MergeError, load_recipe, merge
from nanmerge.engine import check_recipe, plan
from tests.conftest import Family, build_family

LAYERS = 3
NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(LAYERS)),
    *(f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)),
    *(f"model.layers.{i}.input_layernorm.weight" for i in range(LAYERS)),
    "model.norm.weight",
    "lm_head.weight",
]


@pytest.fixture
def llama(tmp_path: Path) -> Family:
    """A tiny Llama-named family: three blocks, embeddings, final norm and head."""
    shapes = {n: (3,) if n.endswith("norm.weight") else (3, 2) for n in NAMES}
    return build_family(tmp_path / "llama", m=2, shapes=shapes)


def recipe(family: Family, **fields: Any) -> dict[str, Any]:
    return {
        "base": str(family.base),
        "models": [str(p) for p in family.models],
        "method": "task_arithmetic",
        **fields,
    }


def tau(family: Family, i: int, name: str) -> torch.Tensor:
    return family.model_tensors[i][name] - family.base_tensors[name]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def test_scale_schedule_merges_each_layer_with_its_hand_scale(llama: Family) -> None:
    out = merge(recipe(llama, parameters={"scale": {"schedule": [0.2, 1.0]}}))
    # 3 layers over [0.2, 1.0]: 0.2, 0.6, 1.0; embeddings, final norm and head at 0.2
    by_layer = {None: 0.2, 0: 0.2, 1: 0.6, 2: 1.0}
    for name in NAMES:
        expected = llama.base_tensors[name] + by_layer[layer_of(name)] * (
            tau(llama, 0, name) + tau(llama, 1, name)
        )
        torch.testing.assert_close(out[name], expected, msg=name)


def test_role_filter_sets_the_density_of_mlp_tensors_only(llama: Family) -> None:
    params = {"density": [{"role": "mlp", "value": 0.5}, {"value": 1.0}], "scale": 1.0}
    out = merge(recipe(llama, method="ties", parameters=params))
    half, full = (
        merge(recipe(llama, method="ties", parameters={"density": d})) for d in (0.5, 1.0)
    )
    for name in NAMES:
        torch.testing.assert_close(out[name], (half if "mlp" in name else full)[name], msg=name)


def test_nan_coefficients_are_multiplied_by_the_schedule(llama: Family) -> None:
    coefficients = {"estimator": "nan", "multiplier": {"schedule": [0.0, 1.0]}}
    out = merge(recipe(llama, parameters={"scale": 1.0}, coefficients=coefficients))
    norms = [
        sum(float(t.double().square().sum()) for t in m.values() if t.is_floating_point()) ** 0.5
        for m in llama.model_tensors
    ]
    inverse = [1 / n for n in norms]
    nan = [2 * v / sum(inverse) for v in inverse]  # mean_one: M * a_i
    by_layer = {None: 0.0, 0: 0.0, 1: 0.5, 2: 1.0}
    for name in NAMES:
        factor = by_layer[layer_of(name)]
        expected = llama.base_tensors[name] + sum(
            nan[i] * factor * tau(llama, i, name) for i in range(2)
        )
        torch.testing.assert_close(out[name], expected, msg=name)


def test_manual_coefficient_schedule_weighs_each_model_per_layer(llama: Family) -> None:
    models = [
        {"path": str(llama.models[0]), "coefficient": {"schedule": [1.0, 0.0]}},
        {"path": str(llama.models[1]), "coefficient": 1.0},
    ]
    r = recipe(llama, method="weight_average", models=models, coefficients="manual")
    out = merge(r)
    by_layer = {None: 1.0, 0: 1.0, 1: 0.5, 2: 0.0}
    for name in NAMES:
        w = by_layer[layer_of(name)]
        a, b = (m[name] for m in llama.model_tensors)
        torch.testing.assert_close(out[name], (w * a + b) / (w + 1), msg=name)


def test_report_records_per_tensor_values_only_for_what_varies(
    llama: Family, tmp_path: Path
) -> None:
    report = merge(
        recipe(
            llama,
            method="ties",
            parameters={"density": 0.5, "scale": {"schedule": [0.0, 1.0]}},
            coefficients={
                "estimator": "uniform",
                "multiplier": [{"role": "mlp", "value": 0.5}, {"value": 1}],
            },
            output=str(tmp_path / "out"),
        )
    )
    per_tensor = report["method"]["per_tensor"]
    assert set(per_tensor) == set(NAMES)
    assert per_tensor["model.layers.1.mlp.down_proj.weight"] == {"scale": 0.5}
    assert per_tensor["lm_head.weight"] == {"scale": 0.0}
    assert report["method"]["parameters"]["density"] == 0.5
    # only the tensors whose coefficients change carry a multiplier
    assert report["coefficients"]["multiplier"] == {
        f"model.layers.{i}.mlp.down_proj.weight": [0.5, 0.5] for i in range(LAYERS)
    }


def test_constant_recipe_reports_no_per_tensor_values(llama: Family, tmp_path: Path) -> None:
    report = merge(recipe(llama, parameters={"scale": 0.3}, output=str(tmp_path / "out")))
    assert report["method"]["per_tensor"] == {}
    assert "multiplier" not in report["coefficients"]


def problems_of(r: dict[str, Any]) -> str:
    with pytest.raises(MergeError) as info:
        plan(load_recipe(r), for_output=False)
    return str(info.value)


def test_empty_schedule_is_a_recipe_error(llama: Family) -> None:
    with pytest.raises(MergeError, match=r"parameters.*`schedule` has no values"):
        load_recipe(recipe(llama, parameters={"scale": {"schedule": []}}))


def test_schedule_on_a_model_without_layers_names_a_tensor_and_the_fix(family: Family) -> None:
    message = problems_of(recipe(family, parameters={"scale": {"schedule": [0.1, 1.0]}}))
    assert "parameters.scale: a schedule varies over layers" in message
    assert "(e.g. 'head.weight'" in message and "filter by role or name" in message


def test_filter_list_without_default_names_the_unmatched_tensors(llama: Family) -> None:
    message = problems_of(recipe(llama, parameters={"scale": [{"role": "mlp", "value": 0.5}]}))
    assert "parameters.scale: 9 tensor(s) match no filter" in message
    assert "'model.embed_tokens.weight'" in message and "{value: V}" in message


def test_schedule_value_out_of_range_fails_before_any_input_is_opened(llama: Family) -> None:
    r = recipe(llama, method="ties", parameters={"density": {"schedule": [0.5, 1.5]}})
    r["base"] = "/nonexistent/base.safetensors"  # never opened
    with pytest.raises(MergeError) as info:
        check_recipe(load_recipe(r))
    assert "'density' = 1.5 is invalid" in str(info.value)
    assert "every value a tensor can get must be valid" in str(info.value)


def test_parameters_tied_by_a_rule_are_checked_per_tensor(llama: Family) -> None:
    params = {"density": [{"role": "mlp", "value": 0.995}, {"value": 0.5}], "gamma": 0.01}
    message = problems_of(recipe(llama, method="breadcrumbs", parameters=params))
    assert "gamma + density must be <= 1" in message and "mlp.down_proj" in message


def test_scheduled_coefficient_needs_manual_coefficients(llama: Family) -> None:
    models = [{"path": str(p), "coefficient": {"schedule": [1, 0]}} for p in llama.models]
    with pytest.raises(MergeError, match="models carry a `coefficient`"):
        check_recipe(load_recipe(recipe(llama, models=models, coefficients="nan")))


def test_unnamed_layers_tensor_file_keeps_working(tmp_path: Path) -> None:
    """A state dict of other names still merges with constant values (no regression)."""
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    out = merge({"models": [str(tmp_path / "a.safetensors")] * 2, "method": "weight_average"})
    torch.testing.assert_close(out["w"], torch.ones(2))

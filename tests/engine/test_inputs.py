"""What the plan and the report say about the inputs: in-memory models, repeats, copied tensors,
and coefficients whose warnings agree with the numbers shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanmerge
from tests.conftest import Family, build_family


def recipe(family: Family, **fields: object) -> dict[str, object]:
    return {"base": str(family.base), "models": [str(p) for p in family.models], **fields}


def test_in_memory_state_dicts_and_modules_merge_to_a_folder_with_a_named_report(
    tmp_path: Path,
) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"weight": torch.randn(3, 2, generator=gen)}
    first = {"weight": base["weight"] + 0.5}
    module = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        module.weight.copy_(base["weight"] - 0.25)
    out = tmp_path / "out"
    nanmerge.merge(
        {
            "base": base,
            "models": [first, module],
            "method": "task_arithmetic",
            "parameters": {"scale": 1.0},
            "output": str(out),
        }
    )
    merged = load_file(out / "model.safetensors")
    # base + (0.5 - 0.25) entrywise, by hand
    torch.testing.assert_close(merged["weight"], base["weight"] + 0.25)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"] == {
        "base": "<in-memory base>",
        "models": ["<in-memory #0>", "<in-memory #1>"],
    }
    assert [m["path"] for m in report["recipe"]["models"]] == ["<in-memory #0>", "<in-memory #1>"]
    assert "<in-memory #1>" in (out / "README.md").read_text()


def test_a_bad_in_memory_state_dict_is_named_by_its_place() -> None:
    good = {"w": torch.ones(2)}
    bad = {"w": torch.ones(2), "step": 3}
    with pytest.raises(nanmerge.MergeError, match=r"entry 'step' in <in-memory #1> is a int"):
        nanmerge.merge({"models": [good, bad], "method": "weight_average"})


def test_the_same_file_listed_twice_warns_also_through_a_link(family: Family) -> None:
    link = family.models[0].parent / "link.safetensors"
    link.symlink_to(family.models[0])
    coefs = nanmerge.estimate_coefficients(
        {**recipe(family, method="weight_average"), "models": [*map(str, family.models), link]}
    )
    assert any("models[3]" in w and "same model as models[0]" in w for w in coefs.warnings)


def test_a_copy_under_another_name_warns_once_and_a_linked_file_is_not_warned_twice(
    family: Family, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(family.models[1].read_bytes())
    link = tmp_path / "link.safetensors"
    link.symlink_to(family.models[0])
    models = [*map(str, family.models), str(copy), str(link)]
    coefs = nanmerge.estimate_coefficients(
        {**recipe(family, method="weight_average"), "models": models}
    )
    same_norms = [w for w in coefs.warnings if "same norm in every tensor" in w]
    assert len(same_norms) == 1 and "models[1]" in same_norms[0] and "models[3]" in same_norms[0]
    assert any("models[4]" in w and "same model as models[0]" in w for w in coefs.warnings)


def test_the_base_listed_among_the_models_warns(family: Family) -> None:
    coefs = nanmerge.estimate_coefficients(
        {**recipe(family, method="task_arithmetic"), "models": [str(family.base)]}
    )
    assert any("models[0]" in w and "is the base model itself" in w for w in coefs.warnings)


def test_distinct_inputs_with_equal_integer_tensors_give_no_input_warnings(
    family: Family, tmp_path: Path
) -> None:
    report = nanmerge.merge(recipe(family, method="weight_average", output=str(tmp_path / "o")))
    assert isinstance(report, dict)
    assert report["warnings"] == []


def test_integer_tensors_that_differ_are_named_as_copied_from_the_base(
    family: Family, tmp_path: Path
) -> None:
    changed = dict(family.model_tensors[1])
    changed["position_ids"] = changed["position_ids"].flip(0)
    save_file(changed, family.models[1])
    out = tmp_path / "out"
    report = nanmerge.merge(recipe(family, method="weight_average", output=str(out)))
    assert isinstance(report, dict)
    (warning,) = [w for w in report["warnings"] if "non-floating" in w]
    assert "'position_ids'" in warning and str(family.models[1]) in warning
    assert str(family.models[0]) not in warning and "from the base" in warning
    assert torch.equal(
        load_file(out / "model.safetensors")["position_ids"], family.base_tensors["position_ids"]
    )


def manual(family: Family, method: str, values: list[float]) -> dict[str, object]:
    models = [
        {"path": str(p), "coefficient": c} for p, c in zip(family.models, values, strict=True)
    ]
    return {**recipe(family, method=method), "models": models, "coefficients": "manual"}


@pytest.mark.parametrize(
    ("method", "values", "warns"),
    [
        ("weight_average", [1.0, -0.5, -0.4999], True),
        ("weight_average", [1.0, 0.5, 0.5], False),
        ("ties", [1.0, -0.5, -0.4999], True),  # merge: mean divides by the sum
        ("task_arithmetic", [1.0, -0.5, -0.4999], False),  # a plain sum is not amplified
    ],
)
def test_nearly_cancelling_coefficients_warn_where_the_method_divides_by_their_sum(
    family: Family, method: str, values: list[float], warns: bool
) -> None:
    coefs = nanmerge.estimate_coefficients(manual(family, method, values))
    found = [w for w in coefs.warnings if "nearly cancel" in w]
    assert bool(found) == warns
    if warns:
        assert "2e+04x" in found[0]  # sum |c| / |sum c| = 1.9999 / 1e-4


@pytest.fixture
def frozen(tmp_path: Path) -> Family:
    """Two fine-tunes that left `layer.bias` exactly as the base has it."""
    family = build_family(tmp_path / "frozen", m=2)
    for path, tensors in zip(family.models, family.model_tensors, strict=True):
        tensors["layer.bias"] = family.base_tensors["layer.bias"].clone()
        save_file(tensors, path)
    return family


def test_a_tensor_no_model_changed_reports_the_equal_coefficients_it_uses(
    frozen: Family, tmp_path: Path
) -> None:
    coefs = {"estimator": "nan", "norm_of": "task_vector", "granularity": "tensor"}
    out = tmp_path / "out"
    report = nanmerge.merge(
        recipe(frozen, method="task_arithmetic", coefficients=coefs, output=str(out))
    )
    estimated = nanmerge.estimate_coefficients(
        recipe(frozen, method="task_arithmetic", coefficients=coefs)
    )
    assert isinstance(report, dict)
    assert report["coefficients"]["per_tensor"]["layer.bias"] == [1.0, 1.0]
    assert estimated.per_tensor["layer.bias"] == (1.0, 1.0)
    for warnings in (report["warnings"], estimated.warnings):
        assert any("every model" in w and "layer.bias" in w for w in warnings)
        assert not any("coefficient 0" in w for w in warnings)


def test_models_equal_to_the_base_report_the_coefficient_they_get(tmp_path: Path) -> None:
    family = build_family(tmp_path / "f", m=2)
    same = {"estimator": "nan", "norm_of": "task_vector"}
    copies = [tmp_path / f"copy{i}.safetensors" for i in range(2)]
    for path in copies:
        save_file(family.base_tensors, path)
    coefs = nanmerge.estimate_coefficients(
        {
            "base": str(family.base),
            "models": [str(p) for p in copies],
            "method": "task_arithmetic",
            "coefficients": same,
        }
    )
    assert coefs.per_model == (1.0, 1.0)
    assert any("every model's task_vector norm is zero" in w and "1" in w for w in coefs.warnings)
    assert not any("coefficient 0" in w for w in coefs.warnings)


def test_a_values_option_on_manual_coefficients_is_a_recipe_problem(family: Family) -> None:
    data = manual(family, "weight_average", [1.0, 1.0, 1.0])
    data["coefficients"] = {"estimator": "manual", "values": 3}
    with pytest.raises(nanmerge.MergeError, match="remove the `values` option"):
        nanmerge.estimate_coefficients(data)

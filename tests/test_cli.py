"""The command line: run, merge (flags), coefficients --json, methods."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from nanmerge.cli import main
from nanmerge.methods import METHODS
from tests.conftest import Family


def test_run_merges_a_recipe_and_prints_coefficients(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [{"path": str(p)} for p in family.models],
                "method": "task_arithmetic",
                "parameters": {"scale": 0.3},
                "coefficients": "nan",
                "output": str(out),
            }
        )
    )
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "coefficients: nan" in result.output and "||theta||" in result.output
    report = json.loads((out / "merge_report.json").read_text())
    coef = report["coefficients"]["coefficients"]
    merged = load_file(out / "model.safetensors")
    base = family.base_tensors["layer.weight"]
    expected = base + 0.3 * sum(
        c * (ft["layer.weight"] - base) for c, ft in zip(coef, family.model_tensors, strict=False)
    )
    torch.testing.assert_close(merged["layer.weight"], expected)


def test_merge_flags_give_the_same_result_as_the_yaml_recipe(
    family: Family, tmp_path: Path
) -> None:
    flags_out, yaml_out = tmp_path / "flags", tmp_path / "yaml"
    args = [
        "merge",
        "--base",
        str(family.base),
        "--method",
        "ties",
        "--param",
        "density=0.5",
        "--coefficients",
        "nan",
        "--coefficients-option",
        "granularity=tensor",
        "--output",
        str(flags_out),
        "--quiet",
    ]
    for p in family.models:
        args += ["--model", str(p)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [str(p) for p in family.models],
                "method": "ties",
                "parameters": {"density": 0.5},
                "coefficients": {"estimator": "nan", "granularity": "tensor"},
                "output": str(yaml_out),
            }
        )
    )
    assert CliRunner().invoke(main, ["run", str(recipe), "--quiet"]).exit_code == 0
    a, b = load_file(flags_out / "model.safetensors"), load_file(yaml_out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_manual_coefficients_from_flags(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = [
        "merge",
        "--method",
        "weight_average",
        "--coefficients",
        "manual",
        "--output",
        str(out),
        "--quiet",
    ]
    for p, c in zip(family.models, ["1", "0", "3"], strict=False):
        args += ["--model", str(p), "--coefficient", c]
    assert CliRunner().invoke(main, args).exit_code == 0
    merged = load_file(out / "model.safetensors")["layer.weight"]
    expected = (
        family.model_tensors[0]["layer.weight"] + 3 * family.model_tensors[2]["layer.weight"]
    ) / 4
    torch.testing.assert_close(merged, expected)


def test_coefficients_json_has_models_norms_and_coefficients(
    family: Family, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [str(p) for p in family.models],
                "method": "ties",
                "coefficients": {"estimator": "nan", "norm_of": "task_vector"},
            }
        )
    )
    result = CliRunner().invoke(main, ["coefficients", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["models"]) == 3
    tau = torch.tensor(data["norms"]["task_vector"], dtype=torch.float64)
    expected = 3 * (1 / tau) / (1 / tau).sum()
    assert torch.allclose(torch.tensor(data["coefficients"], dtype=torch.float64), expected)
    # the JSON feeds `from_file` unchanged
    saved = tmp_path / "coefs.json"
    saved.write_text(result.output)
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [str(p) for p in family.models],
                "method": "ties",
                "coefficients": {"estimator": "from_file", "path": str(saved)},
            }
        )
    )
    again = json.loads(CliRunner().invoke(main, ["coefficients", str(recipe), "--json"]).output)
    assert again["coefficients"] == data["coefficients"]


def test_methods_lists_every_method_with_parameters_and_reference() -> None:
    result = CliRunner().invoke(main, ["methods", "--json"])
    data = json.loads(result.output)
    assert set(data) == set(METHODS)
    assert data["ties"]["parameters"]["density"] == 0.2
    assert all(row["reference"].startswith("http") for row in data.values())


def test_methods_states_each_parameters_constraint_in_words() -> None:
    text = CliRunner().invoke(main, ["methods"]).output
    assert "    density=0.2 (a number with 0 < x <= 1; or one per model)\n" in text
    assert "    merge=mean (one of 'mean', 'sum', 'count')\n" in text
    assert "    and gamma + density <= 1" in text  # breadcrumbs' rule tying two parameters
    assert "    t (required; a finite number with x >= 0)\n" in text  # nearswap has no default
    assert "    gamma=0.01 (a number with 0 <= x < 1; or one per model)\n" in text
    data = json.loads(CliRunner().invoke(main, ["methods", "--json"]).output)
    for row in data.values():  # keys added, none removed
        assert {"parameters", "needs_base", "models", "statistics", "reference"} <= set(row)
        assert set(row["constraints"]) == set(row["parameters"]) | set(row["required"])
    assert data["slerp"]["constraints"] == {"t": "a number with 0 <= x <= 1"}
    assert data["task_arithmetic"]["rule"] is None
    assert "    and rescale is not probability (a magnitude trim" in text  # ties' rule


def test_console_script_is_installed_and_runs() -> None:
    exe = Path(sys.executable).parent / "nanmerge"
    result = subprocess.run([str(exe), "methods"], capture_output=True, text=True, check=True)
    assert "task_arithmetic" in result.stdout


def test_coefficients_diagnose_prints_a_verdict_and_rejects_bad_sizes(
    family: Family, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [str(p) for p in family.models],
                "method": "ties",
                "coefficients": "nan",
            }
        )
    )
    ok = CliRunner().invoke(main, ["coefficients", str(recipe), "--data-sizes", "10,100,1000"])
    assert ok.exit_code == 0, ok.output
    assert "diagnosis:" in ok.output and "rank" in ok.output.lower()
    bad = CliRunner().invoke(main, ["coefficients", str(recipe), "--data-sizes", "10,100"])
    assert bad.exit_code == 2 and "2 data sizes for 3 models" in bad.output
    junk = CliRunner().invoke(main, ["coefficients", str(recipe), "--data-sizes", "a,b,c"])
    assert junk.exit_code == 2 and "comma-separated numbers" in junk.output

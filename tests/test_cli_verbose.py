"""`--verbose` on run and merge: the plan and, for layer-wise estimators, every coefficient."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from nanmerge.cli import main
from tests.conftest import Family


def _merge_args(family: Family, out: Path) -> list[str]:
    args = ["merge", "--base", str(family.base), "--method", "task_arithmetic"]
    args += [a for p in family.models for a in ("--model", str(p))]
    args += ["--coefficients", "nan", "--coefficients-option", "granularity=tensor"]
    return [*args, "--output", str(out)]


def test_run_verbose_prints_plan_and_per_tensor_coefficients(
    family: Family, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [str(p) for p in family.models],
                "method": "task_arithmetic",
                "coefficients": {"estimator": "nan", "granularity": "tensor"},
                "output": str(out),
            }
        )
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--verbose"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    lines = result.stdout.splitlines()
    # conftest's family: three float tensors and one int64 position_ids.
    assert "plan: 4 tensors: 3 merged, 1 copied from the reference, 0 filled from the base" in lines
    memory = next(line for line in lines if line.startswith("memory bound: "))
    assert f"{report['memory']['bound_bytes'] / 2**20:.1f} MiB" in memory
    assert report["memory"]["largest_tensor"] in memory
    per_tensor = report["coefficients"]["per_tensor"]
    assert set(per_tensor) == {"layer.weight", "layer.bias", "head.weight"}
    for name, values in per_tensor.items():
        row = next(line.split() for line in lines if line.split()[:1] == [name])
        assert [float(v) for v in row[1:]] == [round(v, 6) for v in values], name


def test_merge_verbose_matches_run_verbose(family: Family, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*_merge_args(family, tmp_path / "o"), "--verbose"])
    assert result.exit_code == 0, result.output
    assert "plan: 4 tensors: 3 merged" in result.stdout
    assert "coefficients per tensor" in result.stdout


def test_without_verbose_no_plan_and_quiet_prints_nothing(family: Family, tmp_path: Path) -> None:
    plain = CliRunner().invoke(main, _merge_args(family, tmp_path / "a"))
    assert plain.exit_code == 0, plain.output
    assert "plan:" not in plain.stdout and "coefficients: nan" in plain.stdout
    quiet = CliRunner().invoke(main, [*_merge_args(family, tmp_path / "b"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_quiet_and_verbose_together_is_an_error(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(main, [*_merge_args(family, out), "--quiet", "--verbose"])
    assert result.exit_code == 2
    assert "--quiet and --verbose" in result.output
    assert not out.exists()

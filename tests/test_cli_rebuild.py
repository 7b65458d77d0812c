"""The `rebuild` command: one task's model from a merge's kept masks, the storage it prints,
its refusals, and a --help that loads no torch."""

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
from tests.conftest import Family


def _merge(family: Family, tmp_path: Path, method: str, **parameters: object) -> Path:
    out = tmp_path / method
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(family.base),
                "models": [str(p) for p in family.models],
                "method": method,
                "parameters": parameters,
                "output": str(out),
            }
        )
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_rebuild_writes_the_tasks_tall_model_and_prints_the_storage(
    family: Family, tmp_path: Path
) -> None:
    merged = _merge(family, tmp_path, "consensus", export_masks=True, k=1)
    out = tmp_path / "task1"
    result = CliRunner().invoke(main, ["rebuild", str(merged), "--task", "1", str(out)])
    assert result.exit_code == 0, result.output
    assert f"rebuilt task 1 ({family.models[1]}) with consensus" in result.output
    assert "storage: masks and extras" in result.output and "for every fine-tuned" in result.output
    rebuilt = load_file(out / "model.safetensors")
    base = family.base_tensors
    for name in ("layer.weight", "layer.bias", "head.weight"):
        taus = torch.stack([m[name] - base[name] for m in family.model_tensors])
        mtl = taus.sum(0)
        mask = taus[1].abs() > 0.6 * (mtl - taus[1]).abs()
        expected = base[name] + torch.where(mask, mtl, torch.zeros_like(mtl))
        torch.testing.assert_close(rebuilt[name], expected, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "merge_report.json").read_text())["task"] == 1


def test_rebuild_takes_another_base_with_base(family: Family, tmp_path: Path) -> None:
    merged = _merge(family, tmp_path, "emr")
    out = tmp_path / "task0"
    args = ["rebuild", str(merged), "--task", "0", str(out), "--base", str(family.base)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "with emr (rescaler " in result.output
    assert json.loads((out / "merge_report.json").read_text())["base"] == str(family.base)


def test_rebuild_refuses_a_task_out_of_range_and_a_merge_without_masks(
    family: Family, tmp_path: Path
) -> None:
    merged = _merge(family, tmp_path, "emr")
    result = CliRunner().invoke(main, ["rebuild", str(merged), "--task", "3", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "task 3 is out of range: the merge has 3 models" in result.output
    plain = _merge(family, tmp_path, "task_arithmetic")
    result = CliRunner().invoke(main, ["rebuild", str(plain), "--task", "0", str(tmp_path / "o")])
    assert result.exit_code == 2 and "keeps no per-task masks" in result.output
    assert not (tmp_path / "o").exists()


def test_rebuild_help_does_not_import_torch() -> None:
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom nanmerge.cli import main\n"
        "r = CliRunner().invoke(main, ['rebuild', '--help'])\n"
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False"]

"""`nanmerge run` with mergekit-yaml's habits: a positional output and its common flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nanmerge.cli._mergekit import MERGEKIT_FLAGS
from nanmerge.config import Recipe
from tests.recipes._helpers import SHAPES, hf_model, merge_yaml, run
from tests.test_cli_startup import probe


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    for seed, name in enumerate("bxy"):
        hf_model(tmp_path / name, seed)
    data: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "b"),
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": 0.5}} for m in "xy"],
    }
    return merge_yaml(tmp_path, data)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else None
    out: dict[str, torch.Tensor] = {}
    for name in files or ["model.safetensors"]:
        out |= load_file(folder / name)
    return out


def test_out_shard_size_shards_the_output_and_changes_no_value(
    recipe: Path, tmp_path: Path
) -> None:
    assert run(["run", str(recipe), str(tmp_path / "one"), "--quiet"]).exit_code == 0
    result = run(["run", str(recipe), str(tmp_path / "many"), "--out-shard-size", "60", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    one, many = load_all(tmp_path / "one"), load_all(tmp_path / "many")
    for name in SHAPES:
        assert torch.equal(one[name], many[name])
    assert (
        json.loads((tmp_path / "many" / "merge_report.json").read_text())["recipe"][
            "max_shard_size"
        ]
        == "60"
    )


def test_flags_without_meaning_here_are_accepted_with_a_note(recipe: Path, tmp_path: Path) -> None:
    args = ["run", str(recipe), str(tmp_path / "out"), "--lazy-unpickle", "--allow-crimes"]
    result = run([*args, "--copy-tokenizer"])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if line.startswith("note: --")]
    assert len(printed) == 2
    assert printed[0].startswith("note: --lazy-unpickle: ")
    assert printed[1].startswith("note: --allow-crimes: ")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert len(report["recipe"]["notes"]) == 2
    assert (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without")
def test_cuda_sets_the_device_and_is_refused_up_front_without_one(
    recipe: Path, tmp_path: Path
) -> None:
    result = run(["run", str(recipe), str(tmp_path / "out"), "--cuda"])
    assert result.exit_code == 2
    assert "device: cuda is not available" in result.output
    assert not (tmp_path / "out").exists()


def test_positional_output_and_a_different_output_flag_conflict(
    recipe: Path, tmp_path: Path
) -> None:
    result = run(["run", str(recipe), str(tmp_path / "a"), "--output", str(tmp_path / "b")])
    assert result.exit_code == 2 and "two outputs given" in result.output


def test_each_flag_that_sets_a_field_names_a_recipe_field_and_takes_its_help() -> None:
    for flag in MERGEKIT_FLAGS:
        if flag.field is not None:
            assert flag.field in Recipe.model_fields
            assert (Recipe.model_fields[flag.field].description or "") in flag.help
        else:
            assert flag.meaning
    help_text = run(["run", "--help"]).output
    for flag in MERGEKIT_FLAGS:
        assert f"--{flag.name}" in help_text


def test_chain_and_flag_errors_answer_without_importing_torch(tmp_path: Path) -> None:
    docs = [
        {"merge_method": "linear", "models": [{"model": "./b"}], "out_path": "./a"},
        {"merge_method": "linear", "models": [{"model": "./a"}], "out_path": "./b"},
    ]
    cycle = tmp_path / "cycle.yml"
    cycle.write_text(yaml.safe_dump_all(docs))
    result = probe([["run", str(cycle), "--lazy-unpickle"], ["run", "--help"]])
    assert result["exit_codes"] == [2, 0], result["outputs"]
    outputs = result["outputs"]
    assert isinstance(outputs, list) and "cycle" in outputs[0]
    assert result["torch_loaded"] is False

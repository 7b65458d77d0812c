"""`ray: true` (`nanmerge run --ray`): shards merged as Ray tasks, on a local Ray with 2 CPUs,
give the local merge's files byte for byte; a failed task leaves nothing that looks done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import nanmerge
from nanmerge._types import MergeError
from nanmerge.cli import main
from tests.conftest import Family, build_family

pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray per module (conftest)

ray = pytest.importorskip("ray")

SHAPES = {
    "embed.weight": (16, 8),
    "layers.0.weight": (16, 8),
    "layers.0.bias": (16,),
    "layers.1.weight": (16, 8),
    "layers.1.bias": (16,),
    "head.weight": (4, 16),
}
SHARD = 600  # bytes: a (16, 8) float32 tensor is 512, so 4 shards
# what may differ between two runs of one recipe, and what says the merge ran on Ray
RUN_FIELDS = ("created", "timings_s", "ray")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("ray") / "inputs", shapes=SHAPES)


def _recipe(family: Family, out: Path, **fields: Any) -> dict[str, Any]:
    return {
        "base": str(family.base),
        "models": [str(m) for m in family.models],
        "output": str(out),
        "max_shard_size": SHARD,
        "overwrite": True,
        **fields,
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _without_run_fields(report: dict[str, Any]) -> dict[str, Any]:
    report = {k: v for k, v in report.items() if k not in RUN_FIELDS}
    report["memory"] = {k: v for k, v in report["memory"].items() if k != "peak_rss_bytes"}
    return report


@pytest.mark.parametrize(
    ("method", "parameters", "coefficients"),
    [
        ("task_arithmetic", {"scale": 0.7}, "uniform"),
        ("ties", {"density": 0.5}, {"estimator": "nan", "norm_of": "task_vector"}),
        ("dare_ties", {"density": 0.4}, "uniform"),  # masks drawn per tensor name and seed
        ("task_arithmetic", {}, {"estimator": "nan", "granularity": "tensor"}),
    ],
)
def test_a_ray_merge_writes_the_local_merges_files_byte_for_byte(
    models: Family,
    tmp_path: Path,
    method: str,
    parameters: dict[str, Any],
    coefficients: Any,
) -> None:
    out = tmp_path / "merged"  # one output path, so the recipe in report and card agree
    recipe = _recipe(models, out, method=method, parameters=parameters, coefficients=coefficients)
    local_report = nanmerge.merge(recipe)
    local = _files(out)
    ray_report = nanmerge.merge({**recipe, "ray": True})
    on_ray = _files(out)

    shards = [n for n in local if n.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in local
    assert sorted(on_ray) == sorted(local)
    for name in local:
        if name != "merge_report.json":
            assert on_ray[name] == local[name], name
    assert ray_report["ray"] == {"address": "local", "tasks": len(shards)}
    assert "ray" not in local_report and "ray" not in ray_report["recipe"]
    written, expected = (json.loads(f["merge_report.json"]) for f in (on_ray, local))
    assert _without_run_fields(written) == _without_run_fields(expected)
    per_tensor = written["coefficients"]["per_tensor"]
    assert list(per_tensor) == list(expected["coefficients"]["per_tensor"])  # in plan order
    if isinstance(coefficients, dict) and coefficients.get("granularity") == "tensor":
        assert sorted(per_tensor) == sorted(SHAPES)  # every tensor estimated, in some task


def test_a_failed_task_removes_the_partial_output(models: Family, tmp_path: Path) -> None:
    damaged = dict(models.model_tensors[1])
    damaged["layers.1.weight"] = damaged["layers.1.weight"].clone()
    damaged["layers.1.weight"][3, 2] = float("nan")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_file(damaged, inputs / "damaged.safetensors")
    out = tmp_path / "merged"
    recipe = _recipe(models, out, method="task_arithmetic", ray=True, overwrite=False)
    recipe["models"][1] = str(inputs / "damaged.safetensors")
    with pytest.raises(MergeError, match=r"tensor 'layers\.1\.weight' in .*damaged.* NaN") as err:
        nanmerge.merge(recipe)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no output, no .partial


def test_a_method_that_keeps_tensors_is_refused_on_ray(models: Family, tmp_path: Path) -> None:
    recipe = _recipe(models, tmp_path / "merged", method="emr", ray=True)
    with pytest.raises(MergeError, match=r"keeps tensors beside the checkpoint .* without ray"):
        nanmerge.merge(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_what_ray_cannot_merge_is_refused_before_any_input_is_read(models: Family) -> None:
    recipe = _recipe(models, Path("unused"), method="task_arithmetic", ray=True)
    recipe |= {"output": None, "device": "cuda:1", "models": [torch.zeros(2)] * 2}
    with pytest.raises(MergeError) as err:
        nanmerge.merge({**recipe, "models": [{"t": torch.zeros(2)}, {"t": torch.ones(2)}]})
    message = str(err.value)
    assert "ray: true writes the shards into an output folder: set output" in message
    assert "not in-memory models" in message and "drop device: cuda:1" in message
    with pytest.raises(MergeError, match="address names the Ray cluster of ray: true"):
        nanmerge.merge(_recipe(models, Path("unused"), method="task_arithmetic", address="auto"))


def test_run_ray_from_another_folder_with_relative_paths(
    models: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the workers stay where they started: paths must be absolute
    inputs = Path(os.path.relpath(models.base.parent, tmp_path))
    recipe = _recipe(models, Path("merged"), method="ties", parameters={"density": 0.5})
    recipe |= {"base": str(inputs / "base.safetensors")}
    recipe["models"] = [str(inputs / m.name) for m in models.models]
    Path("recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", "recipe.yaml", "--ray"])
    assert result.exit_code == 0, result.output
    assert "on Ray (local): one task per shard, 4" in result.output
    local = nanmerge.merge({**recipe, "output": "local"})
    for shard in [*local["output"]["weight_files"], "model.safetensors.index.json"]:
        assert Path("merged", shard).read_bytes() == Path("local", shard).read_bytes(), shard


PROBE = """
import json, sys
from click.testing import CliRunner
sys.modules["ray"] = None  # as if Ray were not installed
from nanmerge.cli import main

run = CliRunner().invoke(main, ["run", sys.argv[1], "--ray"])
print(json.dumps({"code": run.exit_code, "output": run.output}))
"""


def test_run_ray_without_ray_says_so_in_one_line(models: Family, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    recipe = _recipe(models, tmp_path / "merged", method="task_arithmetic")
    path.write_text(yaml.safe_dump(recipe))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert result["code"] == 2
    assert result["output"].strip() == (
        "error: ray: true (--ray) needs Ray, which is not installed: pip install 'nanmerge[ray]'"
    )
    assert not (tmp_path / "merged").exists()

"""Bad input: a clear error (what, where, what to do), a non-zero exit, and nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from nanmerge.cli import main
from tests.conftest import Family


def write_recipe(path: Path, family: Family, out: Path, **fields: object) -> Path:
    data = {
        "base": str(family.base),
        "models": [{"path": str(p)} for p in family.models],
        "method": "ties",
        "output": str(out),
        **fields,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def break_missing_path(f: Family, tmp: Path) -> dict[str, object]:
    return {"models": [{"path": str(tmp / "nowhere.safetensors")}, {"path": str(f.models[0])}]}


def break_truncated(f: Family, tmp: Path) -> dict[str, object]:
    data = f.models[1].read_bytes()
    f.models[1].write_bytes(data[: len(data) - 7])
    return {}


class Unsafe:
    """An arbitrary Python object: `weights_only` loading must refuse to unpickle it."""


def break_pickle(f: Family, tmp: Path) -> dict[str, object]:
    path = tmp / "evil.pt"
    torch.save({"layer.weight": torch.zeros(4, 3), "extra": Unsafe()}, path)
    return {"models": [{"path": str(path)}, {"path": str(f.models[0])}]}


def break_shape(f: Family, tmp: Path) -> dict[str, object]:
    tensors = dict(f.model_tensors[2])
    tensors["layer.weight"] = torch.zeros(4, 5)
    save_file(tensors, f.models[2])
    return {}


def break_missing_tensor(f: Family, tmp: Path) -> dict[str, object]:
    tensors = dict(f.model_tensors[1])
    del tensors["layer.bias"]
    save_file(tensors, f.models[1])
    return {}


def break_nan(f: Family, tmp: Path) -> dict[str, object]:
    tensors = dict(f.model_tensors[0])
    tensors["head.weight"] = tensors["head.weight"].clone()
    tensors["head.weight"][0, 1] = float("nan")
    save_file(tensors, f.models[0])
    return {}


CASES: list[tuple[str, Callable[[Family, Path], dict[str, object]], list[str]]] = [
    ("missing path", break_missing_path, ["not found", "nowhere.safetensors"]),
    ("truncated file", break_truncated, ["ft1.safetensors", "truncated"]),
    ("refused pickle", break_pickle, ["evil.pt", "safetensors"]),
    ("shape mismatch", break_shape, ["layer.weight", "(4, 3)", "(4, 5)", "ft2.safetensors"]),
    ("missing tensor", break_missing_tensor, ["layer.bias", "ft1.safetensors", "missing_tensors"]),
    ("nan input", break_nan, ["head.weight", "ft0.safetensors", "NaN"]),
    (
        "unknown method",
        lambda f, t: {"method": "tise"},
        ["unknown", "tise", "'ties'", "task_arithmetic"],
    ),
    ("unknown estimator", lambda f, t: {"coefficients": "nam"}, ["nam", "'nan'", "uniform"]),
    (
        "unknown estimator option",
        lambda f, t: {"coefficients": {"estimator": "nan", "norm": "x"}},
        ["norm", "norm_of"],
    ),
    (
        "bad estimator option value",
        lambda f, t: {"coefficients": {"estimator": "nan", "granularity": "layer"}},
        ["granularity"],
    ),
    ("unknown parameter", lambda f, t: {"parameters": {"densty": 0.5}}, ["densty", "density"]),
    ("density zero", lambda f, t: {"parameters": {"density": 0.0}}, ["density", "0.0"]),
    ("density above one", lambda f, t: {"parameters": {"density": 1.5}}, ["density", "1.5"]),
    ("too many models for slerp", lambda f, t: {"method": "slerp"}, ["slerp", "exactly 2", "3"]),
    (
        "too few models for slerp",
        lambda f, t: {"method": "slerp", "models": [{"path": str(f.models[0])}]},
        ["slerp", "exactly 2", "has 1"],
    ),
    ("no output", lambda f, t: {"output": None}, ["no `output`"]),
    ("no base for task vectors", lambda f, t: {"base": None}, ["needs `base`"]),
    ("misspelt recipe field", lambda f, t: {"modles": []}, ["modles", "models"]),
]


@pytest.mark.parametrize(("case", "breaker", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(
    family: Family,
    tmp_path: Path,
    case: str,
    breaker: Callable[[Family, Path], dict[str, object]],
    expected: list[str],
) -> None:
    out = tmp_path / "merged"
    overrides = breaker(family, tmp_path)
    path = write_recipe(tmp_path / "recipe.yaml", family, out, **overrides)
    result = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert result.exit_code != 0, result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in {result.output!r}"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_existing_output_needs_overwrite(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_recipe(tmp_path / "recipe.yaml", family, out)
    refused = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    assert (out / "keep.txt").read_text() == "mine"
    not_ours = CliRunner().invoke(main, ["run", str(path), "--quiet", "--overwrite"])
    assert not_ours.exit_code != 0 and "was not written by nanmerge" in not_ours.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be written
    for _ in range(2):  # then our own output may be replaced
        replaced = CliRunner().invoke(main, ["run", str(path), "--quiet", "--overwrite"])
        assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "merged", "recipe.yaml"]


def test_zero_norm_task_vector_warns_and_stays_finite(family: Family, tmp_path: Path) -> None:
    save_file(family.base_tensors, family.models[0])  # model 0 identical to the base
    out = tmp_path / "merged"
    coefs = {"estimator": "nan", "norm_of": "task_vector"}
    path = write_recipe(tmp_path / "recipe.yaml", family, out, coefficients=coefs)
    result = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((out / "merge_report.json").read_text())
    assert report["coefficients"]["coefficients"][0] == 0.0
    assert any("zero" in w for w in report["warnings"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())

"""The plan checks statistics files against the method and the models before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nanmerge
from nanmerge._types import MergeError
from nanmerge.engine import _plan
from nanmerge.engine._statistics import Statistics, open_statistics
from nanmerge.statistics import compute_statistics, save_statistics


@dataclass
class Mlps:
    models: list[Path]
    states: list[dict[str, torch.Tensor]]
    fisher: list[Path]
    gram: list[Path]


def mlp() -> nn.Sequential:
    """Two linear layers (Gram statistics) around a LayerNorm (none: regmean's fallback)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    nn.init.normal_(model[1].weight)
    nn.init.normal_(model[1].bias)
    return model


def build_mlps(folder: Path, m: int = 3) -> Mlps:
    """M small MLPs with different weights, and each one's Fisher and Gram on its own data."""
    folder.mkdir(parents=True, exist_ok=True)
    models, states, fisher, gram = [], [], [], []
    for i in range(m):
        torch.manual_seed(i)
        model = mlp()
        x = torch.randn(16 * (i + 1), 4, generator=torch.Generator().manual_seed(10 + i))
        batches = [x[j : j + 16] for j in range(0, len(x), 16)]
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_file(state, folder / f"m{i}.safetensors")
        models.append(folder / f"m{i}.safetensors")
        states.append(state)
        for kind, paths in (("fisher", fisher), ("gram", gram)):
            stats = compute_statistics(model, batches, kind=kind, progress=False)
            paths.append(save_statistics(stats, folder / f"{kind}{i}.safetensors", kind=kind))
    return Mlps(models, states, fisher, gram)


@pytest.fixture(scope="module")
def mlps(tmp_path_factory: pytest.TempPathFactory) -> Mlps:
    return build_mlps(tmp_path_factory.mktemp("mlps"))


def _recipe(mlps: Mlps, method: str, statistics: list[Path] | None) -> dict[str, object]:
    files = None if statistics is None else [str(p) for p in statistics]
    return {"models": [str(p) for p in mlps.models], "method": method, "statistics": files}


def _problems(recipe: dict[str, object]) -> str:
    with pytest.raises(MergeError) as info:
        nanmerge.merge(recipe)
    return str(info.value)


def test_a_data_informed_method_without_statistics_says_how_to_compute_them(mlps: Mlps) -> None:
    message = _problems(_recipe(mlps, "regmean", None))
    assert "gram statistics" in message and "compute_statistics" in message


def test_statistics_for_a_method_that_reads_none_are_refused(mlps: Mlps) -> None:
    assert "reads none" in _problems(_recipe(mlps, "weight_average", mlps.gram))


def test_one_file_per_model(mlps: Mlps) -> None:
    assert "2 file(s) for 3 models" in _problems(_recipe(mlps, "fisher", mlps.fisher[:2]))


def test_statistics_of_the_wrong_kind_are_refused(mlps: Mlps) -> None:
    message = _problems(_recipe(mlps, "regmean", mlps.fisher))
    assert "holds 'fisher' statistics" in message


def test_missing_file_and_wrong_shapes_are_all_reported(mlps: Mlps, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_statistics({"0.weight": torch.ones(5, 5), "3.weight": torch.ones(6, 6)}, bad)
    message = _problems(_recipe(mlps, "regmean", [mlps.gram[0], bad, tmp_path / "none"]))
    assert "none cannot be read" in message
    message = _problems(_recipe(mlps, "regmean", [mlps.gram[0], bad, mlps.gram[2]]))
    assert "'0.weight' in" in message and "(5, 5), expected (4, 4)" in message


def test_statistics_in_some_files_only_are_refused(mlps: Mlps, tmp_path: Path) -> None:
    partial = tmp_path / "partial.safetensors"
    save_statistics({"0.weight": torch.eye(4)}, partial, kind="gram")
    message = _problems(_recipe(mlps, "regmean", [mlps.gram[0], partial, mlps.gram[2]]))
    assert "some files but not all: " in message and "3.weight" in message


def _spy_on_statistics(monkeypatch: pytest.MonkeyPatch) -> list[Statistics | None]:
    """Keep every Statistics the plan opens, so its handles outlive the merge's own references."""
    opened: list[Statistics | None] = []

    def spy(*args: Any) -> Statistics | None:
        opened.append(open_statistics(*args))
        return opened[-1]

    monkeypatch.setattr(_plan, "open_statistics", spy)
    return opened


def _assert_closed(statistics: Statistics | None) -> None:
    """No file descriptor of this process (Linux) is open on, or maps, a statistics file."""
    assert statistics is not None and len(statistics.handles) == len(statistics.paths)
    targets = {str(path.resolve()) for path in statistics.paths}
    fds = Path("/proc/self/fd")
    open_files = {os.path.realpath(fd) for fd in fds.iterdir()} if fds.exists() else set()
    maps = Path("/proc/self/maps")
    mapped = maps.read_text() if maps.exists() else ""
    assert not targets & open_files
    assert not any(target in mapped for target in targets)


def test_statistics_files_are_closed_after_the_merge(
    mlps: Mlps, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _spy_on_statistics(monkeypatch)
    nanmerge.merge(_recipe(mlps, "regmean", mlps.gram))
    assert len(opened) == 1
    _assert_closed(opened[0])


def test_statistics_files_are_closed_when_the_plan_fails(
    mlps: Mlps, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _spy_on_statistics(monkeypatch)
    assert "not a torch device" in _problems(
        {**_recipe(mlps, "regmean", mlps.gram), "device": "nope"}
    )
    assert len(opened) == 1
    _assert_closed(opened[0])

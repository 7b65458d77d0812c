"""LiNeS: a task-vector method's merged delta scaled by alpha + beta * l / (L - 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import nanmerge
from nanmerge import MergeError
from nanmerge.methods import ties

LAYERS = 4
NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)),
    "model.norm.weight",
    "lm_head.weight",
]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(6, 5, generator=gen) if "norm" not in n else torch.randn(5) for n in NAMES
    }


@pytest.fixture
def llama(tmp_path: Path) -> dict[str, Any]:
    base = _tensors(0)
    gen = torch.Generator().manual_seed(1)
    models = [{n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in base.items()}]
    models.append({n: v + 0.3 * torch.randn(v.shape, generator=gen) for n, v in base.items()})
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"ft{i}.safetensors")
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
    recipe = {"base": str(tmp_path / "base.safetensors"), "models": paths}
    return {"recipe": recipe, "base": base, "models": models}


def _expected_scale(name: str, alpha: float, beta: float) -> float:
    """The paper's schedule written out: block l of 4 gets alpha + beta * l / 3."""
    if ".layers." not in name:
        return alpha
    layer = int(name.split(".layers.")[1].split(".")[0])
    return alpha + beta * layer / (LAYERS - 1)


def test_task_arithmetic_with_lines_scales_each_block_linearly(llama: dict[str, Any]) -> None:
    recipe = {**llama["recipe"], "method": "task_arithmetic", "lines": {"beta": 0.6, "alpha": 0.3}}
    merged = nanmerge.merge(recipe)
    assert isinstance(merged, dict)
    for name, base in llama["base"].items():
        tau = sum(m[name] - base for m in llama["models"])
        expected = base + _expected_scale(name, 0.3, 0.6) * tau
        torch.testing.assert_close(merged[name], expected)


def test_the_default_alpha_for_task_arithmetic_is_one_over_the_number_of_tasks(
    llama: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    recipe = {**llama["recipe"], "method": "task_arithmetic", "lines": {"beta": 0.5}}
    report = nanmerge.merge({**recipe, "output": str(out)})
    assert isinstance(report, dict)
    assert report["lines"]["alpha"] == pytest.approx(1 / 2, rel=1e-6)
    assert report["lines"]["beta"] == 0.5
    assert report["lines"]["tensors_outside_blocks"] == 3


def test_the_default_alpha_after_ties_is_the_ratio_of_l1_norms_over_the_tasks(
    llama: dict[str, Any],
) -> None:
    recipe = {**llama["recipe"], "method": "ties", "parameters": {"density": 0.5}}
    merged = nanmerge.merge({**recipe, "lines": {"beta": 0.4}})
    assert isinstance(merged, dict)
    base, models = llama["base"], llama["models"]
    coef = torch.ones(2)
    deltas = {
        n: ties(torch.stack([m[n] for m in models]), coef, base=b, density=0.5, scale=1.0) - b
        for n, b in base.items()
    }
    summed = sum(float(sum(m[n] - b for m in models).abs().sum()) for n, b in base.items())
    alpha = summed / sum(float(d.abs().sum()) for d in deltas.values()) / 2
    for name, b in base.items():
        expected = b + _expected_scale(name, alpha, 0.4) * deltas[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def _problems(recipe: dict[str, Any]) -> str:
    with pytest.raises(MergeError) as caught:
        nanmerge.merge(recipe)
    return str(caught.value)


def test_lines_needs_a_task_vector_method_without_its_own_scale(llama: dict[str, Any]) -> None:
    lines = {"beta": 0.5}
    message = _problems({**llama["recipe"], "method": "weight_average", "lines": lines})
    assert "method 'weight_average' has no base and `scale`" in message
    scaled = {"method": "task_arithmetic", "parameters": {"scale": 0.3}, "lines": lines}
    assert "remove `scale` from `parameters`" in _problems({**llama["recipe"], **scaled})


def test_lines_on_names_without_layers_is_refused_naming_a_tensor(tmp_path: Path) -> None:
    for name in ("base", "ft"):
        save_file({"encoder.weight": torch.randn(3, 3)}, tmp_path / f"{name}.safetensors")
    recipe = {
        "base": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "ft.safetensors")],
        "method": "task_arithmetic",
        "lines": {"beta": 0.5},
    }
    assert "no tensor name has a layer nanmerge can read (e.g. 'encoder.weight')" in _problems(
        recipe
    )


def test_lines_with_slices_is_refused(llama: dict[str, Any]) -> None:
    base, ft = llama["recipe"]["base"], llama["recipe"]["models"][0]
    recipe = {
        "base": base,
        "models": [ft],
        "method": "task_arithmetic",
        "slices": [{"sources": [{"model": ft, "layers": [0, 4]}]}],
        "lines": {"beta": 0.5},
    }
    assert "LiNeS with `slices` is not supported yet" in _problems(recipe)

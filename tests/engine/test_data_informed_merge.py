"""Data-informed merges end to end: statistics files read by name, stacked, passed to the method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import nanmerge
from nanmerge.cli import main
from nanmerge.methods import fisher, regmean, weight_average
from nanmerge.statistics import compute_statistics, save_statistics
from tests.engine.test_statistics_files import Mlps, build_mlps


@pytest.fixture(scope="module")
def mlps(tmp_path_factory: pytest.TempPathFactory) -> Mlps:
    return build_mlps(tmp_path_factory.mktemp("mlps"))


def _stack(paths: list[Path], name: str) -> torch.Tensor:
    return torch.stack([load_file(p)[name] for p in paths])


def test_regmean_merges_linear_layers_by_gram_and_the_rest_by_fallback(mlps: Mlps) -> None:
    recipe = {
        "models": [str(p) for p in mlps.models],
        "method": "regmean",
        "statistics": [str(p) for p in mlps.gram],
    }
    state = nanmerge.merge(recipe)
    coef = torch.ones(3)
    for name in ("0.weight", "0.bias", "3.weight", "3.bias"):  # the linear layers
        stack = torch.stack([s[name] for s in mlps.states])
        expected = regmean(stack, coef, gram=_stack(mlps.gram, name))
        torch.testing.assert_close(state[name], expected)
    counts = _stack(mlps.gram, "0.bias").flatten()  # 16, 32, 48 input rows
    expected_bias = sum(n * s["0.bias"] for n, s in zip(counts, mlps.states, strict=True))
    torch.testing.assert_close(state["0.bias"], expected_bias / counts.sum())
    for name in ("1.weight", "1.bias"):  # the LayerNorm: no Gram, so the fallback
        stack = torch.stack([s[name] for s in mlps.states])
        torch.testing.assert_close(state[name], weight_average(stack, coef))


def test_fisher_with_nan_coefficients_multiplies_each_models_fisher(mlps: Mlps) -> None:
    recipe = {
        "models": [str(p) for p in mlps.models],
        "method": "fisher",
        "coefficients": "nan",
        "statistics": [str(p) for p in mlps.fisher],
    }
    coef = torch.tensor(nanmerge.estimate_coefficients(recipe).per_model)
    assert not torch.allclose(coef, torch.ones(3))
    state = nanmerge.merge(recipe)
    for name in mlps.states[0]:
        stack = torch.stack([s[name] for s in mlps.states])
        expected = fisher(stack, coef, fisher=_stack(mlps.fisher, name))
        torch.testing.assert_close(state[name], expected)


def test_statistics_then_regmean_reproduce_the_joint_least_squares_solution(
    tmp_path: Path,
) -> None:
    # Three linear regressions with different data; each model is its task's least-squares
    # fit, as nn.Linear(bias=False). The merge must equal the fit on all tasks' data pooled.
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=gen, dtype=torch.float64) for n in (12, 40, 150)]
    ys = [x @ torch.randn(5, 2, generator=gen, dtype=torch.float64) for x in xs]
    ys = [y + 0.5 * torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in ys]
    models, grams = [], []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        layer = nn.Linear(5, 2, bias=False)
        layer.weight.data = torch.linalg.lstsq(x, y).solution.T.float()
        models.append(tmp_path / f"m{i}.safetensors")
        save_file({"weight": layer.weight.detach().clone()}, models[-1])
        batches = [x[j : j + 32].float() for j in range(0, len(x), 32)]
        stats = compute_statistics(layer, batches, kind="gram", progress=False)
        grams.append(save_statistics(stats, tmp_path / f"g{i}.safetensors", kind="gram"))
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    out = tmp_path / "out"
    nanmerge.merge(
        {
            "models": [str(p) for p in models],
            "method": "regmean",
            "parameters": {"alpha": 1.0},
            "statistics": [str(p) for p in grams],
            "output": str(out),
        }
    )
    merged = load_file(out / "model.safetensors")["weight"]
    torch.testing.assert_close(merged.double(), joint, atol=1e-5, rtol=1e-5)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["statistics"] == {
        "kind": "gram",
        "files": [str(p) for p in grams],
        "tensors": 1,
    }


def test_cli_merge_takes_one_statistics_flag_per_model(mlps: Mlps, tmp_path: Path) -> None:
    args = ["merge", "--method", "fisher", "--output", str(tmp_path / "out"), "--quiet"]
    for model, stats in zip(mlps.models, mlps.fisher, strict=True):
        args += ["--model", str(model), "--statistics", str(stats)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    state = nanmerge.merge(
        {
            "models": [str(p) for p in mlps.models],
            "method": "fisher",
            "statistics": [str(p) for p in mlps.fisher],
        }
    )
    for name, tensor in state.items():
        torch.testing.assert_close(merged[name], tensor)

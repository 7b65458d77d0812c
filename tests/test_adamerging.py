from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nanmerge
from nanmerge.adamerging import adamerging, entropy, save_coefficients


class TaskNet(nn.Module):
    """A shared body (the merged part) and a task's own head."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.body(x)))
        return out


@pytest.fixture(scope="module")
def problem() -> tuple[dict, list[dict], list[nn.Module], list[list[torch.Tensor]]]:
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in nn.Linear(4, 8).state_dict().items()}
    base = {f"body.{k}": v for k, v in base.items()}
    gen = torch.Generator().manual_seed(1)
    models = [
        {k: v + s * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for s in (0.5, 1.0)
    ]
    modules: list[nn.Module] = [TaskNet(nn.Linear(8, 3)) for _ in models]
    batches = [[torch.randn(8, 4, generator=gen) for _ in range(3)] for _ in models]
    return base, models, modules, batches


def test_entropy_of_uniform_predictions_is_log_classes() -> None:
    torch.testing.assert_close(entropy(torch.zeros(5, 4)), torch.log(torch.tensor(4.0)))


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_learning_lowers_the_entropy_objective(problem, granularity: str) -> None:
    result = adamerging(*problem, granularity=granularity, steps=30, lr=0.05, progress=False)
    assert result.objective_end < result.objective_start - 1e-3
    assert len(result.history) == 30
    assert (result.coefficients.per_model is None) == (granularity == "tensor")


@pytest.mark.parametrize(("old", "new"), [("task", "model"), ("layer", "tensor")])
def test_the_papers_granularity_names_still_work_with_a_deprecation_warning(
    problem, old: str, new: str
) -> None:
    with pytest.warns(DeprecationWarning, match=f"granularity='{new}'"):
        before = adamerging(*problem, granularity=old, steps=3, lr=0.05, progress=False)
    after = adamerging(*problem, granularity=new, steps=3, lr=0.05, progress=False)
    assert before.coefficients.to_json() == after.coefficients.to_json()


def test_same_seed_gives_identical_coefficients_and_another_seed_does_not(problem) -> None:
    runs = [adamerging(*problem, steps=10, lr=0.05, seed=s, progress=False) for s in (3, 3, 4)]
    assert runs[0].coefficients.to_json() == runs[1].coefficients.to_json()
    assert runs[0].history == runs[1].history
    assert runs[0].coefficients.per_tensor != runs[2].coefficients.per_tensor


def test_nan_initialisation_starts_from_nans_layer_wise_coefficients(
    problem, tmp_path: Path
) -> None:
    base, models, _, _ = problem
    save_file(base, tmp_path / "base.safetensors")
    for i, md in enumerate(models):
        save_file(md, tmp_path / f"m{i}.safetensors")
    recipe = {
        "base": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / f"m{i}.safetensors") for i in range(2)],
        "method": "task_arithmetic",
        "coefficients": {"estimator": "nan", "norm_of": "task_vector", "granularity": "tensor"},
    }
    expected = nanmerge.estimate_coefficients(recipe).per_tensor
    result = adamerging(*problem, init="nan", steps=0, progress=False)
    for name, values in result.coefficients.per_tensor.items():
        assert values == pytest.approx(expected[name], rel=1e-5)


def test_saved_coefficients_reproduce_the_learned_merge_through_from_file(
    problem, tmp_path: Path
) -> None:
    base, models, _, _ = problem
    result = adamerging(*problem, steps=5, lr=0.05, scale=0.4, progress=False)
    save_file(base, tmp_path / "base.safetensors")
    for i, md in enumerate(models):
        save_file(md, tmp_path / f"m{i}.safetensors")
    path = save_coefficients(result.coefficients, tmp_path / "ada.json")
    state = nanmerge.merge(
        {
            "base": str(tmp_path / "base.safetensors"),
            "models": [str(tmp_path / f"m{i}.safetensors") for i in range(2)],
            "method": "task_arithmetic",
            "parameters": {"scale": 0.4},
            "coefficients": {"estimator": "from_file", "path": str(path)},
        }
    )
    for name, theta0 in base.items():
        c = result.coefficients.per_tensor[name]
        expected = theta0 + 0.4 * sum(
            ci * (md[name] - theta0) for ci, md in zip(c, models, strict=True)
        )
        torch.testing.assert_close(state[name], expected)

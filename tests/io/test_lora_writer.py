"""A merge written as a LoRA adapter: truncated SVD of merged - base, read back over the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nanmerge import MergeError, merge
from nanmerge.cli import main
from nanmerge.io import open_checkpoint, open_model
from nanmerge.io._lora_writer import low_rank
from tests.conftest import Family, build_family

SHAPES = {"layer.weight": (6, 5), "layer.bias": (6,), "head.weight": (3, 6)}


def recipe(family: Family, output: Path, **extra: object) -> dict[str, object]:
    return {
        "base": str(family.base),
        "models": [str(m) for m in family.models],
        "method": "task_arithmetic",
        "parameters": {"scale": 0.5},
        "output": str(output),
        **extra,
    }


def test_full_rank_reproduces_the_delta_to_float_precision() -> None:
    delta = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    b, a = low_rank(delta, 5)
    assert b.shape == (7, 5) and a.shape == (5, 5)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)


def test_a_rank_two_delta_is_recovered_exactly_at_rank_two() -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(8, 2, generator=gen) @ torch.randn(2, 6, generator=gen)
    b, a = low_rank(delta, 2)
    assert b.shape == (8, 2) and a.shape == (2, 6)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)


def test_error_decreases_with_rank_as_eckart_young_says() -> None:
    delta = torch.randn(9, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    singular = torch.linalg.svdvals(delta)
    errors = []
    for rank in range(1, 8):
        b, a = low_rank(delta, rank)
        error = float((delta - (b @ a).double()).norm() / delta.norm())
        # the best rank-r error is the norm of the discarded singular values
        expected = float(singular[rank:].norm() / singular.norm())
        assert error == pytest.approx(expected, abs=1e-5)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


def test_randomized_svd_of_a_large_matrix_is_near_the_optimal_fit() -> None:
    # rank 5 of a 300 x 200 matrix takes the randomized path (r + 10 oversampling < 200 / 4)
    gen = torch.Generator().manual_seed(3)
    signal = torch.randn(300, 5, generator=gen) @ torch.randn(5, 200, generator=gen)
    delta = signal + 1e-3 * torch.randn(300, 200, generator=gen)
    b, a = low_rank(delta, 5)
    assert b.shape == (300, 5) and a.shape == (5, 200)
    singular = torch.linalg.svdvals(delta.double())
    optimal = float(singular[5:].norm() / singular.norm())
    error = float((delta - b @ a).norm() / delta.norm())
    assert optimal <= error <= optimal * 1.01 + 1e-6
    b, a = low_rank(signal, 5)
    torch.testing.assert_close(b @ a, signal, rtol=0, atol=1e-4)
    torch.testing.assert_close(low_rank(delta, 5)[0], low_rank(delta, 5)[0])  # seeded


def test_adapter_read_back_over_the_base_equals_the_low_rank_merge(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", shapes=SHAPES)
    full = merge(recipe(family, tmp_path / "full"))
    assert isinstance(full, dict)
    merged = load_file(tmp_path / "full" / "model.safetensors")
    report = merge(recipe(family, tmp_path / "ad", output_format="lora", rank=2))
    assert isinstance(report, dict)
    with open_model(tmp_path / "ad", base=open_checkpoint(family.base)) as adapter:
        for name in ("layer.weight", "head.weight"):
            delta = merged[name] - family.base_tensors[name]
            u, s, vh = torch.linalg.svd(delta)
            best = (u[:, :2] * s[:2]) @ vh[:2]  # the rank-2 truncation, computed independently
            torch.testing.assert_close(adapter[name], family.base_tensors[name] + best)
            error = float((delta - best).norm() / delta.norm())
            lora = report["output"]["lora"]
            assert lora["tensors"][name]["relative_error"] == pytest.approx(error, abs=1e-5)
        # the bias changed and is not a matrix: stored in full, so it comes back exactly
        assert torch.equal(adapter["layer.bias"], merged["layer.bias"])
        assert torch.equal(adapter["position_ids"], family.base_tensors["position_ids"])
    assert lora["stored_full"] == ["layer.bias"]


def test_adapter_folder_is_a_peft_adapter_with_scaling_one(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", shapes=SHAPES)
    merge(recipe(family, tmp_path / "ad", output_format="lora", rank=4))
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "merge_report.json",
    ]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4
    assert config["target_modules"] == ["head", "layer"]
    assert config["base_model_name_or_path"] == str(family.base)
    # head.weight is 3 x 6: its rank is capped at 3, with alpha 3 so the scaling stays 1
    assert config["rank_pattern"] == {"head": 3} and config["alpha_pattern"] == {"head": 3}
    assert config["modules_to_save"] is None  # layer.bias belongs to a LoRA-targeted module
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert tensors["base_model.model.layer.lora_A.weight"].shape == (4, 5)
    assert tensors["base_model.model.layer.lora_B.weight"].shape == (6, 4)
    assert tensors["base_model.model.head.lora_A.weight"].shape == (3, 6)
    assert "base_model.model.layer.bias" in tensors


def test_full_rank_adapter_reproduces_the_merge(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", shapes=SHAPES)
    merge(recipe(family, tmp_path / "full"))
    merged = load_file(tmp_path / "full" / "model.safetensors")
    report = merge(recipe(family, tmp_path / "ad", output_format="lora", rank=6))
    assert isinstance(report, dict)
    assert report["output"]["lora"]["max_relative_error"] < 1e-5
    with open_model(tmp_path / "ad", base=open_checkpoint(family.base)) as adapter:
        for name, tensor in merged.items():
            torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=1e-5)


def test_changed_vectors_of_untargeted_modules_go_to_modules_to_save(tmp_path: Path) -> None:
    base = {"norm.weight": torch.ones(4), "q.weight": torch.zeros(4, 4)}
    tuned = {"norm.weight": torch.full((4,), 2.0), "q.weight": torch.zeros(4, 4)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "ft.safetensors")
    report = merge(
        {
            "base": str(tmp_path / "base.safetensors"),
            "models": [str(tmp_path / "ft.safetensors")],
            "method": "weight_average",
            "output": str(tmp_path / "ad"),
            "output_format": "lora",
            "rank": 2,
        }
    )
    assert isinstance(report, dict)
    assert report["output"]["lora"]["modules_to_save"] == ["norm"]
    assert report["output"]["lora"]["unchanged_tensors"] == 1
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["norm"] and config["target_modules"] == []


def test_a_failed_lora_merge_leaves_no_folder(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", shapes=SHAPES)
    broken = dict(family.model_tensors[1])
    broken["head.weight"] = torch.full((3, 6), float("nan"))
    save_file(broken, family.models[1])
    with pytest.raises(MergeError, match="NaN"):
        merge(recipe(family, tmp_path / "ad", output_format="lora", rank=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"output_format": "lora"}, "set both"),
        ({"output_format": "lora", "rank": 2, "base": None}, "set both"),
        ({"rank": 2}, "applies only to output_format: lora"),
        ({"output_format": "lora", "rank": 0}, "rank"),
    ],
)
def test_lora_output_settings_are_checked_up_front(
    tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    family = build_family(tmp_path / "in", shapes=SHAPES)
    with pytest.raises(MergeError, match=message):
        merge(recipe(family, tmp_path / "ad", **extra))
    assert not (tmp_path / "ad").exists()


def test_merge_command_writes_an_adapter_and_prints_its_error(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", shapes=SHAPES)
    args = ["merge", "--base", str(family.base), "--method", "task_arithmetic"]
    args += [arg for m in family.models for arg in ("--model", str(m))]
    args += ["--output-format", "lora", "--rank", "3", "--output", str(tmp_path / "ad"), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 3
    args[-1:] = []  # without --quiet the summary reports the approximation
    args[args.index("--output") + 1] = str(tmp_path / "ad2")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "LoRA adapter of rank 3: 2 matrices, largest relative error" in result.output


class Toy(torch.nn.Module):
    """Two linear layers, named as a checkpoint of them would be."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 6)
        self.fc2 = torch.nn.Linear(6, 3)


def test_peft_loads_the_written_adapter_and_reproduces_the_merge(tmp_path: Path) -> None:
    """Peer check: PEFT itself applies our adapter to the base and gets the full merge."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Toy()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    models = []
    for i in range(2):
        tuned = {
            k: v + 0.1 * torch.randn_like(v) if k.endswith("weight") else v.clone()
            for k, v in base.state_dict().items()
        }
        save_file(tuned, tmp_path / f"ft{i}.safetensors")
        models.append(str(tmp_path / f"ft{i}.safetensors"))
    common = {
        "base": str(tmp_path / "base.safetensors"),
        "models": models,
        "method": "task_arithmetic",
        "coefficients": "nan",
    }
    full = merge(common)
    merge({**common, "output": str(tmp_path / "adapter"), "output_format": "lora", "rank": 5})
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    assert isinstance(full, dict)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, full[name], rtol=0, atol=1e-5)

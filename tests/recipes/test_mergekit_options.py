"""mergekit's normalize, rescale, int8_mask, dtype and out_dtype, merged on tiny models and
checked against mergekit's formulas written out here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nanmerge import MergeError
from nanmerge.recipes import from_mergekit
from tests.recipes._helpers import SHAPES, hf_model, merge_yaml, merged, report, run


@pytest.fixture
def models(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: hf_model(tmp_path / name, seed) for seed, name in enumerate("bxy")}


def mergekit_run(tmp_path: Path, data: dict[str, Any], out: str = "out") -> Path:
    data = {**data, "base_model": str(tmp_path / "b")} if "base_model" in data else data
    for entry in data["models"]:
        entry["model"] = str(tmp_path / entry["model"])
    result = run(["run", str(merge_yaml(tmp_path, data)), str(tmp_path / out), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / out


def test_linear_without_normalize_is_the_plain_weighted_sum(
    tmp_path: Path, models: dict[str, dict[str, torch.Tensor]]
) -> None:
    data = {
        "merge_method": "linear",
        "models": [
            {"model": "x", "parameters": {"weight": 0.7}},
            {"model": "y", "parameters": {"weight": 0.6}},
        ],
        "parameters": {"normalize": False},
    }
    out = merged(mergekit_run(tmp_path, data))
    for name in SHAPES:
        expected = 0.7 * models["x"][name] + 0.6 * models["y"][name]  # no division by 1.3
        torch.testing.assert_close(out[name], expected)


def test_ties_without_normalize_sums_the_agreeing_weighted_task_vectors(
    tmp_path: Path, models: dict[str, dict[str, torch.Tensor]]
) -> None:
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": "x", "parameters": {"weight": 0.5}},
            {"model": "y", "parameters": {"weight": 0.8}},
        ],
        "parameters": {"normalize": False},  # density defaults to 1: nothing trimmed
    }
    out = merged(mergekit_run(tmp_path, data))
    for name in SHAPES:
        base = models["b"][name]
        weighted = torch.stack([0.5 * (models["x"][name] - base), 0.8 * (models["y"][name] - base)])
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        expected = base + (weighted * (weighted.sign() == sign)).sum(0)
        torch.testing.assert_close(out[name], expected)


def test_dare_rescale_true_scales_the_kept_entries_to_the_task_vectors_l1_norm(
    tmp_path: Path, models: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Same seed, same masks: rescale: false keeps mask * tau (times lambda); rescale: true
    multiplies that by |tau|_1 / |mask * tau|_1, per tensor (mergekit's L1 rescale)."""
    outs = []
    for rescale in (True, False):
        data = {
            "merge_method": "dare_linear",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": 1.0}}],
            "parameters": {"density": 0.5, "rescale": rescale, "lambda": 0.9},
        }
        outs.append(merged(mergekit_run(tmp_path, data, out=f"out-{rescale}")))
    for name in SHAPES:
        base, tau = models["b"][name], models["x"][name] - models["b"][name]
        rescaled, masked = outs[0][name] - base, outs[1][name] - base
        assert (masked != 0).any() and (masked == 0).any()  # some entries dropped, some kept
        kept = masked != 0
        torch.testing.assert_close(masked[kept], 0.9 * tau[kept])  # the mask alone
        ratio = tau.abs().sum() / tau[kept].abs().sum()
        torch.testing.assert_close(rescaled, masked * ratio)


def test_rescale_changes_nothing_where_nothing_is_dropped() -> None:
    for method, params in [("task_arithmetic", {}), ("ties", {"density": 1.0})]:
        data = {
            "merge_method": method,
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": 1.0}}],
            "parameters": {"rescale": True, **params},
        }
        assert from_mergekit(data)["parameters"]["scale"] == 1.0


def test_int8_mask_is_accepted_with_a_note_in_the_report(
    tmp_path: Path, models: dict[str, dict[str, torch.Tensor]]
) -> None:
    data = {
        "merge_method": "dare_ties",
        "base_model": "b",
        "models": [{"model": "x", "parameters": {"weight": 1.0}}],
        "parameters": {"int8_mask": True},
    }
    notes = report(mergekit_run(tmp_path, data))["recipe"]["notes"]
    assert len(notes) == 1 and "int8_mask" in notes[0] and "float32" in notes[0]


@pytest.mark.parametrize(
    ("fields", "written", "compute_note"),
    [
        ({"out_dtype": "float16"}, torch.float16, None),
        ({"dtype": "bfloat16"}, torch.bfloat16, "bfloat16"),
        ({"dtype": "bfloat16", "out_dtype": "float16"}, torch.float16, "bfloat16"),
        ({"dtype": "float32", "out_dtype": "bf16"}, torch.bfloat16, None),
    ],
)
def test_out_dtype_sets_the_output_and_a_16_bit_dtype_gets_a_note(
    tmp_path: Path,
    models: dict[str, dict[str, torch.Tensor]],
    fields: dict[str, str],
    written: torch.dtype,
    compute_note: str | None,
) -> None:
    data = {
        "merge_method": "linear",
        "models": [{"model": "x", "parameters": {"weight": 1.0}}],
        **fields,
    }
    folder = mergekit_run(tmp_path, data)
    out = merged(folder)
    for name in SHAPES:
        assert out[name].dtype == written
        assert torch.equal(out[name], models["x"][name].to(written))  # rounded once, from float32
    notes = report(folder)["recipe"]["notes"]
    if compute_note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and f"mergekit computes in {compute_note}" in notes[0]


def test_every_unsupported_part_is_listed_in_one_error() -> None:
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {"rescale": [{"filter": "mlp", "value": True}]},
        "modules": {"text_decoder": {}},
        "chat_template": "llama3",
        "dtype": "int8",
    }
    with pytest.raises(MergeError) as info:
        from_mergekit(data, where="r.yml")
    message = str(info.value)
    assert "4 feature(s)" in message
    for part in ("list for `rescale`", "modules", "'llama3'", "dtype 'int8'"):
        assert part in message

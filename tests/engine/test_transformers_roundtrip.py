"""A merged folder of a tiny generated Hugging Face model loads with transformers as is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nanmerge

transformers = pytest.importorskip("transformers")


def tiny_bert(folder: Path, seed: int, base: torch.nn.Module | None = None) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    if base is not None:
        with torch.no_grad():
            for p, b in zip(model.parameters(), base.parameters(), strict=True):
                p.copy_(b + 0.01 * torch.randn_like(b))
    model.save_pretrained(folder)
    return model


def test_merged_folder_loads_with_automodel_and_holds_the_merge(tmp_path: Path) -> None:
    base = tiny_bert(tmp_path / "base", 0)
    fts = [tiny_bert(tmp_path / f"ft{i}", i + 1, base) for i in range(2)]
    out = tmp_path / "merged"
    report = nanmerge.merge(
        {
            "base": str(tmp_path / "base"),
            "models": [str(tmp_path / "ft0"), str(tmp_path / "ft1")],
            "method": "task_arithmetic",
            "parameters": {"scale": 1.0},
            "coefficients": "nan",
            "output": str(out),
        }
    )
    assert isinstance(report, dict)
    assert (out / "config.json").exists()
    coef = report["coefficients"]["coefficients"]
    merged = transformers.AutoModel.from_pretrained(out)
    tuned = [dict(ft.named_parameters()) for ft in fts]
    expected = {
        name: b + sum(c * (t[name] - b) for c, t in zip(coef, tuned, strict=True))
        for name, b in base.named_parameters()
    }
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, expected[name].detach())

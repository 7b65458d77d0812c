"""Tiny Hugging Face model folders and a CLI runner for the mergekit recipe tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from nanmerge.cli import main

SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4)}


def hf_model(
    folder: Path, seed: int, *, template: str | None = None, vocab: str = "base"
) -> dict[str, torch.Tensor]:
    """A model folder: model.safetensors, config.json and tokenizer files naming `vocab`."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "vocab": vocab}))
    config: dict[str, Any] = {"tokenizer_class": "Tiny", "vocab": vocab}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": vocab}))
    return tensors


def run(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def merge_yaml(tmp_path: Path, data: dict[str, Any], name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def merged(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def report(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "merge_report.json").read_text())
    return data

"""Fine-tuned models as checkpoints on disk, cached under a key of every setting that made them.

The benchmark must exercise the product, so every model it merges is a real safetensors file
that `nanmerge.merge` reads by path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# Bump when training code changes, so stale cached checkpoints are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class ModelSet:
    """One merge problem: the base checkpoint, the fine-tuned ones, and their data sizes."""

    base: Path
    models: tuple[Path, ...]
    data_sizes: tuple[int, ...]
    names: tuple[str, ...]

    def subset(self, indices: tuple[int, ...]) -> ModelSet:
        return ModelSet(
            self.base,
            tuple(self.models[i] for i in indices),
            tuple(self.data_sizes[i] for i in indices),
            tuple(self.names[i] for i in indices),
        )


def cache_folder(cache_dir: Path, suite: str, settings: Mapping[str, Any]) -> Path:
    """A folder named by a hash of every setting, so a change of any setting retrains."""
    blob = json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return cache_dir / suite / digest


def save_checkpoint(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write via a temporary name and rename, so an interrupted run never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))

"""Session-wide helpers: tiny model families built on disk, never downloaded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from nanmerge.methods import register
from nanmerge.methods._registry import _METHODS


@dataclass
class Family:
    """A base checkpoint and M fine-tuned ones, with the tensors they hold."""

    base: Path
    models: list[Path]
    base_tensors: dict[str, torch.Tensor]
    model_tensors: list[dict[str, torch.Tensor]]


def build_family(
    folder: Path,
    *,
    m: int = 3,
    shapes: dict[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    delta_scales: tuple[float, ...] | None = None,
) -> Family:
    """Write base.safetensors and ft{i}.safetensors with distinct task-vector sizes per model."""
    shapes = shapes or {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4)}
    scales = delta_scales or tuple(0.1 * (i + 1) for i in range(m))
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(5, dtype=torch.int64)
    save_file(base, folder / "base.safetensors")
    models, tensors = [], []
    for i, scale in enumerate(scales):
        ft = {
            k: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(dtype)
            if v.dtype.is_floating_point
            else v.clone()
            for k, v in base.items()
        }
        path = folder / f"ft{i}.safetensors"
        save_file(ft, path)
        models.append(path)
        tensors.append(ft)
    return Family(folder / "base.safetensors", models, base, tensors)


@pytest.fixture
def family(tmp_path: Path) -> Family:
    return build_family(tmp_path / "inputs")


@pytest.fixture
def temporary() -> Iterator[Callable[..., Callable[..., Any]]]:
    """Register test-only methods, removed again afterwards."""
    added: list[str] = []

    def add(**options: Any) -> Callable[..., Any]:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            added.append(fn.__name__)
            return register(reference="test", **options)(fn)

        return decorate

    yield add
    for name in added:
        _METHODS.pop(name, None)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray on 2 CPUs for a module's tests (ray is imported only where used)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()

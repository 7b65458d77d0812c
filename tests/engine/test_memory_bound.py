"""Peak memory stays within the bound the report states, on a model far larger than it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanmerge.methods import METHODS, STATISTIC_KINDS
from nanmerge.statistics import save_statistics

# Runs in a fresh interpreter so pytest's own memory does not blur the measurement.
# /proc/self/clear_refs resets the peak RSS (VmHWM) after imports and a warm-up merge.
PROBE = """
import json, sys
import nanmerge

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

recipe = json.loads(sys.argv[1])
warm = dict(recipe, output=recipe["output"] + "-warm")
nanmerge.merge(warm)
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
report = nanmerge.merge(recipe)
print(json.dumps({"growth": status("VmHWM:") - before, "bound": report["memory"]["bound_bytes"]}))
"""


def _measure(tmp_path: Path, recipe: dict[str, object]) -> dict[str, int]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(recipe)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    measured: dict[str, int] = json.loads(run.stdout.strip().splitlines()[-1])
    return measured


def _family(
    tmp_path: Path, n_tensors: int, shape: tuple[int, int], m: int
) -> tuple[str, list[str], int]:
    """A base and m fine-tunes on disk; their paths and the input bytes in all."""
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(shape, generator=gen) for i in range(n_tensors)}
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for j in range(m):
        ft = {k: v + 0.01 * torch.randn(shape, generator=gen) for k, v in base.items()}
        save_file(ft, tmp_path / f"ft{j}.safetensors")
        paths.append(str(tmp_path / f"ft{j}.safetensors"))
    return str(tmp_path / "base.safetensors"), paths, (m + 1) * n_tensors * shape[0] * shape[1] * 4


@pytest.mark.parametrize(
    ("n_tensors", "shape", "method", "m"),
    [
        (160, (256, 256), "ties", 3),  # tensors below one chunk
        (20, (1536, 1024), "ties", 3),  # above one chunk: streamed cuts, chunked merge
        (60, (768, 1024), "slerp", 2),  # a whole-stack method
    ],
)
def test_peak_memory_growth_stays_within_the_reported_bound(
    tmp_path: Path, n_tensors: int, shape: tuple[int, int], method: str, m: int
) -> None:
    base, paths, total_input = _family(tmp_path, n_tensors, shape, m)
    recipe = {
        "base": base,
        "models": paths,
        "method": method,
        "coefficients": "nan",
        "output": str(tmp_path / "merged"),
        "max_shard_size": "20MB",
    }
    measured = _measure(tmp_path, recipe)
    assert total_input > 5 * measured["bound"]
    # allow 16 MiB for interpreter and allocator overhead beyond the stated working set
    assert measured["growth"] <= measured["bound"] + 16 * 2**20, measured


# Parameters a method requires (no default), for the test below.
REQUIRED: dict[str, dict[str, object]] = {"nearswap": {"t": 1e-3}}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_stays_within_the_memory_cost_it_states(tmp_path: Path, method: str) -> None:
    """The registry's memory cost of each method, statistics included, holds when measured."""
    spec = METHODS[method]
    m = spec.max_models or 3
    shape = (128, 128)
    base, paths, total_input = _family(tmp_path, 100, shape, m)
    recipe: dict[str, object] = {
        "base": base,
        "models": paths,
        "method": method,
        "parameters": REQUIRED.get(method, {}),
        "output": str(tmp_path / "merged"),
        "max_shard_size": "20MB",
    }
    if spec.statistics:
        kind = spec.statistics[0]
        stored = STATISTIC_KINDS[kind].file_shape(shape)
        assert stored is not None
        x = torch.randn(2 * stored[-1], stored[-1])
        value = x.T @ x if stored != shape else torch.rand(shape) + 0.1
        names = [f"layers.{i}.weight" for i in range(100)]
        recipe["statistics"] = [
            str(save_statistics({n: value.clone() for n in names}, tmp_path / f"s{j}", kind=kind))
            for j in range(m)
        ]
    measured = _measure(tmp_path, recipe)
    assert total_input > 5 * measured["bound"]
    assert measured["growth"] <= measured["bound"] + 16 * 2**20, measured


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"conventions": "mergekit", "density": 0.4}),
        ("breadcrumbs", {"conventions": "mergekit", "rescale": "l1"}),
        ("ties", {"rescale": "l1"}),
        ("dare_linear", {"rescale": "l1", "density": 0.4}),
    ],
)
def test_the_bound_holds_for_preparations_over_whole_tensors_far_above_a_chunk(
    tmp_path: Path, method: str, params: dict[str, object]
) -> None:
    """mergekit's sorts, L1 factors and DARE's drawn masks span the whole tensor before its
    chunks merge; here a tensor is 16 chunks, so the bound's L terms must hold them."""
    base, paths, _ = _family(tmp_path, 2, (4096, 2048), 3)
    recipe = {
        "base": base,
        "models": paths,
        "method": method,
        "parameters": params,
        "output": str(tmp_path / "merged"),
        "seed": 0,
    }
    measured = _measure(tmp_path, recipe)
    assert measured["growth"] <= measured["bound"] + 16 * 2**20, measured

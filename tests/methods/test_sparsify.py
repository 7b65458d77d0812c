from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanmerge.methods import tensor_generator
from nanmerge.methods._sparsify import band_mask, keep_count, magnitude_mask, random_mask


def draws(seed: int, name: str) -> list[float]:
    return torch.rand(8, generator=tensor_generator(seed, name)).tolist()


def test_two_generators_for_the_same_seed_and_name_draw_the_same() -> None:
    assert draws(0, "model.layers.0.weight") == draws(0, "model.layers.0.weight")


def test_draws_depend_on_the_name_and_the_seed() -> None:
    assert draws(0, "a") != draws(0, "b")
    assert draws(0, "a") != draws(1, "a")


def test_draws_ignore_global_rng_state_and_other_generators() -> None:
    first = draws(3, "x")
    torch.manual_seed(999)
    torch.rand(100)
    draws(3, "y")
    assert draws(3, "x") == first


def test_draws_are_stable_across_processes() -> None:
    script = (
        "import torch; from nanmerge.methods import tensor_generator; "
        "print(torch.rand(8, generator=tensor_generator(5, 'lm_head.weight')).tolist())"
    )
    # PYTHONHASHSEED=0 turns off the str-hash salt this process has, so hash() differs here
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == draws(5, "lm_head.weight")


def test_draws_do_not_depend_on_thread_or_order() -> None:
    names = [f"layer.{i}" for i in range(16)]
    sequential = {n: draws(0, n) for n in names}
    with ThreadPoolExecutor(4) as pool:
        threaded = dict(zip(names[::-1], pool.map(lambda n: draws(0, n), names[::-1]), strict=True))
    assert threaded == sequential


@pytest.mark.parametrize(
    ("fraction", "numel", "count"),
    [(0.5, 5, 3), (0.5, 3, 2), (0.29, 100, 29), (0.2, 2, 0), (1.0, 7, 7), (0.01, 10, 0)],
)
def test_keep_count_rounds_half_up(fraction: float, numel: int, count: int) -> None:
    assert keep_count(fraction, numel) == count


def test_magnitude_mask_keeps_at_least_one_entry() -> None:
    mask = magnitude_mask(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), 0.2)
    assert mask.tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("density", [0.1, 0.33, 0.5, 0.9])
def test_masks_keep_exact_counts_per_model_despite_equal_magnitudes(density: float) -> None:
    tau = torch.ones(3, 4, 25)
    tau[1] *= -1
    assert (
        magnitude_mask(tau, density).reshape(3, -1).sum(dim=1).tolist()
        == [keep_count(density, 100)] * 3
    )
    band = band_mask(tau, density=density, gamma=0.05)
    assert band.reshape(3, -1).sum(dim=1).tolist() == [keep_count(density, 100)] * 3


def test_random_mask_draws_all_models_at_once_from_the_generator() -> None:
    shape = torch.Size([3, 1000])
    mask = random_mask(shape, 0.3, tensor_generator(0, "w"), torch.device("cpu"))
    expected = torch.rand(shape, generator=tensor_generator(0, "w")) < 0.3
    assert torch.equal(mask, expected)
    assert 0.25 < float(mask.float().mean()) < 0.35

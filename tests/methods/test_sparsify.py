from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from nanmerge.methods import tensor_generator
from nanmerge.methods._sparsify import DRAW, band_of, keep_count, keep_probability, random_mask


def draws(seed: int, name: str) -> list[float]:
    return tensor_generator(seed, name).random(8).tolist()


def test_two_generators_for_the_same_seed_and_name_draw_the_same() -> None:
    assert draws(0, "model.layers.0.weight") == draws(0, "model.layers.0.weight")


def test_draws_depend_on_the_name_and_the_seed() -> None:
    assert draws(0, "a") != draws(0, "b")
    assert draws(0, "a") != draws(1, "a")


def test_draws_ignore_global_rng_state_and_other_generators() -> None:
    first = draws(3, "x")
    torch.manual_seed(999)
    torch.rand(100)
    np.random.seed(999)
    np.random.rand(100)
    draws(3, "y")
    assert draws(3, "x") == first


def test_draws_are_stable_across_processes() -> None:
    script = (
        "import torch; from nanmerge.methods import tensor_generator; "
        "print(tensor_generator(5, 'lm_head.weight').random(8).tolist())"
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


def band_mask(tau: torch.Tensor, *, density: float, gamma: float = 0.0) -> torch.Tensor:
    """Each model's band over its own |tau|, stacked like tau."""
    rows = [band_of(r.abs(), density=density, gamma=gamma).mask(r.abs()) for r in tau.flatten(1)]
    return torch.stack(rows).reshape(tau.shape)


def test_magnitude_band_keeps_at_least_one_entry() -> None:
    mask = band_mask(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), density=0.2)
    assert mask.tolist() == [[0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("density", [0.1, 0.33, 0.5, 0.9])
def test_masks_keep_exact_counts_per_model_despite_equal_magnitudes(density: float) -> None:
    tau = torch.ones(3, 4, 25)
    tau[1] *= -1
    assert (
        band_mask(tau, density=density).reshape(3, -1).sum(dim=1).tolist()
        == [keep_count(density, 100)] * 3
    )
    band = band_mask(tau, density=density, gamma=0.05)
    assert band.reshape(3, -1).sum(dim=1).tolist() == [keep_count(density, 100)] * 3


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1 / 65536])
def test_random_mask_keeps_entries_with_the_rounded_density_independently_per_model(
    density: float,
) -> None:
    shape = torch.Size([3, 10, 60_000])  # 600_000 entries: blocks of DRAW, the last partial
    mask = random_mask(shape, density, tensor_generator(0, "w"), torch.device("cpu"))
    p, n = keep_probability(density), 600_000
    assert abs(p - density) <= 2**-17
    rows = mask.reshape(3, -1).double()
    for row in rows:  # within 5 standard deviations of the binomial count
        assert abs(float(row.sum()) - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1
    if 0.05 < p < 0.95:
        agree = float((rows[0] == rows[1]).double().mean())  # independent rows: p^2 + (1-p)^2
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.005


def test_random_mask_of_chunks_continuing_one_generator_equals_the_whole_mask() -> None:
    whole = random_mask(torch.Size([2, 5 * DRAW + 7]), 0.5, tensor_generator(1, "w"), "cpu")
    gen = tensor_generator(1, "w")
    chunks = [
        random_mask(torch.Size([2, min(2 * DRAW, 5 * DRAW + 7 - b)]), 0.5, gen, "cpu")
        for b in range(0, 5 * DRAW + 7, 2 * DRAW)
    ]
    assert torch.equal(torch.cat(chunks, dim=1), whole)

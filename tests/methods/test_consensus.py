"""Consensus (TALL masks) and EMR: hand-computed examples, invariants, where the coefficient
enters, and the checks that refuse bad input before any work."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from nanmerge._types import MergeError
from nanmerge.config import load_recipe
from nanmerge.engine import check_recipe
from nanmerge.methods import consensus, emr

# Three task vectors over five entries, on a base of ones. By hand: tau_MTL = their sum =
# [1.5, 0.25, -1, 0.2, 0]; TALL masks at lambda 0.6 (|tau_t| > 0.6 |tau_MTL - tau_t|):
#   entry 0: 1 > 0.3, 1 > 0.3, 0.5 > 1.2  -> T T F (2 tasks)
#   entry 1: 0.5 > 0.15, 0.5 > 0.45, 0.25 > 0 -> T T T (3)
#   entry 2: 1 > 0, 0 > 0.6, 0 > 0.6      -> T F F (1)
#   entry 3: 0 > 0.12, 0.2 > 0, 0 > 0.12  -> F T F (1)
#   entry 4: 2 > 1.2, 1 > 0.6, 1 > 0.6    -> T T T (3)
TAUS = torch.tensor(
    [
        [1.0, 0.5, -1.0, 0.0, 2.0],
        [1.0, -0.5, 0.0, 0.2, -1.0],
        [-0.5, 0.25, 0.0, 0.0, -1.0],
    ]
)
BASE = torch.ones(5)
TALL = torch.tensor(
    [[1, 1, 1, 0, 1], [1, 1, 0, 1, 1], [0, 1, 0, 0, 1]], dtype=torch.bool
)  # per task, from the table above
MULTI_TASK = torch.tensor([1.5, 0.25, -1.0, 0.2, 0.0])
# EMR by hand: sign(sum) = [+, +, -, +, 0]; m_t = tau_t agrees with it; tau_uni = the
# largest agreeing magnitude with that sign = [1, 0.5, -1, 0.2, 0].
EMR_MASKS = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
UNIFIED = torch.tensor([1.0, 0.5, -1.0, 0.2, 0.0])
# lambda_t = sum |tau_t| / sum |m_t tau_uni|: 4.5 / 2.5, 2.7 / 1.2, 1.75 / 0.5
RESCALERS = [1.8, 2.25, 3.5]


class Kept:
    """A Record that holds what the method notes and keeps."""

    def __init__(self) -> None:
        self.notes: dict[str, Any] = {}
        self.kept: dict[str, torch.Tensor] = {}

    def note(self, key: str, value: float | int | str) -> None:
        self.notes[key] = value

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        self.kept[key] = tensor


def _models() -> torch.Tensor:
    return BASE + TAUS


def test_consensus_keeps_the_entries_two_tasks_agree_on_by_hand() -> None:
    merged = consensus(_models(), torch.ones(3), base=BASE)
    # k = 2 keeps entries 0, 1, 4 of tau_MTL, scaled by 0.3
    torch.testing.assert_close(merged, torch.tensor([1.45, 1.075, 1.0, 1.0, 1.0]))


def test_consensus_exports_the_tall_masks_and_tau_mtl_outside_the_consensus() -> None:
    record = Kept()
    consensus(_models(), torch.ones(3), base=BASE, export_masks=True, record=record)
    assert torch.equal(
        record.kept["tall_masks"], torch.from_numpy(np.packbits(TALL.numpy(), axis=1))
    )
    # entries 2 and 3 are on in one mask each, below k = 2: their tau_MTL is kept
    torch.testing.assert_close(record.kept["tall_outside"], torch.tensor([-1.0, 0.2]))
    assert record.notes == {"consensus_kept": 3}


def test_consensus_keeps_nothing_without_export_masks() -> None:
    record = Kept()
    consensus(_models(), torch.ones(3), base=BASE, record=record)
    assert record.kept == {}


@pytest.mark.parametrize(("k", "kept"), [(1, [1, 1, 1, 1, 1]), (3, [0, 1, 0, 0, 1])])
def test_k_sets_how_many_masks_must_agree(k: int, kept: list[int]) -> None:
    merged = consensus(_models(), torch.ones(3), base=BASE, k=k)
    torch.testing.assert_close(merged, BASE + 0.3 * torch.tensor(kept) * MULTI_TASK)


def test_a_larger_lambda_makes_tall_masks_stricter() -> None:
    # at lambda 1.2 entry 0's third mask is still off (0.5 > 2.4 fails) and so are task 0's
    # at entry 4 (2 > 2.4 fails) and task 1's there (1 > 1.2 fails): entry 4 has one mask
    merged = consensus(_models(), torch.ones(3), base=BASE, tall_lambda=1.2)
    torch.testing.assert_close(merged[4], torch.tensor(1.0))
    torch.testing.assert_close(merged[0], torch.tensor(1.45))


def test_emr_merges_base_plus_the_elected_vector_by_hand() -> None:
    record = Kept()
    merged = emr(_models(), torch.ones(3), base=BASE, record=record)
    torch.testing.assert_close(merged, BASE + UNIFIED)
    packed = torch.from_numpy(np.packbits(EMR_MASKS.numpy(), axis=1))
    assert torch.equal(record.kept["emr_masks"], packed)
    sums = record.kept["emr_sums"].squeeze(-1)
    assert sums.dtype == torch.float64 and sums.shape == (2, 3)
    torch.testing.assert_close(sums[0] / sums[1], torch.tensor(RESCALERS, dtype=torch.float64))


def test_one_model_with_k_1_is_task_arithmetic() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(7, 3, generator=gen)
    model = base + torch.randn(1, 7, 3, generator=gen)
    merged = consensus(model, torch.tensor([1.7]), base=base, k=1, scale=0.4)
    torch.testing.assert_close(merged, base + 0.4 * 1.7 * (model[0] - base))


def test_one_model_emr_is_that_model() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randint(-16, 16, (9,), generator=gen) / 8
    model = base + torch.randint(-8, 8, (1, 9), generator=gen) / 8
    assert torch.equal(emr(model, torch.ones(1), base=base), model[0])


@pytest.mark.parametrize("method", [consensus, emr])
def test_the_coefficient_scales_each_task_vector(method: Any) -> None:
    """NAN's coefficient enters as coef_t * tau_t, before the masks and the election."""
    coef = torch.tensor([0.5, 2.0, 1.5])
    scaled = BASE + coef[:, None] * TAUS
    torch.testing.assert_close(
        method(_models(), coef, base=BASE), method(scaled, torch.ones(3), base=BASE)
    )


def test_k_above_the_model_count_is_refused_before_any_input_is_opened(tmp_path: Any) -> None:
    recipe = load_recipe(
        {
            "base": str(tmp_path / "missing-base"),
            "models": [str(tmp_path / "a"), str(tmp_path / "b")],
            "method": "consensus",
            "parameters": {"k": 3},
            "output": str(tmp_path / "out"),
        }
    )
    with pytest.raises(MergeError, match=r"k = 3 keeps .* merges 2 models, .*; set k to at most 2"):
        check_recipe(recipe)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"k": 4}, "set k to at most 3"),
        ({"k": 0}, "k"),
        ({"tall_lambda": -0.1}, "tall_lambda"),
        ({"export_masks": True, "scale": 0.0}, "export_masks with scale = 0"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(MergeError, match=message):
        consensus(_models(), torch.ones(3), base=BASE, **params)


@pytest.mark.parametrize("method", [consensus, emr])
def test_a_base_is_required(method: Any) -> None:
    with pytest.raises(MergeError, match=r"needs a base|give a base"):
        method(_models(), torch.ones(3))

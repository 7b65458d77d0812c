"""The subspace methods (TSV-M, Iso-C, Iso-CTS, DC-Merge) against closed forms and SVD
invariants; their published formulas at uniform coefficients are in test_contract.py's table
(written out in subspace_formulas.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import nanmerge
from nanmerge._linalg import thin_svd
from nanmerge._types import MergeError, Role, TensorContext
from nanmerge.methods import dc_merge, iso_c, iso_cts, tsv
from nanmerge.methods._subspace import iso_cts_spaces, orthonormal, top_singular

METHODS = {"tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts, "dc_merge": dc_merge}


class Notes:
    """A Record that keeps what is noted."""

    def __init__(self) -> None:
        self.notes: dict[str, Any] = {}

    def note(self, key: str, value: float | int | str) -> None:
        self.notes[key] = value

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        raise AssertionError("subspace methods keep nothing")


def _family(
    m: int, shape: tuple[int, ...], seed: int = 0, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A base and m fine-tunes; with `rank`, task vectors of that rank plus faint noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    if rank is None:
        taus = torch.randn((m, *shape), generator=gen)
    else:
        left = torch.randn((m, shape[0], rank), generator=gen)
        right = torch.randn((m, rank, shape[1]), generator=gen)
        taus = left @ right + 1e-3 * torch.randn((m, *shape), generator=gen)
    return base, base + taus, taus


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def test_one_task_at_full_rank_tsv_returns_base_plus_scale_times_its_task_vector() -> None:
    base, tensors, taus = _family(1, (7, 5))
    merged = tsv(tensors, torch.ones(1), base=base, scale=0.7)
    torch.testing.assert_close(merged, base + 0.7 * taus[0], rtol=1e-5, atol=1e-5)


def test_tsv_spectrum_is_the_tasks_kept_singular_values_each_scaled_by_its_coefficient() -> None:
    """Orthonormal bases on both sides leave the singular values the tasks brought: each
    task's top r // M, times |coef_i| (the coefficient scales tau_i before its SVD)."""
    base, tensors, taus = _family(3, (12, 9))
    coef = torch.tensor([0.5, 2.0, -1.5])
    update = tsv(tensors, coef, base=base, svd="exact") - base
    expected = torch.cat(
        [c.abs() * _singular_values(t)[:3] for c, t in zip(coef, taus, strict=True)]
    )
    torch.testing.assert_close(
        _singular_values(update), expected.sort(descending=True).values, rtol=1e-4, atol=1e-4
    )


def test_iso_c_spectrum_is_flat_at_the_mean_singular_value_of_the_weighted_sum() -> None:
    base, tensors, taus = _family(3, (8, 6))
    coef = torch.tensor([0.5, 2.0, 1.0])
    update = (iso_c(tensors, coef, base=base, scale=2.0) - base) / 2.0
    weighted = sum(c * t.double() for c, t in zip(coef, taus, strict=True))
    mean = float(_singular_values(weighted).mean())
    torch.testing.assert_close(
        _singular_values(update), torch.full((6,), mean, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("fraction", "sizes"), [(0.8, (8, 1)), (0.5, (5, 2)), (0.0, (2, 3))])
def test_iso_cts_task_subspaces_are_orthogonal_to_the_common_one_and_fill_the_rank(
    fraction: float, sizes: tuple[int, int]
) -> None:
    """r = 11, M = 3: common int(11 f), the rest rounded to a multiple of 3 (f = 0 would
    round 11 / 3 up past r: the task share is cut to r // M = 3)."""
    _, _, taus = _family(3, (11, 14))
    shared, tasks = iso_cts_spaces(taus, fraction)
    assert (shared.u.shape[1], tasks[0].u.shape[1]) == sizes
    assert shared.u.shape[1] + sum(t.u.shape[1] for t in tasks) == 11
    for task in tasks:
        torch.testing.assert_close(shared.u.mT @ task.u, torch.zeros(sizes), atol=1e-5, rtol=0)


def test_iso_cts_spectrum_is_flat() -> None:
    base, tensors, _ = _family(3, (11, 14))
    update = iso_cts(tensors, torch.tensor([1.0, 2.0, 0.5]), base=base, common_space_fraction=0.5)
    values = _singular_values(update - base)
    torch.testing.assert_close(values, values.mean().expand(11), rtol=1e-5, atol=1e-5)


def test_dc_merge_of_one_model_at_density_one_returns_its_task_vector() -> None:
    """One task: the shared basis is its own singular vectors, its matrix there diag(s)."""
    base, tensors, taus = _family(1, (7, 5))
    merged = dc_merge(tensors, torch.ones(1), base=base, density=1.0, scale=1.0)
    torch.testing.assert_close(merged, base + taus[0], rtol=1e-5, atol=1e-5)


def test_dc_merge_trim_keeps_one_task_only_its_largest_singular_direction() -> None:
    """density 0.001 of 5 x 5 entries keeps 1: the top singular value on the diagonal."""
    base, tensors, taus = _family(1, (7, 5))
    u, s, vh = torch.linalg.svd(taus[0].double(), full_matrices=False)
    merged = dc_merge(tensors, torch.ones(1), base=base)
    expected = base + (s[0] * torch.outer(u[:, 0], vh[0])).float()
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_non_matrix_tensors_get_the_mean_of_the_scaled_task_vectors(name: str) -> None:
    base, tensors, taus = _family(3, (10,))
    coef = torch.tensor([1.0, 2.0, 0.5])
    merged = METHODS[name](tensors, coef, base=base, scale=0.5)
    expected = base + 0.5 * (coef[:, None] * taus).sum(0) / 3
    torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("role", ["embedding", "head"])
def test_vocabulary_matrices_are_averaged_unless_included(name: str, role: Role) -> None:
    base, tensors, taus = _family(2, (9, 4))
    coef = torch.tensor([1.0, 3.0])
    context = TensorContext(name="w", layer=None, num_layers=None, role=role)
    mlp = TensorContext(name="w", layer=0, num_layers=1, role="mlp")
    fn = METHODS[name]
    averaged = fn(tensors, coef, base=base, context=context)
    torch.testing.assert_close(averaged, base + (coef[:, None, None] * taus).mean(0))
    included = fn(tensors, coef, base=base, context=context, include_vocab=True)
    torch.testing.assert_close(included, fn(tensors, coef, base=base, context=mlp))
    assert not torch.allclose(included, averaged)


@pytest.mark.parametrize("name", ["tsv", "dc_merge"])
def test_a_matrix_narrower_than_the_model_count_is_averaged_and_noted(name: str) -> None:
    base, tensors, taus = _family(3, (2, 6))
    record = Notes()
    merged = METHODS[name](tensors, torch.ones(3), base=base, record=record)
    torch.testing.assert_close(merged, base + taus.mean(0))
    assert "no singular vector" in record.notes["averaged"]


def test_randomized_svd_finds_the_top_triplets_and_states_its_true_error() -> None:
    _, _, taus = _family(1, (120, 200), rank=12)
    matrix = taus[0]
    found = top_singular(matrix, 10)
    assert found.error is not None  # 4 * 10 < 120: randomized
    exact = torch.linalg.svdvals(matrix.double())
    torch.testing.assert_close(found.s.double(), exact[:10], rtol=1e-4, atol=0)
    residual = matrix.double() - (found.u.double() * found.s.double()) @ found.vh.double()
    assert found.error == pytest.approx(float(residual.norm() / matrix.double().norm()), rel=1e-3)
    best = float(exact[10:].square().sum().sqrt() / exact.square().sum().sqrt())
    assert best - 1e-6 <= found.error <= 1.01 * best
    assert top_singular(matrix, 40).error is None  # 4 * 40 >= 120: exact


@pytest.mark.parametrize("name", ["tsv", "iso_cts", "dc_merge"])
def test_auto_svd_notes_its_error_and_stays_close_to_the_exact_merge(name: str) -> None:
    """8 models of 64 x 96: rank 8 per task is below a quarter of 64, so randomized; the
    task vectors have rank 12, within the sketch of 8 + 10 columns."""
    base, tensors, taus = _family(8, (64, 96), rank=12)
    # iso_cts with no common space: its task SVDs are of the task vectors themselves
    params = {"common_space_fraction": 0.0} if name == "iso_cts" else {}
    record, exact_record = Notes(), Notes()
    coef = torch.linspace(0.5, 1.5, 8)
    fn = METHODS[name]
    approx = fn(tensors, coef, base=base, record=record, **params)
    exact = fn(tensors, coef, base=base, record=exact_record, svd="exact", **params)
    # the largest relative error of the kept rank-8 factors: the exact truncation's, nearly
    values = [_singular_values(t) for t in taus]
    best = max(float(v[8:].norm() / v.norm()) for v in values)
    assert best - 1e-6 <= record.notes["svd_error"] <= 1.01 * best
    assert "svd_error" not in exact_record.notes
    torch.testing.assert_close(approx - base, exact - base, rtol=0, atol=2e-3)


def test_the_randomized_svd_does_not_depend_on_the_global_generator() -> None:
    base, tensors, _ = _family(8, (64, 96))
    torch.manual_seed(1)
    first = tsv(tensors, torch.ones(8), base=base)
    torch.manual_seed(2)
    assert torch.equal(first, tsv(tensors, torch.ones(8), base=base))


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
        ("dc_merge", {"density": 0.0}, "density"),
        ("tsv", {"svd": "lowrank"}, "svd"),
        ("iso_c", {"include_vocab": "yes"}, "include_vocab"),
        ("tsv", {"scale": float("nan")}, "scale"),
    ],
)
def test_bad_parameters_are_refused_before_any_tensor_is_read(
    name: str, params: dict[str, Any], words: str
) -> None:
    not_a_stack = torch.zeros(0, dtype=torch.int64)  # would fail the input checks after
    with pytest.raises(MergeError, match=words):
        METHODS[name](not_a_stack, torch.ones(1), base=not_a_stack, **params)


def _save(folder: Path, state: dict[str, torch.Tensor]) -> str:
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return str(folder)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_recipe_on_a_model_without_matrices_is_refused_before_any_work(
    tmp_path: Path, name: str
) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"norm.weight": (8,), "conv.weight": (2, 3, 3, 3)}
    folders = [
        _save(tmp_path / f"m{i}", {k: torch.randn(s, generator=gen) for k, s in shapes.items()})
        for i in range(3)
    ]
    out = tmp_path / "merged"
    recipe = {"base": folders[0], "models": folders[1:], "method": name, "output": str(out)}
    with pytest.raises(MergeError, match=rf"'{name}'.*none of the 2 tensor\(s\).*'norm.weight'"):
        nanmerge.merge(recipe)
    assert not out.exists()


def test_a_merge_averages_the_embedding_and_reports_the_svd_error(tmp_path: Path) -> None:
    """End to end: the engine hands the context (the embedding is averaged) and the record
    (the randomized SVDs of 6 models' 48 x 64 matrix note their error)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32, 8), "model.layers.0.mlp.up_proj.weight": (48, 64)}
    states = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(7)]
    folders = [_save(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    recipe = {"base": folders[0], "models": folders[1:], "method": "tsv", "output": None}
    merged = nanmerge.merge(recipe)
    embed = "model.embed_tokens.weight"
    taus = torch.stack([s[embed] - states[0][embed] for s in states[1:]])
    torch.testing.assert_close(merged[embed], states[0][embed] + taus.mean(0))
    up = "model.layers.0.mlp.up_proj.weight"
    stack = torch.stack([s[up] for s in states[1:]])
    torch.testing.assert_close(merged[up], tsv(stack, torch.ones(6), base=states[0][up]))
    report = nanmerge.merge({**recipe, "output": str(tmp_path / "out")})
    assert isinstance(report, dict)
    assert 0 < report["method_notes"][up]["svd_error"] < 1
    assert embed not in report["method_notes"]


def test_procrustes_of_a_near_orthonormal_matrix_returns_its_nearest_orthonormal_one() -> None:
    """float32's SVD fails to converge on this matrix with 2 threads (all singular values
    near 1), as on an Iso-CTS basis at `1b`; the float64 retry finds the polar factor."""
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(1024, 512, generator=gen)).Q
    x = q + 1.3e-6 * torch.randn(1024, 512, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        polar = orthonormal(x)
    finally:
        torch.set_num_threads(threads)
    assert polar.dtype == torch.float32
    torch.testing.assert_close(polar.mT @ polar, torch.eye(512), atol=2e-5, rtol=0)
    # the nearest orthonormal matrix is no farther from x than q, itself orthonormal
    assert torch.linalg.matrix_norm(polar - x) <= torch.linalg.matrix_norm(q - x) * 1.01


def test_an_svd_that_fails_in_float32_is_redone_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    svd = torch.linalg.svd
    seen: list[torch.dtype] = []

    def float32_fails(matrix: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return svd(matrix, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    a = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    u, s, vh = thin_svd(a)
    assert seen == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close((u * s) @ vh, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_an_svd_that_fails_in_both_precisions_names_the_tensor(name: str) -> None:
    base, models, _ = _family(3, (12, 9))
    models[1, 2, 3] = float("nan")
    context = TensorContext("layers.3.mlp.weight", 3, 8, "other")
    with pytest.raises(MergeError, match=r"'layers.3.mlp.weight' of shape \(12, 9\).*NaN"):
        METHODS[name](models, torch.ones(3), base=base, context=context)

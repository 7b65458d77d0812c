"""TIES and breadcrumbs as published: a trim over each model's whole task vector
(trim_scope: model, found exactly in the passes before the merge) and TIES' disjoint mean
(merge: count), each against the formula written out again here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nanmerge
from nanmerge._types import MergeError
from nanmerge.io import SafetensorsFile
from nanmerge.methods import ties
from nanmerge.methods._model_trim import model_cuts
from tests.read_counts import count_reads

SHAPES = {
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.self_attn.q_proj.weight": (300, 400),
    "model.layers.1.mlp.down_proj.weight": (700, 1000),  # more than one chunk
    "model.norm.weight": (4,),
}


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return folder


def _family(
    tmp_path: Path, m: int, *, integers: bool
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """A base and m fine-tuned models; with `integers`, task vectors of a few whole values
    (many ties at any threshold)."""
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = []
    for i in range(m):
        # models of different magnitudes (per-model thresholds differ) and tensors too (a
        # whole-model trim keeps more of the larger tensors' entries than a per-tensor one)
        scale = {k: 0.1 * (i + 1) * (j + 1) for j, k in enumerate(SHAPES)}
        if integers:
            models.append(
                {
                    k: v + torch.randint(-3, 4, v.shape, generator=gen).float()
                    for k, v in base.items()
                }
            )
        else:
            models.append(
                {k: v + scale[k] * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            )
    folders = [
        _write(tmp_path / n, t)
        for n, t in [("base", base)] + [(f"ft{i}", t) for i, t in enumerate(models)]
    ]
    recipe = {"base": str(folders[0]), "models": [str(f) for f in folders[1:]]}
    return [base, *models], recipe


def _read(folder: str) -> dict[str, torch.Tensor]:
    reader = SafetensorsFile(Path(folder) / "model.safetensors")
    tensors = {n: reader[n] for n in SHAPES}
    reader.close()
    return tensors


def _whole_model_masks(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    density: float,
    gamma: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Per model: concatenate every tensor's task vector, take the top-k magnitudes over all
    of them (torch.topk), keep every entry >= the k-th largest (and drop every one >= the
    round(gamma N)-th largest), and split the mask back into tensors."""
    masks = []
    for model in models:
        flat = torch.cat([(model[n] - base[n]).reshape(-1) for n in SHAPES]).abs()
        n = flat.numel()
        n_keep = max(1, math.floor(density * n + 0.5))
        n_top = min(math.floor(gamma * n + 0.5), n - n_keep)
        keep = flat >= torch.topk(flat, n_top + n_keep).values[-1]
        if n_top:
            keep &= ~(flat >= torch.topk(flat, n_top).values[-1])
        pieces = keep.split([math.prod(SHAPES[name]) for name in SHAPES])
        masks.append(
            {name: p.reshape(SHAPES[name]) for name, p in zip(SHAPES, pieces, strict=True)}
        )
    return masks


def _elect(taus: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint mean at uniform coefficients: the mean of the entries agreeing with the
    sign of their sum (0 where none does)."""
    elected = taus.sum(0).sign()
    agree = (taus.sign() == elected) & (taus != 0)
    count = agree.sum(0)
    return torch.where(
        count > 0, (taus * agree).sum(0) / count.clamp(min=1), torch.zeros_like(elected)
    )


@pytest.mark.parametrize("integers", [False, True])
def test_a_whole_model_trim_keeps_each_models_top_k_over_all_its_tensors(
    tmp_path: Path, integers: bool
) -> None:
    tensors, recipe = _family(tmp_path, 3, integers=integers)
    base, models = tensors[0], tensors[1:]
    density = 0.3
    params = {"density": density, "trim_scope": "model", "merge": "count"}
    merged = nanmerge.merge({**recipe, "method": "ties", "parameters": params})
    per_tensor = nanmerge.merge(
        {**recipe, "method": "ties", "parameters": {**params, "trim_scope": "tensor"}}
    )
    assert isinstance(merged, dict) and isinstance(per_tensor, dict)
    masks = _whole_model_masks(base, models, density)
    for name in SHAPES:
        taus = torch.stack(
            [(m[name] - base[name]) * mask[name] for m, mask in zip(models, masks, strict=True)]
        )
        torch.testing.assert_close(merged[name], base[name] + _elect(taus), rtol=1e-6, atol=1e-6)
    # the models' magnitudes differ, so ranking over the whole model keeps other entries
    assert any(not torch.equal(merged[n], per_tensor[n]) for n in SHAPES)


def test_one_model_shows_exactly_which_entries_a_whole_model_trim_keeps(tmp_path: Path) -> None:
    """With one model every kept entry survives the election, so merged - base is the
    trimmed task vector itself: compared bit for bit, ties at the threshold included."""
    tensors, recipe = _family(tmp_path, 1, integers=True)
    base, model = tensors
    merged = nanmerge.merge(
        {
            **recipe,
            "method": "ties",
            "parameters": {"density": 0.4, "trim_scope": "model", "merge": "sum"},
        }
    )
    assert isinstance(merged, dict)
    (mask,) = _whole_model_masks(base, [model], 0.4)
    kept = sum(int(m.sum()) for m in mask.values())
    n = sum(m.numel() for m in mask.values())
    assert kept > math.floor(0.4 * n + 0.5)  # ties at the threshold are all kept
    for name in SHAPES:
        assert torch.equal(merged[name], (model[name] - base[name]) * mask[name] + base[name])


def test_a_whole_model_band_drops_and_keeps_over_all_tensors(tmp_path: Path) -> None:
    tensors, recipe = _family(tmp_path, 2, integers=False)
    base, models = tensors[0], tensors[1:]
    params = {"density": 0.5, "gamma": 0.1, "scale": 1.0, "trim_scope": "model"}
    merged = nanmerge.merge({**recipe, "method": "breadcrumbs", "parameters": params})
    assert isinstance(merged, dict)
    masks = _whole_model_masks(base, models, 0.5, 0.1)
    for name in SHAPES:
        kept = sum(
            (m[name] - base[name]) * mask[name] for m, mask in zip(models, masks, strict=True)
        )
        torch.testing.assert_close(merged[name], base[name] + kept, rtol=1e-6, atol=1e-6)


def _thresholds(chunks: list[torch.Tensor], ranks: tuple[int, ...]) -> list[tuple[float, ...]]:
    """The collect run as the engine runs it: chunk by chunk, then the second look."""
    collect = model_cuts(lambda numel: ranks)
    total: Any = None
    for chunk in chunks:
        part = collect.partial(None, chunk, torch.zeros(chunk.shape[1]))  # type: ignore[arg-type]
        total = part if total is None else collect.combine(total, part)
    assert collect.refine is not None
    second = collect.refine(total)
    total = None
    for chunk in chunks:
        part = second.partial(None, chunk, torch.zeros(chunk.shape[1]))  # type: ignore[arg-type]
        total = part if total is None else second.combine(total, part)
    return list(total.thresholds)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=2, max_size=300),
    st.integers(1, 10**6),
    st.integers(0, 3),
    st.data(),
)
def test_the_threshold_is_the_exact_kth_largest_with_ties_and_a_crowded_bin(
    steps: list[int], split: int, spread: int, data: st.DataObject
) -> None:
    """Magnitudes a few ulps apart around 1.0 (all in one high-bit bin) or further apart,
    with repeats; the threshold must be the k-th largest magnitude exactly."""
    ulps = torch.tensor(steps, dtype=torch.int32) << (8 * spread)  # spread 0: one bin
    values = (torch.tensor(1.0).view(torch.int32) + ulps).view(torch.float32)
    signs = torch.where(torch.tensor(steps) % 3 == 0, -1.0, 1.0)
    row = values * signs
    stack = torch.stack([row, row.flip(0) * 0.5])  # two models with their own thresholds
    n = row.numel()
    ranks = tuple(
        sorted({data.draw(st.integers(1, n)), data.draw(st.integers(0, n))}, reverse=True)
    )
    cut = split % n + 1
    found = _thresholds([stack[:, :cut], stack[:, cut:]] if cut < n else [stack], ranks)
    for model, thresholds in zip(stack, found, strict=True):
        ordered = model.abs().sort(descending=True).values
        expected = [
            math.inf if k == 0 else -math.inf if k == n else float(ordered[k - 1]) for k in ranks
        ]
        assert list(thresholds) == expected


def test_lines_measures_the_merged_delta_of_the_whole_model_trim(tmp_path: Path) -> None:
    """LiNeS's alpha (beta 0: one scale everywhere) comes from a pass that merges at scale 1:
    it must use the same whole-model cuts as the merge."""
    tensors, recipe = _family(tmp_path, 3, integers=False)
    base, models = tensors[0], tensors[1:]
    params = {"density": 0.3, "trim_scope": "model"}
    merged = nanmerge.merge(
        {**recipe, "method": "ties", "parameters": params, "lines": {"beta": 0.0}}
    )
    assert isinstance(merged, dict)
    masks = _whole_model_masks(base, models, 0.3)
    deltas = {}
    for name in SHAPES:
        taus = [m[name] - base[name] for m in models]
        trimmed = torch.stack([t * mask[name] for t, mask in zip(taus, masks, strict=True)])
        deltas[name] = _elect(trimmed)
    summed = sum(float(sum(m[n] - base[n] for m in models).abs().sum()) for n in SHAPES)
    alpha = summed / sum(float(d.abs().sum()) for d in deltas.values()) / len(models)
    for name in SHAPES:
        torch.testing.assert_close(merged[name], base[name] + alpha * deltas[name])


def test_merge_count_divides_by_the_number_of_agreeing_models() -> None:
    base = torch.zeros(3)
    taus = torch.tensor([[1.0, -2.0, 4.0], [3.0, 1.0, -4.0], [-1.0, 1.0, 0.0]])
    coef = torch.tensor([1.0, 2.0, 1.0])
    # coef * tau: [1, -2, 4], [6, 2, -8], [-1, 1, 0]; sums [6, 1, -4]: signs [+, +, -]
    # agreeing: col0 models 0, 1 (1 + 6); col1 models 1, 2 (2 + 1); col2 model 1 (-8)
    out = ties(base + taus, coef, base=base, density=1.0, merge="count")
    torch.testing.assert_close(out, torch.tensor([7 / 2, 3 / 2, -8.0]))
    mean = ties(base + taus, coef, base=base, density=1.0, merge="mean")  # coefficient sums
    torch.testing.assert_close(mean, torch.tensor([7 / 3, 3 / 3, -8 / 2]))


def test_a_whole_model_trim_costs_one_more_read_than_a_collect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, recipe = _family(tmp_path, 2, integers=False)
    reads = count_reads(monkeypatch)
    for scope, passes in (("tensor", 1), ("model", 3)):
        reads.clear()
        nanmerge.merge({**recipe, "method": "ties", "parameters": {"trim_scope": scope}})
        assert reads == {name: passes * 3 for name in SHAPES}  # 3 inputs per pass


def test_a_whole_model_trim_refuses_a_density_that_varies_by_layer(tmp_path: Path) -> None:
    _, recipe = _family(tmp_path, 2, integers=False)
    params = {"trim_scope": "model", "density": {"schedule": [0.2, 0.6]}}
    with pytest.raises(MergeError, match="take one value each"):
        nanmerge.merge({**recipe, "method": "ties", "parameters": params})

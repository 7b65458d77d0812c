"""Export and rebuild: the masks a consensus or EMR merge keeps rebuild each task's model as
the papers' formulas say, written out again here from the input files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import nanmerge
from nanmerge._types import MergeError
from nanmerge.engine._rebuild import rebuild
from nanmerge.io import open_checkpoint
from tests.conftest import Family, build_family

SHAPES = {"a.weight": (700, 1000), "b.weight": (6, 4), "c.bias": (5,)}  # a: several chunks


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    folder = tmp_path_factory.mktemp("rebuild") / "inputs"
    made = build_family(folder, m=3, shapes=SHAPES)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return made


def _merge(family: Family, out: Path, method: str, **fields: Any) -> dict[str, Any]:
    report = nanmerge.merge(
        {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": method,
            "output": str(out),
            "max_shard_size": "1MB",
            "copy_files_from": str(family.base.parent),
            **fields,
        }
    )
    assert isinstance(report, dict)
    return report


def _read(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder, sharded or not."""
    reader = open_checkpoint(folder)
    try:
        return {n: reader[n] for n in reader}
    finally:
        reader.close()


def _taus(family: Family, coef: list[float]) -> dict[str, torch.Tensor]:
    return {
        n: torch.stack(
            [
                c * (m[n] - family.base_tensors[n])
                for c, m in zip(coef, family.model_tensors, strict=True)
            ]
        )
        for n in SHAPES
    }


@pytest.fixture(scope="module")
def consensus_merge(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "consensus"
    _merge(family, out, "consensus", parameters={"export_masks": True})
    return out


@pytest.mark.parametrize("task", [0, 2])
def test_consensus_rebuilds_the_tall_model_of_each_task(
    family: Family, consensus_merge: Path, tmp_path: Path, task: int
) -> None:
    info = rebuild(consensus_merge, task, tmp_path / "t")
    rebuilt = _read(tmp_path / "t")
    for name, taus in _taus(family, [1.0, 1.0, 1.0]).items():
        mtl = taus.sum(0)
        mask = taus[task].abs() > 0.6 * (mtl - taus[task]).abs()
        expected = family.base_tensors[name] + torch.where(mask, mtl, torch.zeros_like(mtl))
        torch.testing.assert_close(rebuilt[name], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rebuilt["position_ids"], family.base_tensors["position_ids"])
    assert json.loads((tmp_path / "t" / "config.json").read_text()) == {"model_type": "toy"}
    assert info["model"] == str(family.models[task])
    assert info["storage"]["fine_tuned_models_bytes"] == 3 * info["storage"]["merged_model_bytes"]


def test_the_kept_masks_are_the_tall_masks_packed_across_chunks(
    family: Family, consensus_merge: Path
) -> None:
    index = json.loads(
        (consensus_merge / "modulators" / "model.safetensors.index.json").read_text()
    )
    name = "tall_masks/a.weight"
    stored = load_file(consensus_merge / "modulators" / index["weight_map"][name])[name]
    taus = _taus(family, [1.0, 1.0, 1.0])["a.weight"].reshape(3, -1)
    mtl = taus.sum(0)
    masks = (taus.abs() > 0.6 * (mtl - taus).abs()).numpy()
    assert stored.shape == (3, 700 * 1000 // 8)
    assert np.array_equal(stored.numpy(), np.packbits(masks, axis=1))
    report = json.loads((consensus_merge / "merge_report.json").read_text())
    assert report["output"]["kept"]["bytes"] > 0
    assert report["method_notes"]["a.weight"]["consensus_kept"] == int(
        ((torch.from_numpy(masks).sum(0)) >= 2).sum()
    )


def test_emr_rebuilds_base_plus_rescaled_masked_unified_vector(
    family: Family, tmp_path: Path
) -> None:
    """With manual coefficients: each tau_t is scaled by its coefficient before the election,
    and lambda_t is taken over the whole model."""
    coef = [0.5, 1.0, 2.0]
    out = tmp_path / "emr"
    _merge(
        family,
        out,
        "emr",
        models=[
            {"path": str(p), "coefficient": c} for p, c in zip(family.models, coef, strict=True)
        ],
        coefficients="manual",
    )
    taus = _taus(family, coef)
    unified, masks = {}, {}
    total = torch.zeros(3, dtype=torch.float64)
    kept = torch.zeros(3, dtype=torch.float64)
    for name, t in taus.items():
        sign = t.sum(0).sign()
        masks[name] = t * sign > 0
        unified[name] = sign * torch.where(masks[name], t.abs(), torch.zeros_like(t)).amax(0)
        total += t.abs().reshape(3, -1).double().sum(1)
        kept += (masks[name] * unified[name].abs()).reshape(3, -1).double().sum(1)
    rescalers = total / kept
    merged = _read(out)
    for name in SHAPES:
        expected = family.base_tensors[name] + unified[name]
        torch.testing.assert_close(merged[name], expected)
    task = 1
    info = rebuild(out, task, tmp_path / "t1")
    assert info["whole_model"]["rescaler"] == pytest.approx(float(rescalers[task]), rel=1e-9)
    rebuilt = _read(tmp_path / "t1")
    for name in SHAPES:
        delta = torch.where(masks[name][task], unified[name], torch.zeros_like(unified[name]))
        expected = family.base_tensors[name] + float(rescalers[task]) * delta
        torch.testing.assert_close(rebuilt[name], expected, rtol=1e-5, atol=1e-5)


def test_emr_of_one_model_rebuilds_that_model_exactly(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    base = {n: torch.randint(-64, 64, s, generator=gen) / 16 for n, s in SHAPES.items()}
    model = {n: v + torch.randint(-32, 32, v.shape, generator=gen) / 16 for n, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(model, tmp_path / "ft.safetensors")
    nanmerge.merge(
        {
            "base": str(tmp_path / "base.safetensors"),
            "models": [str(tmp_path / "ft.safetensors")],
            "method": "emr",
            "output": str(tmp_path / "merged"),
        }
    )
    info = rebuild(tmp_path / "merged", 0, tmp_path / "t0")
    assert info["whole_model"]["rescaler"] == 1.0
    rebuilt = _read(tmp_path / "t0")
    assert all(torch.equal(rebuilt[n], model[n]) for n in SHAPES)


def test_a_task_out_of_range_is_refused_before_anything_is_written(
    consensus_merge: Path, tmp_path: Path
) -> None:
    with pytest.raises(MergeError, match=r"task 3 is out of range: the merge has 3 models"):
        rebuild(consensus_merge, 3, tmp_path / "t")
    with pytest.raises(MergeError, match="out of range"):
        rebuild(consensus_merge, -1, tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_a_merge_without_masks_is_refused(family: Family, tmp_path: Path) -> None:
    _merge(family, tmp_path / "plain", "consensus")
    with pytest.raises(MergeError, match=r"no modulators/ folder .*`export_masks: true`"):
        rebuild(tmp_path / "plain", 0, tmp_path / "t")
    _merge(family, tmp_path / "ta", "task_arithmetic")
    with pytest.raises(MergeError, match="merged with 'task_arithmetic'"):
        rebuild(tmp_path / "ta", 0, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_base_of_other_shapes_is_refused(consensus_merge: Path, tmp_path: Path) -> None:
    save_file({n: torch.zeros(3) for n in SHAPES}, tmp_path / "other.safetensors")
    with pytest.raises(MergeError, match=r"'a.weight' has shape \(3,\) in the base"):
        rebuild(consensus_merge, 0, tmp_path / "t", base=str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "t").exists()


def test_a_scale_varying_by_layer_is_read_back_per_tensor(tmp_path: Path) -> None:
    """tau_MTL is (merged - base) / scale with each tensor's own scale of a schedule."""
    shapes = {f"model.layers.{i}.mlp.weight": (8, 6) for i in range(3)}
    made = build_family(tmp_path / "inputs", m=3, shapes=shapes)
    nanmerge.merge(
        {
            "base": str(made.base),
            "models": [str(p) for p in made.models],
            "method": "consensus",
            "parameters": {"export_masks": True, "scale": {"schedule": [0.2, 0.6]}},
            "output": str(tmp_path / "merged"),
        }
    )
    rebuild(tmp_path / "merged", 1, tmp_path / "t1")
    rebuilt = _read(tmp_path / "t1")
    for name in shapes:
        taus = torch.stack([m[name] - made.base_tensors[name] for m in made.model_tensors])
        mtl = taus.sum(0)
        mask = taus[1].abs() > 0.6 * (mtl - taus[1]).abs()
        expected = made.base_tensors[name] + torch.where(mask, mtl, torch.zeros_like(mtl))
        torch.testing.assert_close(rebuilt[name], expected, rtol=1e-5, atol=1e-5)

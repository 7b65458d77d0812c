"""End-to-end merges of tiny generated checkpoints, asserting tensor values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanmerge
from tests.conftest import Family, build_family


def recipe(family: Family, **fields: object) -> dict[str, object]:
    return {"base": str(family.base), "models": [str(p) for p in family.models], **fields}


def test_task_arithmetic_writes_base_plus_scaled_sum_of_task_vectors(
    family: Family, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    nanmerge.merge(
        recipe(family, method="task_arithmetic", parameters={"scale": 0.5}, output=str(out))
    )
    merged = load_file(out / "model.safetensors")
    for name, base in family.base_tensors.items():
        if not base.dtype.is_floating_point:
            assert torch.equal(merged[name], base)
            continue
        expected = base + 0.5 * sum(ft[name] - base for ft in family.model_tensors)
        torch.testing.assert_close(merged[name], expected)


def test_nan_model_level_weights_the_average_by_inverse_total_norms(family: Family) -> None:
    state = nanmerge.merge(recipe(family, method="weight_average", coefficients="nan"))
    floats = [k for k, v in family.base_tensors.items() if v.dtype.is_floating_point]
    norms = torch.tensor(
        [
            sum(float(ft[k].double().square().sum()) for k in floats) ** 0.5
            for ft in family.model_tensors
        ]
    )
    weights = (1 / norms) / (1 / norms).sum()
    assert isinstance(state, dict)
    for k in floats:
        pairs = zip(weights.tolist(), family.model_tensors, strict=True)
        expected = sum(w * ft[k] for w, ft in pairs)
        torch.testing.assert_close(state[k], expected)


def test_nan_tensor_level_reports_and_uses_one_vector_per_tensor(
    family: Family, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    coefs = {"estimator": "nan", "norm_of": "task_vector", "granularity": "tensor"}
    report = nanmerge.merge(
        recipe(
            family,
            method="task_arithmetic",
            parameters={"scale": 1.0},
            coefficients=coefs,
            output=str(out),
        )
    )
    assert isinstance(report, dict)
    per_tensor = report["coefficients"]["per_tensor"]
    merged = load_file(out / "model.safetensors")
    m = len(family.models)
    for name, base in family.base_tensors.items():
        if not base.dtype.is_floating_point:
            assert name not in per_tensor
            continue
        taus = [ft[name] - base for ft in family.model_tensors]
        inv = torch.tensor([1 / float(t.double().norm()) for t in taus])
        expected_coef = m * inv / inv.sum()
        assert per_tensor[name] == pytest.approx(expected_coef.tolist())
        expected = base + sum(c * t for c, t in zip(expected_coef.tolist(), taus, strict=False))
        torch.testing.assert_close(merged[name], expected)


def test_equal_norm_models_merge_identically_with_nan_and_uniform(tmp_path: Path) -> None:
    fam = build_family(tmp_path / "in", delta_scales=(0.2, 0.2, 0.2))
    # equal norms on purpose: rescale each fine-tuned tensor set to the first one's norm
    ref = sum(
        float(v.double().square().sum())
        for k, v in fam.model_tensors[0].items()
        if v.is_floating_point()
    )
    for path, tensors in zip(fam.models, fam.model_tensors, strict=False):
        own = sum(
            float(v.double().square().sum()) for v in tensors.values() if v.is_floating_point()
        )
        scaled = {
            k: v * (ref / own) ** 0.5 if v.is_floating_point() else v for k, v in tensors.items()
        }
        save_file(scaled, path)
    a = nanmerge.merge(recipe(fam, method="ties", coefficients="nan"))
    b = nanmerge.merge(recipe(fam, method="ties", coefficients="uniform"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "weight_average"])
@pytest.mark.parametrize("coefficients", ["uniform", "nan"])
def test_permuting_the_input_models_leaves_the_output_unchanged(
    family: Family, method: str, coefficients: str
) -> None:
    forward = nanmerge.merge(recipe(family, method=method, coefficients=coefficients))
    family.models.reverse()
    backward = nanmerge.merge(recipe(family, method=method, coefficients=coefficients))
    for k in forward:
        torch.testing.assert_close(forward[k], backward[k])


def test_dare_is_bitwise_reproducible_across_threads_and_tensor_order(
    family: Family, tmp_path: Path
) -> None:
    results = [
        nanmerge.merge(recipe(family, method="dare_ties", seed=7, threads=threads))
        for threads in (0, 1, 3)
    ]
    # the same tensors written in reverse order must give the same draws per tensor name
    for path, tensors in zip(family.models, family.model_tensors, strict=False):
        save_file(dict(reversed(list(tensors.items()))), path)
    results.append(nanmerge.merge(recipe(family, method="dare_ties", seed=7)))
    other_seed = nanmerge.merge(recipe(family, method="dare_ties", seed=8))
    for r in results[1:]:
        assert all(torch.equal(results[0][k], r[k]) for k in r)
    assert not all(torch.equal(results[0][k], other_seed[k]) for k in other_seed)


def test_output_dtype_follows_the_base_and_merge_computes_in_float32(tmp_path: Path) -> None:
    fam = build_family(tmp_path / "in", dtype=torch.bfloat16)
    state = nanmerge.merge(recipe(fam, method="task_arithmetic", parameters={"scale": 1.0}))
    name = "layer.weight"
    base = fam.base_tensors[name].float()
    expected = (base + sum(ft[name].float() - base for ft in fam.model_tensors)).to(torch.bfloat16)
    assert state[name].dtype == torch.bfloat16
    assert torch.equal(state[name], expected)
    as_f32 = nanmerge.merge(recipe(fam, method="task_arithmetic", dtype="float32"))
    assert as_f32[name].dtype == torch.float32


def test_sharded_output_loads_with_the_index(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    nanmerge.merge(recipe(family, method="task_arithmetic", output=str(out), max_shard_size="60B"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(out / shard))
    assert set(merged) == set(family.base_tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values()
    )


def test_report_and_model_card_describe_the_merge(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "inputs" / "config.json").write_text('{"model_type": "toy"}')
    nanmerge.merge(
        recipe(
            family,
            method="ties",
            coefficients="nan",
            output=str(out),
            copy_files_from=str(tmp_path / "inputs"),
        )
    )
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"]["name"] == "ties"
    assert report["method"]["parameters"]["density"] == 0.2
    assert len(report["coefficients"]["coefficients"]) == 3
    assert len(report["coefficients"]["norms"]["finetuned"]) == 3
    assert len(report["coefficients"]["norms"]["task_vector"]) == 3
    assert report["memory"]["bound_bytes"] > 0
    assert "torch" in report["versions"]
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "nanmerge" in card and "tags:" in card
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front
    assert "base_model" not in front  # a local path is not a Hub repo id; the body names it
    assert str(family.base) in card


def test_in_memory_state_dicts_are_accepted(family: Family) -> None:
    state = nanmerge.merge(
        {
            "base": family.base_tensors,
            "models": [{"path": t} for t in family.model_tensors],
            "method": "task_arithmetic",
        }
    )
    from_files = nanmerge.merge(recipe(family, method="task_arithmetic"))
    assert all(torch.equal(state[k], from_files[k]) for k in state)


def test_missing_tensor_policy_base_fills_from_the_base(family: Family) -> None:
    lacking = dict(family.model_tensors[0])
    del lacking["head.weight"]
    save_file(lacking, family.models[0])
    state = nanmerge.merge(
        recipe(family, method="task_arithmetic", parameters={"scale": 1.0}, missing_tensors="base")
    )
    base = family.base_tensors["head.weight"]
    expected = base + sum(ft["head.weight"] - base for ft in family.model_tensors[1:])
    torch.testing.assert_close(state["head.weight"], expected)
    skipped = nanmerge.merge(recipe(family, method="task_arithmetic", missing_tensors="skip"))
    assert "head.weight" not in skipped


def test_estimate_coefficients_matches_the_merge_report(family: Family, tmp_path: Path) -> None:
    coefs = nanmerge.estimate_coefficients(recipe(family, method="ties", coefficients="nan"))
    report = nanmerge.merge(
        recipe(family, method="ties", coefficients="nan", output=str(tmp_path / "o"))
    )
    assert isinstance(report, dict)
    assert list(coefs.per_model or ()) == report["coefficients"]["coefficients"]
    assert list(coefs.norms["finetuned"]) == report["coefficients"]["norms"]["finetuned"]

"""mergekit recipes using multislerp, nuslerp, karcher, model_stock, nearswap and
arcee_fusion run, and merge what the nanmerge method computes on the inputs mergekit gives
it: which model is the base, which are merged and in what order, and each parameter under
its mergekit name. (The methods themselves are checked against their formulas in
tests/methods.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nanmerge import MergeError
from nanmerge.methods import METHODS
from nanmerge.recipes import from_mergekit
from tests.recipes._helpers import SHAPES, hf_model, merge_yaml, merged, run

Models = dict[str, dict[str, torch.Tensor]]


@pytest.fixture
def models(tmp_path: Path) -> Models:
    return {name: hf_model(tmp_path / name, seed) for seed, name in enumerate("bxy")}


def _entry(name: str, weight: float | None) -> dict[str, Any]:
    return {"model": name} if weight is None else {"model": name, "parameters": {"weight": weight}}


# (merge_method, base_model or None, [(model, weight)], global parameters,
#  the nanmerge call: (models merged, base handed over, coefficients, parameters))
CASES: list[tuple[str, str | None, list[tuple[str, float | None]], dict[str, Any], Any]] = [
    (
        "multislerp",
        "b",
        [("x", 0.3), ("y", 0.9)],
        {"normalize_weights": False, "eps": 1e-6},
        (["x", "y"], "b", [0.3, 0.9], {"normalize_weights": False, "eps": 1e-6}),
    ),
    ("multislerp", None, [("x", 1.0), ("y", 2.0)], {}, (["x", "y"], None, [1.0, 2.0], {})),
    (
        "nuslerp",
        "b",
        [("b", None), ("x", 0.2), ("y", 0.6)],
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        (["x", "y"], "b", [0.2, 0.6], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ),
    ("nuslerp", None, [("y", 1.0), ("x", 3.0)], {}, (["y", "x"], None, [1.0, 3.0], {})),
    (
        "karcher",
        "b",
        [("x", None), ("y", None)],
        {"max_iter": 20, "tol": 1e-6},
        (["b", "x", "y"], None, [1.0, 1.0, 1.0], {"max_iter": 20, "tol": 1e-6}),
    ),
    (
        "model_stock",
        "b",
        [("b", None), ("x", None), ("y", None)],
        {"filter_wise": True},
        (["x", "y"], "b", [1.0, 1.0], {"filter_wise": True}),
    ),
    ("nearswap", "b", [("x", None)], {"t": 0.5}, (["x"], "b", [1.0], {"t": 0.5})),
    ("arcee_fusion", "b", [("b", None), ("y", None)], {}, (["y"], "b", [1.0], {})),
]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c[0]}-{'base' if c[1] else 'nobase'}" for c in CASES]
)
def test_a_mergekit_recipe_with_the_method_merges_what_the_method_computes(
    tmp_path: Path, models: Models, case: Any
) -> None:
    method, base, entries, params, (merged_names, base_name, coef, ours) = case
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [_entry(str(tmp_path / n), w) for n, w in entries],
    }
    if base is not None:
        data["base_model"] = str(tmp_path / base)
    if params:
        data["parameters"] = params
    result = run(["run", str(merge_yaml(tmp_path, data)), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = merged(tmp_path / "out")
    fn = METHODS[method].fn
    for name in SHAPES:
        stack = torch.stack([models[n][name] for n in merged_names])
        given = None if base_name is None else models[base_name][name]
        expected = fn(stack, torch.tensor(coef), base=given, **ours)
        torch.testing.assert_close(out[name], expected)


@pytest.mark.parametrize(
    ("method", "base", "params", "match"),
    [
        ("karcher", "b", {"weight": 0.5}, "parameter 'weight' of model"),
        ("model_stock", None, {}, "model_stock without base_model"),
        ("nearswap", None, {}, "nearswap without base_model"),
        ("nuslerp", None, {"nuslerp_flat": True}, "parameter 'nuslerp_flat'"),
    ],
)
def test_what_mergekit_would_not_run_either_is_refused(
    method: str, base: str | None, params: dict[str, Any], match: str
) -> None:
    models = [{"model": "x", "parameters": dict(params)}, {"model": "y"}]
    data: dict[str, Any] = {"merge_method": method, "models": models}
    if params.get("weight") is None:
        models[0].pop("parameters")
        data["parameters"] = params
    if base is not None:
        data["base_model"] = base
    with pytest.raises(MergeError, match=match):
        from_mergekit(data)


def test_coefficients_with_unnormalized_multislerp_weights_are_refused() -> None:
    data = {
        "merge_method": "multislerp",
        "models": [_entry("x", 2.0), _entry("y", 2.0)],
        "parameters": {"normalize_weights": False},
        "coefficients": "nan",
    }
    with pytest.raises(MergeError, match="normalize_weights: false"):
        from_mergekit(data)

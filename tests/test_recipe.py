"""Recipe loading: every wrong type is a recipe error, and YAML aliases cannot explode."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import nanmerge
from nanmerge import MergeError, load_recipe
from nanmerge._yaml import MAX_ALIAS_NODES, yaml_value
from tests.conftest import Family

# Nine levels of nine aliases: 9**9 (387 million) leaves once expanded, under 1 KB as text.
BILLION_LAUGHS = "models: [a.safetensors]\nmethod: weight_average\nparameters:\n" + "".join(
    f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
    for i in range(9)
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_alias_bomb_is_refused_at_load_before_anything_expands_it(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(MergeError, match=r"aliases \(\*name\) expand to \d+ more nodes") as info:
        load_recipe(write(tmp_path, BILLION_LAUGHS))
    assert time.perf_counter() - start < 5  # counted per distinct node, never expanded
    assert str(tmp_path / "recipe.yaml") in str(info.value)


def test_a_few_aliases_reusing_a_block_are_accepted(tmp_path: Path) -> None:
    text = (
        "models:\n  - {path: &p a.safetensors, coefficient: &c 0.5}\n"
        "  - {path: b.safetensors, coefficient: *c}\nbase: *p\nmethod: weight_average\n"
        "coefficients: manual\n"
    )
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.base == "a.safetensors"
    assert [m.coefficient for m in recipe.models] == [0.5, 0.5]


def test_aliases_expanding_just_past_the_bound_are_refused(tmp_path: Path) -> None:
    block = "[" + ", ".join(["x"] * 99) + "]"  # 100 nodes per alias
    aliases = ", ".join(["*b"] * (MAX_ALIAS_NODES // 100 + 1))
    text = f"models: [a]\nmethod: m\nparameters: {{b: &b {block}, c: [{aliases}]}}\n"
    with pytest.raises(MergeError, match="over the limit"):
        load_recipe(write(tmp_path, text))


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    text = "models: [a]\nmethod: weight_average\nparameters: {x: &p [1, *p]}\n"
    with pytest.raises(MergeError, match=r"line 3.*alias to itself"):
        load_recipe(write(tmp_path, text))


def test_deeply_nested_yaml_is_a_recipe_error_not_a_crash(tmp_path: Path) -> None:
    text = "models: " + "[" * 5000 + "]" * 5000 + "\nmethod: weight_average\n"
    with pytest.raises(MergeError, match="nested too deeply"):
        load_recipe(write(tmp_path, text))


PATH_HINT = "expected a checkpoint path or Hugging Face repo id"


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"base": ["base.safetensors"]}, "base", PATH_HINT),
        ({"base": 3}, "base", PATH_HINT),
        ({"models": [123]}, "models.0.path", PATH_HINT),
        ({"models": [None]}, "models.0.path", PATH_HINT),
        ({"models": [{"path": ["a"]}]}, "models.0.path", PATH_HINT),
        ({"models": [["a"]]}, "models.0.path", PATH_HINT),
        ({"output": 5}, "output", "not a valid path"),
        ({"statistics": 3}, "statistics", "valid list"),
        ({"copy_files_from": ["x"]}, "copy_files_from", "valid string"),
        ({"coefficients": 3}, "coefficients", "valid dictionary"),
        ({"parameters": {"scale": [0.3]}}, "parameters", "scale: [0.3] is a bare list"),
        ({"coefficients": {"estimator": "nan", "eps": {"a": 1}}}, "coefficients", "eps is a dict"),
    ],
)
def test_a_wrong_type_in_any_field_is_a_recipe_error_naming_the_field(
    fields: dict[str, object], where: str, says: str
) -> None:
    recipe = {"models": ["a.safetensors"], "method": "weight_average", **fields}
    with pytest.raises(MergeError) as info:
        load_recipe(recipe)
    line = next(x for x in str(info.value).splitlines() if x.startswith(f"  - {where}:"))
    assert says in line


def test_self_referential_parameters_from_python_are_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(MergeError, match=r"scale\[0\]: \[\[...\]\] is not a filter entry"):
        load_recipe({"models": ["a"], "method": "task_arithmetic", "parameters": {"scale": loop}})


def test_plain_integer_max_shard_size_is_bytes(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = nanmerge.merge(
        {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": "weight_average",
            "output": str(out),
            "max_shard_size": 40,  # each float tensor (32-48 bytes) gets a shard of its own
        }
    )
    assert isinstance(report, dict)
    shards = report["output"]["weight_files"]
    assert len(shards) >= 3
    names = {n for s in shards for n in load_file(out / s)}
    assert names == set(family.base_tensors)


def test_unreadable_max_shard_size_fails_in_the_plan(family: Family, tmp_path: Path) -> None:
    recipe = {
        "base": str(family.base),
        "models": [str(p) for p in family.models],
        "method": "weight_average",
        "output": str(tmp_path / "out"),
        "max_shard_size": "2 parsecs",
    }
    with pytest.raises(MergeError, match="max_shard_size: cannot read size '2 parsecs'"):
        nanmerge.merge(recipe)
    assert not (tmp_path / "out").exists()


def test_exponents_without_a_decimal_point_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 would read `1e-8` as a string; recipes and --param flags read a float."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "models: [a.safetensors]\nmethod: ties\nparameters: {density: 5e-1, scale: 1E0}\n"
        "coefficients: {estimator: nan, eps: 1e-8}\n"
    )
    recipe = load_recipe(path)
    assert recipe.parameters == {"density": 0.5, "scale": 1.0}
    assert recipe.coefficients.options == {"eps": 1e-8}
    assert yaml_value("2e3") == 2000.0 and yaml_value("12") == 12 and yaml_value("x1e2") == "x1e2"

"""The layers import only what DESIGN.md allows, and the docs name every method and command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nanmerge.cli import main
from nanmerge.methods import METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "nanmerge"
ALLOWED = {
    "_types": set(),
    "_version": set(),
    # Parameters checked from signatures (pydantic, loaded on first check) and the one
    # "did you mean": shared by methods, estimators and the recipe model.
    "_params": set(),
    # The SVDs (exact with a float64 retry, and randomized): the subspace methods and LoRA writer.
    "_linalg": set(),
    "_schedule": {"_types"},
    "_yaml": {"_types"},
    "methods": {"_types", "_params", "_linalg", "methods"},
    "coefficients": {"_types", "_params", "coefficients"},
    "io": {"_types", "_linalg", "io"},
    "engine": {
        "_types",
        "_version",
        "_schedule",
        "io",
        "coefficients",
        "methods",
        "config",
        "engine",
    },
    "recipes": {"_types", "_schedule", "recipes"},
    "config": {"_types", "_params", "_schedule", "_yaml", "config", "recipes"},
    # search (learn/_search*) drives merges: it checks recipes and merges through the engine
    "learn": {"_types", "_params", "_yaml", "coefficients", "config", "engine", "methods", "learn"},
    "cli": {
        "_types",
        "_yaml",
        "config",
        "engine",
        "cli",
        "coefficients",
        "methods",
        "io",
        "bench",
        "learn",
    },
    # The package's face: eager imports of torch-free layers, lazy re-exports of the rest.
    "__init__": {"_types", "_version", "config", "coefficients", "engine", "methods"},
    "__main__": {"cli"},
    # Old import paths of modules that moved into learn/ (documented in README.md).
    "statistics": {"learn"},
    "adamerging": {"learn"},
    # The benchmarks use the library like a user would; nothing imports them.
    "bench": {"__init__", "_types", "bench", "coefficients", "learn"},
}


def nanmerge_imports(path: Path) -> set[str]:
    """The top-level nanmerge layers a module imports (module-level and lazy imports)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if node.level == 0 and parts[0] == "nanmerge":
                layers.add(parts[1] if len(parts) > 1 else "__init__")
            elif node.level > 0:
                layers.add(path.relative_to(SRC).parts[0].removesuffix(".py"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nanmerge":
                    layers.add(parts[1] if len(parts) > 1 else "__init__")
    return layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_the_design_allows(layer: str) -> None:
    files = list((SRC / layer).rglob("*.py")) if (SRC / layer).is_dir() else [SRC / f"{layer}.py"]
    for path in files:
        extra = nanmerge_imports(path) - ALLOWED[layer]
        assert not extra, f"{path.relative_to(SRC)} imports {sorted(extra)}"


def test_every_top_level_module_has_a_row_in_the_table() -> None:
    """A new module or package must say what it may import before the test above checks it."""
    found = {p.stem for p in SRC.glob("*.py")} | {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert found == set(ALLOWED), (
        f"missing from ALLOWED: {sorted(found - set(ALLOWED))}; "
        f"no such module: {sorted(set(ALLOWED) - found)}"
    )


def test_modules_that_moved_keep_their_documented_import_paths() -> None:
    from nanmerge import adamerging, learn, statistics

    for name in ("compute_statistics", "save_statistics", "load_source", "Kind"):
        assert getattr(statistics, name) is getattr(learn, name)
    for name in ("adamerging", "save_coefficients", "entropy", "AdaMergingResult"):
        assert getattr(adamerging, name) is getattr(learn, name)


def test_nothing_outside_bench_and_cli_imports_bench() -> None:
    for path in SRC.rglob("*.py"):
        if path.parts[len(SRC.parts)] in {"bench", "cli"}:
            continue
        assert "bench" not in nanmerge_imports(path), path


def test_readme_names_every_method_and_command() -> None:
    readme = (SRC.parents[1] / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for name in METHODS:
        assert f"`{name}`" in readme, name
    for command in ("run", "merge", "coefficients", "methods", "stats"):
        assert command in main.commands
        assert f"nanmerge {command}" in readme, command


def test_the_engine_and_cli_name_no_method_or_estimator() -> None:
    """What they need to know about a method or estimator comes from its registry entry."""
    from nanmerge.coefficients import ESTIMATORS

    names = set(METHODS) | set(ESTIMATORS)
    for path in [*(SRC / "engine").rglob("*.py"), *(SRC / "cli").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(f"{path.relative_to(SRC)}:{node.lineno} names {node.value!r}")

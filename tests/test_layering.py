"""The layers import only what DESIGN.md allows, and the docs name every method and command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nanmerge.cli import main
from nanmerge.methods import METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "nanmerge"
ALLOWED = {
    "methods": {"_types", "methods"},
    "coefficients": {"_types", "coefficients"},
    "io": {"_types", "io"},
    "engine": {"_types", "_version", "io", "coefficients", "methods", "config", "engine"},
    "config": {"_types", "config", "_mergekit"},
    "cli": {
        "_types",
        "config",
        "engine",
        "cli",
        "coefficients",
        "methods",
        "io",
        "bench",
        "statistics",
    },
    "statistics": {"_types"},
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


def test_nothing_outside_bench_and_cli_imports_bench() -> None:
    for path in SRC.rglob("*.py"):
        if path.parts[len(SRC.parts)] in {"bench", "cli.py"}:
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

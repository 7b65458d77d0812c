"""Recipes as YAML: PyYAML's safe loader, bounded against alias bombs, reading numbers as a
recipe's reader expects them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nanmerge._types import MergeError

# Aliases (`*name`) may add at most this many nodes to a YAML recipe, counted as expanded.
MAX_ALIAS_NODES = 10_000


class _AliasBomb(yaml.YAMLError):
    """Aliases that would expand a small file into a huge or endless structure."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes under `node` counting each alias as a full copy (what a dump or deep copy makes);
    `sizes` memoizes by node, so the count costs one visit per distinct node."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        mark = node.start_mark
        raise _AliasBomb(
            f"the node anchored at line {mark.line + 1}, column {mark.column + 1} holds an "
            "alias to itself, a structure without end; write it out without the alias"
        )
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    return sizes[key]


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing recursive aliases and aliases that expand past a bound.

    Aliases are allowed, not refused: a hand-written recipe (mergekit's included) may reuse a
    block with `&name` / `*name`, which adds a few nodes. A "billion laughs" (aliases of lists
    of aliases) is tiny as a file and as loaded objects, which share structure, but the
    report copies and dumps the recipe and would expand it without bound; it is refused here,
    where the message can name the file. The check visits each distinct node once.
    """

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        sizes: dict[int, int] = {}
        added = 0 if node is None else _expanded_size(node, sizes, set()) - len(sizes)
        if added > MAX_ALIAS_NODES:
            raise _AliasBomb(
                f"its aliases (*name) expand to {added} more nodes, over the limit of "
                f"{MAX_ALIAS_NODES}; write the repeated parts out or use fewer aliases"
            )
        return node


# YAML 1.1 (PyYAML) reads `1e-8` as a string; YAML 1.2 and every reader of the recipe
# expect a number, so exponents without a decimal point are floats here too.
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_value(text: str) -> Any:
    """A value written on the command line (`--param density=1e-1`), read as in a recipe."""
    return yaml.load(text, Loader=_RecipeLoader)


def read_yaml(path: Path) -> Any:
    """A recipe file's YAML, read safely: a bomb, bad YAML or deep nesting is a MergeError."""
    return _read(path, lambda text: yaml.load(text, Loader=_RecipeLoader))


def read_yaml_documents(path: Path) -> list[Any]:
    """A recipe file's YAML documents (several when `---` separates them, as in mergekit-mega's
    recipes), each read as `read_yaml` reads one; empty documents are dropped."""
    documents = _read(path, lambda text: list(yaml.load_all(text, Loader=_RecipeLoader)))
    return [d for d in documents if d is not None]


def _read(path: Path, load: Callable[[str], Any]) -> Any:
    try:
        return load(path.read_text())
    except _AliasBomb as exc:
        raise MergeError(f"recipe {path} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise MergeError(f"recipe {path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise MergeError(
            f"recipe {path} is nested too deeply to read; a recipe needs a few levels at most"
        ) from None

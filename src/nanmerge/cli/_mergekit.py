"""mergekit's command-line habits on `nanmerge run`: its common flags and mergekit-mega's
multi-document recipes.

The flags come from one table: a flag that means something here sets a Recipe field (its
help is that field's description, so flag and YAML cannot drift); the others are accepted
with a one-line note saying why they change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from nanmerge.config import Recipe, load_recipe, load_recipes


@dataclass(frozen=True)
class MergekitFlag:
    """One of mergekit-yaml's flags: the Recipe field it sets (to `value` for a switch, else
    to the flag's own value), or, without a field, what it means here (printed as a note
    when `note`)."""

    name: str
    field: str | None = None
    value: Any = None
    meaning: str = ""
    note: bool = False

    @property
    def dest(self) -> str:
        return "mergekit_" + self.name.replace("-", "_")

    @property
    def help(self) -> str:
        if self.field is None:
            return f"mergekit's flag, accepted: {self.meaning}"
        description = Recipe.model_fields[self.field].description or ""
        value = "" if self.value is None else f" {self.value}"
        return f"mergekit's flag: sets {self.field}{value} ({description})"


MERGEKIT_FLAGS = (
    MergekitFlag("cuda", field="device", value="cuda"),
    MergekitFlag("out-shard-size", field="max_shard_size"),
    MergekitFlag(
        "copy-tokenizer",
        meaning="nanmerge copies the base's tokenizer files (or copy_files_from's) anyway",
    ),
    MergekitFlag(
        "lazy-unpickle",
        meaning="nanmerge always reads one tensor at a time, so it changes nothing",
        note=True,
    ),
    MergekitFlag(
        "allow-crimes",
        meaning="nanmerge checks tensor names and shapes, not architecture names, so there "
        "is nothing to allow",
        note=True,
    ),
)


def mergekit_options(command: Any) -> Any:
    """Add MERGEKIT_FLAGS to a click command, each as the keyword `flag.dest`."""
    for flag in reversed(MERGEKIT_FLAGS):
        takes_value = flag.field is not None and flag.value is None
        option = click.option(
            f"--{flag.name}", flag.dest, is_flag=not takes_value, default=None, help=flag.help
        )
        command = option(command)
    return command


def flag_updates(given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The Recipe fields the given mergekit flags set, and the notes they are accepted with."""
    updates: dict[str, Any] = {}
    notes = []
    for flag in MERGEKIT_FLAGS:
        value = given.get(flag.dest)
        if value is None or value is False:
            continue
        if flag.field is not None:
            updates[flag.field] = value if flag.value is None else flag.value
        elif flag.note:
            notes.append(f"--{flag.name}: {flag.meaning}")
    return updates, notes


def load_chain(path: Path, updates: dict[str, Any], notes: list[str]) -> list[Recipe]:
    """The recipes of a recipe file, in the order to run them (one for a plain recipe), each
    with `updates` applied and `notes` added."""
    return [_updated(recipe, updates, notes) for recipe in load_recipes(path)]


def _updated(recipe: Recipe, updates: dict[str, Any], notes: list[str]) -> Recipe:
    if not updates and not notes:
        return recipe
    data = {**recipe.model_dump(), **updates}
    data["notes"] = [*recipe.notes, *notes]
    return load_recipe(data)

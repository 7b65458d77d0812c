"""Loading recipes: from an object, a mapping or a YAML file (one document or a chain of
mergekit-mega documents), with every problem reported at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nanmerge._params import did_you_mean
from nanmerge._types import MergeError
from nanmerge._yaml import read_yaml, read_yaml_documents
from nanmerge.config._model import ModelEntry, Recipe, Slice, SliceSource
from nanmerge.recipes import chain_order, from_mergekit


def _describe(error: Any) -> str:
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden":
        valid = ModelEntry.model_fields if loc[0] == "models" else Recipe.model_fields
        if loc[0] == "slices":
            valid = SliceSource.model_fields if "sources" in loc[:-1] else Slice.model_fields
        return f"{where}: unknown field{did_you_mean(str(loc[-1]), valid)}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def load_recipes(path: str | os.PathLike[str]) -> list[Recipe]:
    """A YAML file's recipes in the order to run them: one, or one per YAML document (the
    multi-document form of mergekit-mega, each with its own `out_path`); every document's
    problems are reported in one error before any recipe runs."""
    documents = read_yaml_documents(Path(path)) if Path(path).is_file() else []
    if len(documents) < 2:
        return [load_recipe(path)]
    recipes, errors = [], []
    for i in chain_order(documents, str(path)):
        try:
            recipes.append(load_recipe(documents[i], where=f"{path} (document {i + 1})"))
        except MergeError as exc:
            errors.append(str(exc))
    if errors:
        raise MergeError("\n".join(errors))
    return recipes


def load_recipe(
    source: Recipe | Mapping[str, Any] | str | os.PathLike[str], *, where: str = "recipe"
) -> Recipe:
    """Build a Recipe from an object, a mapping or a YAML file; report every error at once.
    `where` names a mapping's origin in messages (a file names itself)."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise MergeError(f"recipe file not found: {path}")
        data = read_yaml(path)
        if not isinstance(data, Mapping):
            raise MergeError(f"recipe {path} must be a YAML mapping with `models` and `method`")
        where = str(path)
    else:
        data = source
    if "merge_method" in data:  # mergekit's schema
        data = from_mergekit(data, where=where)
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        errors = exc.errors()
        if "models" not in data and any(e["loc"][:1] == ("slices",) for e in errors):
            # `models` defaults to the slices' sources: a broken slice is the one cause
            errors = [e for e in errors if e["loc"][:1] != ("models",)]
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        fields = ", ".join(Recipe.model_fields)
        raise MergeError(
            f"{where} has {len(errors)} error(s):\n{lines}\nvalid fields: {fields}"
        ) from None

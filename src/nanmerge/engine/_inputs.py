"""The recipe's inputs: opened (paths, hub repos, in-memory state dicts), the local paths the
output must not touch, and which inputs are one model listed twice."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nanmerge._types import Checkpoint, MergeError
from nanmerge.config import Recipe
from nanmerge.io import Protected, StateDictCheckpoint, open_model, protected_paths

IN_MEMORY_BASE = "<in-memory base>"


def side_file_folder(checkpoints: list[Checkpoint]) -> Path | None:
    """Where the output's config and tokenizer come from by default: the first input folder,
    the base's when it has one."""
    for ckpt in checkpoints:
        folder = getattr(ckpt, "folder", None)
        if folder is not None:
            return Path(folder)
    return None


def inputs_on_disk(
    recipe: Recipe,
    base: Checkpoint | None,
    models: list[Checkpoint | None],
    copy_from: Path | None,
) -> list[Protected]:
    """Every local path the merge reads (hub snapshots included), for the output to avoid."""
    labels = ["base", *(f"models[{i}]" for i in range(len(recipe.models)))]
    pairs: list[tuple[str, object]] = [
        *zip(labels, [recipe.base, *(m.path for m in recipe.models)], strict=True),
        *(
            (label, getattr(c, "folder", None))
            for label, c in zip(labels, [base, *models], strict=True)
        ),
        *((f"statistics[{i}]", s) for i, s in enumerate(recipe.statistics or [])),
        ("copy_files_from", copy_from),
    ]
    return protected_paths(pairs)


def open_inputs(
    recipe: Recipe, problems: list[str]
) -> tuple[Checkpoint | None, list[Checkpoint | None]]:
    def attempt(source: Any, name: str, base: Checkpoint | None = None) -> Checkpoint | None:
        try:
            if not isinstance(source, str):  # the recipe admits only a state dict or a module
                tensors = source if isinstance(source, Mapping) else source.state_dict()
                return StateDictCheckpoint(tensors, name)
            # a LoRA adapter among the models is read over the base
            return open_model(source, base=base, allow_downloads=recipe.allow_downloads)
        except MergeError as exc:
            problems.append(str(exc))
            return None

    base = None if recipe.base is None else attempt(recipe.base, IN_MEMORY_BASE)
    return base, [attempt(m.path, f"<in-memory #{i}>", base) for i, m in enumerate(recipe.models)]


def _identity(source: Any, ckpt: Checkpoint) -> object:
    """What makes two inputs one model: the object for in-memory ones, else the file or folder
    read (device and inode, so relative paths, symlinks and hard links agree), else the name
    (a Hugging Face repo id)."""
    if not isinstance(source, str):
        return id(source)
    try:
        st = os.stat(ckpt.source)
    except OSError:
        return ckpt.source
    return (st.st_dev, st.st_ino)


def same_file_pairs(recipe: Recipe, models: list[Checkpoint]) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, of models that are one file or object (already warned about)."""
    keys = [_identity(e.path, c) for e, c in zip(recipe.models, models, strict=True)]
    return {(i, j) for j, kj in enumerate(keys) for i, ki in enumerate(keys[:j]) if ki == kj}


def repeated_inputs(recipe: Recipe, base: Checkpoint | None, models: list[Checkpoint]) -> list[str]:
    """Warnings for a model listed twice, or listed next to itself as the base.

    Only the same file (or object) counts. Equal content under two files is not looked for:
    telling copies apart soundly needs every byte of both, a whole extra read per pair, and
    a model equal to the base shows anyway as a zero task-vector norm.
    """
    seen: dict[object, str] = {}
    if base is not None:
        seen[_identity(recipe.base, base)] = "the base"
    warnings = []
    for i, (entry, ckpt) in enumerate(zip(recipe.models, models, strict=True)):
        key = _identity(entry.path, ckpt)
        if key not in seen:
            seen[key] = f"models[{i}]"
        elif seen[key] == "the base":
            warnings.append(
                f"models[{i}] ({ckpt.source}) is the base model itself: its task vector is "
                "zero, so task-vector methods gain nothing from it and averages are pulled "
                "toward the base; remove it unless that is what you want"
            )
        else:
            warnings.append(
                f"models[{i}] ({ckpt.source}) is the same model as {seen[key]}: it is merged "
                "twice, with twice its weight; list it once (with coefficients: manual to "
                "weight it)"
            )
    return warnings


def display_names(models: list[Checkpoint]) -> tuple[str, ...]:
    names = [m.source for m in models]
    return tuple(n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names))

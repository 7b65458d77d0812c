"""Rebuild task t's model from a merge that kept per-task masks beside its checkpoint (a
method that declares a `Rebuild`), tensor by tensor, into a Hugging Face folder.

Everything is checked before any tensor is read: the merge report, the task index, the kept
files and the base's names and shapes. The output is written as a merge's is (hidden
temporary folder, renamed on success), with the merged folder's config and tokenizer files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from nanmerge._types import Checkpoint, MergeError
from nanmerge._version import __version__
from nanmerge.io import (
    KEPT_FOLDER,
    NON_WEIGHT_FILES,
    ModelWriter,
    open_checkpoint,
    parse_size,
    protected_paths,
)
from nanmerge.methods import METHODS, MethodSpec

REPORT = "merge_report.json"


def _rebuilders() -> str:
    return ", ".join(name for name, spec in METHODS.items() if spec.rebuild is not None)


def merge_report(merged_dir: Path) -> tuple[dict[str, Any], MethodSpec]:
    """The merge report of `merged_dir` and its method, checked to be one `rebuild` follows."""
    try:
        report = json.loads((merged_dir / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeError(
            f"cannot read {merged_dir / REPORT} ({exc}); rebuild reads a folder nanmerge "
            f"merged with a method that keeps per-task masks ({_rebuilders()})"
        ) from None
    method = report.get("method", {}).get("name")
    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is None or spec.rebuild is None:
        raise MergeError(
            f"{merged_dir} was merged with '{method}', which keeps no per-task masks; rebuild "
            f"follows merges by {_rebuilders()}"
        )
    recipe = report.get("recipe", {})
    if recipe.get("slices") or recipe.get("output_format", "full") != "full":
        raise MergeError(
            f"{merged_dir} is a sliced merge or a LoRA adapter; rebuild follows a full merge "
            "of whole models"
        )
    if report.get("lines"):
        raise MergeError(
            f"{merged_dir} was merged with LiNeS, whose per-tensor scale the report does not "
            "keep, so the merged update cannot be read back; merge again without `lines`"
        )
    return report, spec


def _check_task(report: dict[str, Any], task: int) -> str:
    models = report["inputs"]["models"]
    if not 0 <= task < len(models):
        listed = ", ".join(f"{i}: {m}" for i, m in enumerate(models))
        raise MergeError(
            f"task {task} is out of range: the merge has {len(models)} models ({listed}); "
            f"give --task from 0 to {len(models) - 1}"
        )
    return str(models[task])


def _masked_names(merged: Checkpoint, kept: Checkpoint, key: str) -> list[str]:
    names = merged.keys()
    return [n for n in names if f"{key}/{n}" in kept]


def _check_inputs(
    merged: Checkpoint,
    kept: Checkpoint,
    base: Checkpoint,
    names: list[str],
    models: int,
    masks: str,
) -> None:
    """Every masked tensor is in the base with its shape, and its masks are for every model."""
    problems = []
    for name in names:
        shape = merged.meta(name).shape
        if name not in base:
            problems.append(f"'{name}' is not in the base {base.source}")
        elif base.meta(name).shape != shape:
            problems.append(
                f"'{name}' has shape {base.meta(name).shape} in the base {base.source} but "
                f"{shape} in the merged model"
            )
    if problems:
        raise MergeError(
            "the base does not match the merged model: " + "; ".join(problems[:8]) + "; give "
            "the base the merge used (--base)"
        )
    for name in names:
        stored = kept.meta(f"{masks}/{name}").shape
        if stored[0] != models:
            raise MergeError(
                f"the kept masks '{masks}/{name}' have {stored[0]} rows for {models} models; "
                "the kept files do not belong to this merge report"
            )


def _storage(merged_dir: Path, merged: Checkpoint, models: int) -> dict[str, int]:
    """Bytes of the kept files and of the merged model, against keeping every model."""
    kept = sum(p.stat().st_size for p in (merged_dir / KEPT_FOLDER).iterdir() if p.is_file())
    names = merged.keys()
    model = sum(merged.meta(n).nbytes for n in names)
    return {
        "kept_bytes": kept,
        "merged_model_bytes": model,
        "fine_tuned_models_bytes": models * model,
    }


def rebuild(
    merged_dir: str | Path,
    task: int,
    output: str | Path,
    *,
    base: str | None = None,
    overwrite: bool = False,
    allow_downloads: bool = False,
) -> dict[str, Any]:
    """Write task `task`'s model (0-based, in the merge's model order) to `output`; returns
    what the rebuild did (also written to the output's merge_report.json)."""
    merged_dir = Path(merged_dir)
    report, spec = merge_report(merged_dir)
    assert spec.rebuild is not None  # merge_report refuses a method without one
    name = _check_task(report, task)
    method, params = report["method"]["name"], report["method"]["parameters"]
    if not (merged_dir / KEPT_FOLDER).is_dir():
        raise MergeError(
            f"{merged_dir} has no {KEPT_FOLDER}/ folder of per-task masks; merge again with "
            f"{method}'s {spec.rebuild.kept_with or 'output folder intact'}"
        )
    base_source = base or report["inputs"]["base"]
    if base_source is None:
        raise MergeError(f"the report of {merged_dir} names no base; give --base")
    models = len(report["inputs"]["models"])
    readers: list[Checkpoint] = []
    try:
        merged = open_checkpoint(merged_dir)
        readers.append(merged)
        kept = open_checkpoint(merged_dir / KEPT_FOLDER)
        readers.append(kept)
        base_model = open_checkpoint(base_source, allow_downloads=allow_downloads)
        readers.append(base_model)
        names = _masked_names(merged, kept, spec.rebuild.masks)
        _check_inputs(merged, kept, base_model, names, models, spec.rebuild.masks)

        def read_kept(key: str, tensor: str) -> torch.Tensor:
            return kept[f"{key}/{tensor}"]

        whole = {} if spec.rebuild.whole is None else spec.rebuild.whole(read_kept, names, task)
        info = {
            "nanmerge_version": __version__,
            "rebuilt_from": str(merged_dir),
            "method": method,
            "task": task,
            "model": name,
            "base": str(base_source),
            "whole_model": whole,  # what every tensor needs from the whole model
            "storage": _storage(merged_dir, merged, models),
        }
        entries = [(n, merged.meta(n)) for n in list(merged.keys())]
        protected = protected_paths([("merged model", merged_dir), ("base", base_source)])
        writer = ModelWriter(
            Path(output),
            entries,
            max_shard_size=parse_size(report["recipe"].get("max_shard_size", "5GB")),
            overwrite=overwrite,
            metadata={"rebuilt_with": f"nanmerge {__version__}", "task": name},
            inputs=protected,
        )
        with writer:
            masked = set(names)
            for n, meta in entries:
                tensor = merged[n]
                if n in masked:
                    varying = {**params, **report["method"].get("per_tensor", {}).get(n, {})}
                    flat = spec.rebuild.tensor(
                        tensor,
                        base_model[n],
                        functools.partial(read_kept, tensor=n),
                        task=task,
                        params=varying,
                        whole=whole,
                    )
                    tensor = flat.reshape(meta.shape).to(meta.dtype)
                writer.write(n, tensor)
            writer.copy_files(merged_dir, NON_WEIGHT_FILES)
            writer.add_file(REPORT, json.dumps(info, indent=2))
            writer.finalize()
        return info
    finally:
        for reader in readers:
            reader.close()

"""Statistics files for data-informed methods: checked by the plan, looked up by the stream.

The recipe's `statistics` lists one safetensors file per model (written by
`nanmerge.statistics.save_statistics`), keyed by tensor name. The method's declared
statistic (`fisher` or `gram`) is read for each tensor and stacked (M, ...):

- fisher: a tensor no file holds (a buffer, say) gets zero Fisher, which the method turns
  into the coefficient-weighted average;
- gram: a tensor no file holds (norms, embeddings) is passed without `gram`, so regmean
  merges it with its `fallback` method.

A tensor held by some files but not all is an error: the files were computed on different
models.
"""

from __future__ import annotations

from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanmerge._types import MergeError, TensorMeta
from nanmerge.config import Recipe
from nanmerge.io import SafetensorsFile
from nanmerge.methods import STATISTIC_KINDS, MethodSpec

_MAX_LISTED = 8


@dataclass
class Statistics:
    """Open statistics files (one per model) for one kind, and the tensors they cover."""

    kind: str
    paths: list[Path]
    # read with pread into fresh memory, as the models are: a memory map's touched pages
    # would stay in the process's resident memory, outside the stated bound
    handles: list[SafetensorsFile]
    files: ExitStack  # closes the handles
    device: torch.device
    shapes: dict[str, tuple[int, ...]]
    names: set[str] = field(default_factory=set)

    def close(self) -> None:
        self.files.close()

    def inputs(self, name: str) -> dict[str, torch.Tensor]:
        """The method's keyword inputs for tensor `name`: {kind: (M, ...) float32} or none."""
        if name in self.names:
            stats = [h[name] for h in self.handles]
            return {self.kind: torch.stack(stats).to(device=self.device, dtype=torch.float32)}
        if STATISTIC_KINDS[self.kind].fill_missing:
            shape = (len(self.handles), *self.shapes[name])
            return {self.kind: torch.zeros(shape, dtype=torch.float32, device=self.device)}
        return {}

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "files": [str(p) for p in self.paths],
            "tensors": len(self.names),
        }


def open_statistics(
    recipe: Recipe,
    method: MethodSpec | None,
    entries: list[tuple[str, TensorMeta]],
    merged: set[str],
    problems: list[str],
) -> Statistics | None:
    """Check the statistics files against the method and the merged tensors; open them."""
    if method is None:  # an unknown method is already reported
        return None
    needed = method.statistics
    if recipe.statistics is None:
        if needed:
            problems.append(
                f"method '{method.name}' weights each model by its "
                f"{needed[0]} statistics; compute them per model with `nanmerge stats` or "
                "nanmerge.statistics.compute_statistics + save_statistics, and list the files "
                "under `statistics` (one per model, same order)"
            )
        return None
    if not needed:
        problems.append(
            f"`statistics` is given but method '{method.name}' reads none; remove `statistics`"
        )
        return None
    kind = needed[0]
    if len(recipe.statistics) != len(recipe.models):
        problems.append(
            f"statistics: {len(recipe.statistics)} file(s) for {len(recipe.models)} models; "
            "give one file per model, in the order of `models`"
        )
        return None
    paths = [Path(p) for p in recipe.statistics]
    handles = []
    files = ExitStack()
    for path in paths:
        try:
            handle = files.enter_context(closing(SafetensorsFile(path)))
        except (OSError, MergeError) as exc:
            problems.append(f"statistics file {path} cannot be read as safetensors ({exc})")
            continue
        marked = handle.metadata.get("kind")
        if marked is not None and marked != kind:
            problems.append(
                f"statistics file {path} holds '{marked}' statistics; method "
                f"'{method.name}' needs '{kind}'"
            )
        handles.append(handle)
    if len(handles) != len(paths):
        files.close()
        return None
    keys = [set(h.keys()) for h in handles]
    metas = dict(entries)
    covered = set.union(*keys) & merged
    partial = sorted(n for n in covered if not all(n in k for k in keys))
    if partial:
        problems.append(
            f"{len(partial)} tensor(s) have statistics in some files but not all: "
            + ", ".join(partial[:_MAX_LISTED])
            + ". Compute every model's statistics on the same architecture"
        )
    wrong = []
    for name in sorted(covered - set(partial)):
        want = STATISTIC_KINDS[kind].file_shape(metas[name].shape)
        for path, handle in zip(paths, handles, strict=True):
            got = tuple(handle.meta(name).shape)
            if got != want:
                wanted = (
                    f"{want}" if want else f"a weight (out, in) or a bias, not {metas[name].shape}"
                )
                wrong.append(f"'{name}' in {path}: shape {got}, expected {wanted}")
    if wrong:
        problems.append(
            f"{len(wrong)} statistics entries do not fit their tensors: "
            + "; ".join(wrong[:_MAX_LISTED])
            + ("; ..." if len(wrong) > _MAX_LISTED else "")
        )
    if not covered:
        problems.append(
            f"the statistics files share no tensor name with the models' floating tensors "
            f"(e.g. file: {sorted(keys[0])[:3]}, models: {sorted(merged)[:3]}); compute them on "
            "the merged models themselves, keyed by their state-dict names"
        )
    try:
        device = torch.device(recipe.device)
    except RuntimeError:  # reported by the plan's device check
        device = torch.device("cpu")
    shapes = {name: meta.shape for name, meta in entries}
    return Statistics(kind, paths, handles, files, device, shapes, covered - set(partial))

"""The engine's `Record`: what a method notes and keeps while merging one tensor.

Notes go to the merge report under `method_notes`; kept tensors are written beside the
merged checkpoint (io `KeptWriter`) as `<key>/<tensor name>`, right after the tensor is
merged, so they are held no longer than the merged tensor is.

An elementwise method runs chunk by chunk of the flattened tensor (engine/_stream.py), each
chunk with the same record. Its kept pieces are then joined along their last dimension, in
chunk order (a packed mask of (T, c / 8) bytes per chunk joins into the tensor's (T, n / 8):
chunks are a multiple of 8 entries long), and numbers noted under one key add up over the
chunks (counts and sums do; a ratio would not, so note its two sums). A method that runs on
the whole tensor notes a key once (a later value replaces it) and keeps a key once.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nanmerge._types import MergeError
from nanmerge.io import KEPT_FOLDER, KeptWriter
from nanmerge.methods import MethodSpec

Note = float | int | str
# a key becomes part of a tensor name in the kept files: no slashes, nothing odd
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def _checked_key(method: str, key: object) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise MergeError(
            f"method '{method}' used the record key {key!r}; keys are non-empty strings of "
            "letters, digits, '_', '.' and '-'"
        )
    return key


class TensorRecord:
    """The `Record` handed to a method for one tensor (see the module docstring)."""

    def __init__(self, method: str, name: str, *, chunked: bool) -> None:
        self.method = method
        self.name = name
        self.chunked = chunked
        self.notes: dict[str, Note] = {}
        self._pieces: dict[str, list[torch.Tensor]] = {}

    def note(self, key: str, value: Note) -> None:
        key = _checked_key(self.method, key)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise MergeError(
                f"method '{self.method}' noted {key} = {value!r} for tensor '{self.name}'; "
                "a note is a number or a short string"
            )
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no inf or nan: the report keeps them as words
        previous = self.notes.get(key)
        if self.chunked and isinstance(previous, int | float) and isinstance(value, int | float):
            value = previous + value
        self.notes[key] = value

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        key = _checked_key(self.method, key)
        pieces = self._pieces.setdefault(key, [])
        if pieces and not self.chunked:
            raise MergeError(
                f"method '{self.method}' kept '{key}' twice for tensor '{self.name}'; "
                "keep each key once per tensor"
            )
        if pieces and pieces[0].shape[:-1] != tensor.shape[:-1]:
            raise MergeError(
                f"method '{self.method}' kept '{key}' pieces of shapes "
                f"{tuple(pieces[0].shape)} and {tuple(tensor.shape)} for tensor '{self.name}'; "
                "a chunked method's pieces must agree in all but their last dimension"
            )
        pieces.append(tensor.detach())

    def kept(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each kept tensor, named `<key>/<tensor name>`, its chunk pieces joined; each is
        dropped from the record as it is handed out."""
        while self._pieces:
            key = next(iter(self._pieces))
            pieces = self._pieces.pop(key)
            joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            pieces.clear()
            yield f"{key}/{self.name}", joined


class Recorder:
    """One merge's records: a `TensorRecord` for each tensor whose method declares `record`,
    its notes gathered for the report (`notes`, by tensor name), its kept tensors handed to
    `keep` once the tensor is merged, or counted in `discarded` when there is nowhere to
    write them (a merge returning a state dict)."""

    def __init__(self, keep: Callable[[str, torch.Tensor], None] | None) -> None:
        self._keep = keep
        self.notes: dict[str, dict[str, Note]] = {}
        self.discarded = 0

    def start(self, spec: MethodSpec, name: str, chunked: bool) -> TensorRecord | None:
        """The record of tensor `name`, merged by `spec` chunk by chunk when `chunked`."""
        if not spec.uses_record:
            return None
        return TensorRecord(spec.name, name, chunked=chunked)

    def finish(self, record: TensorRecord) -> None:
        if record.notes:
            self.notes[record.name] = record.notes
        for kept_name, tensor in record.kept():
            if self._keep is None:
                self.discarded += 1
            else:
                self._keep(kept_name, tensor)


class KeptFiles:
    """Where a merge to a folder writes kept tensors: `KEPT_FOLDER` inside the writer's
    temporary folder, created at the first kept tensor (a method that only notes leaves no
    folder), so it is renamed into place with the model or removed with it."""

    def __init__(self, temp_dir: Path, *, max_shard_size: int, metadata: dict[str, str]) -> None:
        self._folder = Path(temp_dir) / KEPT_FOLDER
        self._max_shard_size, self._metadata = max_shard_size, metadata
        self._writer: KeptWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None:
            self._writer = KeptWriter(
                self._folder, max_shard_size=self._max_shard_size, metadata=self._metadata
            )
        self._writer.write(name, tensor)

    def finish(self, *, models: int, model_bytes: int) -> dict[str, object] | None:
        """End the kept files; what they hold against keeping every fine-tuned model
        (`models` of `model_bytes` each), or None when nothing was kept."""
        if self._writer is None:
            return None
        summary = self._writer.finish()
        every = models * model_bytes
        summary |= {
            "fine_tuned_models_bytes": every,
            "fraction_of_fine_tuned_models": summary["bytes"] / every if every else 0.0,
        }
        return summary

    def __enter__(self) -> KeptFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()


def discarded_warning(recorder: Recorder) -> None:
    """A merge returning a state dict has no folder for kept tensors: say so once."""
    if recorder.discarded:
        warnings.warn(
            f"the method kept {recorder.discarded} tensor(s) (masks, rescalers) that a merge "
            "without `output` does not return; set `output` to write them beside the model",
            stacklevel=3,
        )

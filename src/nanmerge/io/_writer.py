"""Stream tensors into Hugging Face shards inside a temporary folder; rename only on success."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from nanmerge._types import MergeError, TensorMeta

from ._hub import stays_in_source
from ._output import (
    Protected,
    clean_stale,
    move_into_place,
    output_problems,
    temp_names,
    write_lock,
)
from ._safetensors import check_writable
from ._shard import ShardFile, check_planned, free_bytes, os_error

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_Writer = TypeVar("_Writer", bound="ModelWriter")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgt")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
}


def parse_size(size: str | int) -> int:
    """Bytes in a size such as "2GB" (powers of 1000) or "500MiB" (powers of 1024).

    This is the Hugging Face `max_shard_size` convention; a plain integer means bytes.
    Units are case-insensitive and always mean bytes, never bits.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise MergeError(
                f"cannot read size {size!r}; write a number of bytes or a number with a unit, "
                "e.g. 5GB, 500MB (powers of 1000) or 4GiB, 512MiB (powers of 1024)"
            )
        number, unit = match.groups()
        value = int(float(number) * _UNITS[(unit or "b").lower()])
    if value <= 0:
        raise MergeError(f"size {size!r} must be positive")
    return value


def _plan_shards(
    entries: Sequence[tuple[str, TensorMeta]], max_shard_size: int
) -> list[list[tuple[str, TensorMeta]]]:
    """Greedy fill in write order; a tensor larger than the maximum gets a shard of its own."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, meta in entries:
        if shards[-1] and size + meta.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += meta.nbytes
    return shards


def escaping_side_files(src_folder: Path, names: Iterable[str]) -> list[str]:
    """One problem per side file among `names` in `src_folder` that resolves outside it (or
    outside the hub cache, for a snapshot): checked by the plan, and again when copying."""
    problems = []
    for name in names:
        source = src_folder / name
        if source.is_file() and not stays_in_source(source, src_folder):
            problems.append(
                f"{source} is a link to {source.resolve()}, outside {src_folder}; nanmerge "
                "copies only files inside the source folder (or the Hugging Face cache): "
                "put the file itself there, or set copy_files_from to a folder that holds it"
            )
    return problems


class ModelWriter:
    """Write a merged model as Hugging Face safetensors shards, streaming one tensor at a time.

    The shard layout is planned from `entries` up front, so each shard's header is written
    when the shard starts and every tensor's bytes are appended as they arrive: no shard is
    held in memory. Everything goes into a hidden temporary folder beside `output`, which
    `finalize()` renames into place; an error (or leaving the `with` block without
    finalizing) deletes it, so a failed merge never leaves a half-written model.
    """

    def __init__(
        self,
        output: Path,
        entries: Sequence[tuple[str, TensorMeta]],
        *,
        max_shard_size: int,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        inputs: Sequence[Protected] = (),
    ) -> None:
        self.output = Path(output)
        self.overwrite = overwrite
        self._inputs = tuple(inputs)
        if max_shard_size <= 0:
            raise MergeError(
                f"max_shard_size must be a positive number of bytes, not {max_shard_size}"
            )
        seen: set[str] = set()
        for name, meta in entries:
            if name in seen:
                raise MergeError(
                    f"tensor '{name}' is planned twice; each output name must be unique"
                )
            seen.add(name)
            check_writable(name, meta)
        self._metadata = {"format": "pt"}
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise MergeError(
                    f"safetensors metadata must map strings to strings; got {key!r}: {value!r}"
                )
            self._metadata[key] = value
        self.shards = _plan_shards(entries, max_shard_size)
        count = len(self.shards)
        self.shard_names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self._order = [
            (i, name, meta) for i, shard in enumerate(self.shards) for name, meta in shard
        ]
        self._planned = [(name, meta) for _, name, meta in self._order]
        self._next = 0
        self._part: ShardFile | None = None
        self.notes: list[str] = []
        self.planned_bytes = sum(meta.nbytes for _, meta in entries)
        self.temp_dir, self._old, self._lock = temp_names(self.output, uuid.uuid4().hex[:8])
        with self._os_errors(self.output.parent):
            self.notes += clean_stale(self.output)
            self._check_output_free()
            self._check_room()
            self.output.parent.mkdir(parents=True, exist_ok=True)
            write_lock(self._lock)  # before the folder exists: no folder is ever ownerless
            try:
                self.temp_dir.mkdir()
            except BaseException:
                self._lock.unlink(missing_ok=True)
                raise
        self._state = "open"

    def _check_output_free(self) -> None:
        problems = output_problems(self.output, overwrite=self.overwrite, inputs=self._inputs)
        if problems:
            raise MergeError("; ".join(problems))

    def _check_room(self) -> None:
        """Refuse up front when the planned output cannot fit on its file system."""
        free = free_bytes(self.output.parent)
        if free is not None and self.planned_bytes > free:
            raise MergeError(
                f"the output needs {self.planned_bytes:,} bytes but {self.output.parent} has "
                f"only {free:,} bytes free; free some space or choose an output on another "
                "file system"
            )

    @contextmanager
    def _os_errors(self, path: Path) -> Iterator[None]:
        """Operating-system faults become one-line errors naming `path`."""
        try:
            yield
        except OSError as exc:
            raise os_error(exc, Path(exc.filename or path), needed=self.planned_bytes) from None

    def _require_open(self) -> None:
        if self._state != "open":
            raise MergeError(f"the writer for {self.output} is already {self._state}")

    def _check_next(
        self, name: str, tensor: torch.Tensor, planned: Sequence[tuple[str, TensorMeta]]
    ) -> None:
        """The writer is open and `tensor` is the next planned one, with its shape and dtype."""
        self._require_open()
        check_planned(name, tensor, planned, self._next)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; names, shapes and dtypes must match the plan."""
        self._check_next(name, tensor, self._planned)
        shard = self._order[self._next][0]
        with self._os_errors(self.temp_dir / self.shard_names[shard]):
            if self._part is None:
                self._part = self.parts()[shard]
            self._part.append(tensor)  # closes the shard after its last tensor
            self._next += 1
            if self._part.written == len(self._part.entries):
                self._part = None

    def parts(self) -> list[ShardFile]:
        """The planned shards, each to be written into the temporary folder (by its
        absolute path: another process may run in another folder)."""
        return [
            ShardFile(self.temp_dir.absolute() / name, shard, self._metadata)
            for name, shard in zip(self.shard_names, self.shards, strict=True)
        ]

    def adopt(self) -> None:
        """Take every planned shard as written by others (`parts()`, in other processes),
        after checking that each file is there with its planned size."""
        self._require_open()
        if self._next:
            raise MergeError(f"the writer for {self.output} has written tensors itself")
        for part in self.parts():
            size = part.path.stat().st_size if part.path.is_file() else None
            if size != part.size:
                raise MergeError(
                    f"shard {part.path.name} of {self.output} is {size} bytes, not the "
                    f"planned {part.size}: its writer did not finish"
                )
        self._next = len(self._order)

    def _target(self, relative_name: str) -> Path:
        relative = Path(relative_name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise MergeError(f"'{relative_name}' must be a relative path inside the output folder")
        if relative_name in self.shard_names or relative_name == INDEX_FILE:
            raise MergeError(f"'{relative_name}' would overwrite a weight file of the output")
        target = self.temp_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_file(self, relative_name: str, content: str | bytes) -> None:
        """Add a file (the report, the model card) to the output folder."""
        self._require_open()
        target = self._target(relative_name)
        with self._os_errors(target):
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            else:
                target.write_bytes(content)

    def copy_files(self, src_folder: Path, names: Iterable[str]) -> list[str]:
        """Copy those of `names` that exist in `src_folder`; returns the names copied.

        A file that resolves outside `src_folder` (or outside the hub cache, for a snapshot)
        is refused with a MergeError rather than skipped: a model without its tokenizer would
        look complete and fail later, far from the cause.
        """
        self._require_open()
        names = list(names)
        escaping = escaping_side_files(Path(src_folder), names)
        if escaping:
            raise MergeError("; ".join(escaping))
        copied = []
        for name in names:
            source = Path(src_folder) / name
            if source.is_file():
                with self._os_errors(self.temp_dir / name):
                    shutil.copyfile(source, self._target(name))
                copied.append(name)
        return copied

    def finalize(self) -> Path:
        """Check every planned tensor was written, write the index, and move into place."""
        self._require_open()
        try:
            if self._next < len(self._order):
                missing = [name for _, name, _ in self._order[self._next :]]
                raise MergeError(
                    f"cannot finalize {self.output}: {len(missing)} of {len(self._order)} planned "
                    f"tensors were never written, starting with '{missing[0]}'"
                )
            if not self._order:  # a model with no tensors still gets a valid empty file
                part = self.parts()[0]
                part.start()
                part.close()
            if len(self.shards) > 1:
                self._write_index()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        return self.output

    def _write_index(self) -> None:
        weight_map = {name: self.shard_names[shard] for shard, name, _ in self._order}
        total = sum(meta.nbytes for _, _, meta in self._order)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.temp_dir / INDEX_FILE).write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )

    def _move_into_place(self) -> None:
        """Check the output again (it may have changed during the merge), then swap it in."""
        self._check_output_free()
        with self._os_errors(self.output):
            move_into_place(self.temp_dir, self._old, self.output)
        self._state = "finalized"
        self._lock.unlink(missing_ok=True)

    def abort(self) -> None:
        """Delete the temporary folder; the output is left as it was. Safe to call twice."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._part is not None:
            self._part.abandon()
            self._part = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._lock.unlink(missing_ok=True)

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

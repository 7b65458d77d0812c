"""One output shard written tensor by tensor, and the one-line errors of writing files."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from nanmerge._types import MergeError, TensorMeta

from ._safetensors import byte_view, encode_header

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


def os_error(exc: OSError, path: Path, *, needed: int = 0) -> MergeError:
    """One line for an operating-system fault: what, which path, and what to do."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        free = free_bytes(path)
        room = "" if free is None else f"; {free:,} bytes are free there"
        return MergeError(
            f"disk full while writing {path}: the output needs {needed:,} bytes{room}; free "
            "some space or choose an output on another file system"
        )
    if exc.errno == errno.EFBIG:
        return MergeError(
            f"file too large for its file system: {path}; set a smaller max_shard_size "
            "(e.g. 2GB) or write to another file system"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MergeError(f"cannot write {path}: {reason}; choose an output you may write to")
    return MergeError(f"cannot write {path}: {reason}")


def free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _start_writeback(file: BinaryIO, begin: int) -> None:
    """Have the kernel start writing the file's bytes from `begin` to disk now.

    Left alone, Linux starts writing back only once enough of memory is dirty, and each
    shard's fsync then waits for the rest (0.7-0.8 s per 2.2 GB merge in
    docs/PERFORMANCE.md, against 0.03-0.07 s with this). POSIX_FADV_DONTNEED starts that
    writeback on Linux, then drops the pages once written, so the output does not push the
    inputs out of the page cache.
    """
    if hasattr(os, "posix_fadvise"):  # not on macOS or Windows: the final fsync does it all
        os.posix_fadvise(file.fileno(), begin, file.tell() - begin, os.POSIX_FADV_DONTNEED)


def check_planned(
    name: str, tensor: torch.Tensor, planned: Sequence[tuple[str, TensorMeta]], index: int
) -> None:
    """`tensor` is number `index` of `planned`, with its name, shape and dtype."""
    if index >= len(planned):
        raise MergeError(f"tensor '{name}' was not planned: all {len(planned)} are written")
    expected, meta = planned[index]
    if name != expected:
        detail = "is out of order" if any(n == name for n, _ in planned) else "was not planned"
        raise MergeError(
            f"writer expected tensor '{expected}' next (number {index + 1} of "
            f"{len(planned)}) but got '{name}', which {detail}"
        )
    if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
        raise MergeError(
            f"tensor '{name}' has shape {tuple(tensor.shape)} and dtype {tensor.dtype} but "
            f"the plan says shape {meta.shape} and dtype {meta.dtype}"
        )


class ShardFile:
    """One planned shard: its header, then each tensor's bytes as it arrives, in plan order;
    closed (on disk) after its last tensor.

    `ModelWriter` writes its shards through these. Another process (a worker of a
    distributed merge) can write one of `ModelWriter.parts()` into the writer's temporary
    folder with the same bytes; the writer then `adopt()`s it. Picklable until written to.
    """

    def __init__(
        self, path: Path, entries: Sequence[tuple[str, TensorMeta]], metadata: dict[str, str]
    ) -> None:
        self.path, self.entries, self.metadata = Path(path), list(entries), dict(metadata)
        self.written = 0
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the shard's next planned tensor; names, shapes and dtypes must match."""
        check_planned(name, tensor, self.entries, self.written)
        try:
            self.append(tensor)
        except OSError as exc:
            raise os_error(exc, self.path) from None

    def append(self, tensor: torch.Tensor) -> None:
        """Append the next tensor, unchecked (the caller checked it against the plan)."""
        file = self.start()
        begin = file.tell()
        file.write(byte_view(tensor.detach().to("cpu").contiguous()))
        file.flush()  # bytes leave memory as each tensor arrives
        _start_writeback(file, begin)
        self.written += 1
        if self.written == len(self.entries):
            self.close()

    def start(self) -> BinaryIO:
        """The open file, its header written first."""
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - kept open until the last tensor
            self._file.write(encode_header(self.entries, self.metadata))
        return self._file

    def close(self) -> None:
        """Close the file, on disk before a rename can make the output visible."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def abandon(self) -> None:
        """Close the file without syncing: it is about to be deleted."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def size(self) -> int:
        """The complete file's bytes."""
        header = len(encode_header(self.entries, self.metadata))
        return header + sum(meta.nbytes for _, meta in self.entries)

"""Write what a method keeps beside the merged model (a task's packed mask, its rescaler
sums) as Hugging Face safetensors shards in a subfolder of the writer's temporary folder.

The kept tensors' shapes are known only as the method makes them, so a shard's header
cannot be written first, as `ModelWriter` does: each shard's bytes are appended to a spool
file as they come, and when the shard is full the header is written to the shard and the
spool copied after it. Kept tensors are a small fraction of a model (a packed mask is one
bit per entry and task), so the copy costs little. The subfolder lies inside the merge's
temporary folder: it becomes visible with the model, in the same rename, or never.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from nanmerge._types import MergeError, TensorMeta

from ._safetensors import byte_view, check_writable, encode_header
from ._writer import os_error

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

KEPT_FOLDER = "modulators"
_SPOOL = ".spool"


@contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """Operating-system faults become the writer's one-line errors naming the file."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, Path(exc.filename or path)) from None


class KeptWriter:
    """Stream tensors of any shape into `folder` as shards of at most `max_shard_size` bytes
    (a larger tensor gets a shard of its own), plus an index when there is more than one.

    Nothing is held in memory but the current shard's list of names; `finish` ends the last
    shard and names the shards as the main output names its own. `close` (also on leaving
    the `with` block) closes the spool without finishing: the caller's writer removes the
    temporary folder this one lives in.
    """

    def __init__(self, folder: Path, *, max_shard_size: int, metadata: dict[str, str]) -> None:
        self.folder = Path(folder)
        self._max = max_shard_size
        self._metadata = {"format": "pt", **metadata}
        with _os_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            self._spool: BinaryIO = open(self.folder / _SPOOL, "wb+")  # noqa: SIM115 - kept open
        self._entries: list[tuple[str, TensorMeta]] = []
        self._size = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.nbytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a name may be written once."""
        if name in self._seen:
            raise MergeError(f"kept tensor '{name}' is written twice; each name must be unique")
        meta = TensorMeta(tuple(tensor.shape), tensor.dtype)
        check_writable(name, meta)
        with _os_errors(self.folder / _SPOOL):
            if self._entries and self._size + meta.nbytes > self._max:
                self._end_shard()
            self._spool.write(byte_view(tensor.detach().to("cpu").contiguous()))
        self._entries.append((name, meta))
        self._seen.add(name)
        self._size += meta.nbytes
        self.nbytes += meta.nbytes

    def _end_shard(self) -> None:
        """Write the shard (header, then the spooled bytes) and empty the spool."""
        path = self.folder / f".shard-{len(self._shards)}"
        self._spool.flush()
        self._spool.seek(0)
        with open(path, "wb") as shard:
            shard.write(encode_header(self._entries, self._metadata))
            shutil.copyfileobj(self._spool, shard)
            shard.flush()
            os.fsync(shard.fileno())
        self._shards.append((path, [name for name, _ in self._entries]))
        self._spool.seek(0)
        self._spool.truncate()
        self._entries, self._size = [], 0

    def finish(self) -> dict[str, Any]:
        """End the last shard, name the shards, write the index; what was written, for the
        report: the weight files and the bytes of the tensors."""
        with _os_errors(self.folder):
            return self._finish()

    def _finish(self) -> dict[str, Any]:
        if self._entries or not self._shards:
            self._end_shard()
        self.close()
        (self.folder / _SPOOL).unlink(missing_ok=True)
        count = len(self._shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        weight_map: dict[str, str] = {}
        for (path, tensors), final in zip(self._shards, names, strict=True):
            path.rename(self.folder / final)
            weight_map |= dict.fromkeys(tensors, final)
        if count > 1:
            index = {"metadata": {"total_size": self.nbytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        return {"folder": self.folder.name, "weight_files": names, "bytes": self.nbytes}

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> KeptWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

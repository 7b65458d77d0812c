"""The safetensors format, read with pread into fresh buffers (no mmap) and encoded for the writer.

Reading without mmap keeps memory bounded to the tensors asked for: no file-backed pages
pile up in RSS while a large model streams through the merge.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanmerge._types import MergeError, TensorMeta

from ._checkpoint import CheckpointReader

_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Only the dtypes this torch build has; older builds lack the float8 and wide unsigned types.
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr) for code, attr in _DTYPE_NAMES.items() if hasattr(torch, attr)
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

# The official implementation refuses headers above 100 MB; a larger length means corruption.
MAX_HEADER_BYTES = 100_000_000
_FIX_HINT = "re-download or re-save it"


def _corrupt(path: str, problem: str) -> MergeError:
    return MergeError(f"safetensors file {path} looks truncated or corrupt: {problem}; {_FIX_HINT}")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, for pread and write.

    Zero-copy, unlike `bytes(...)`; the view holds a reference to `tensor`, so a temporary
    (say a `.contiguous()` copy) stays alive as long as the view does.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array._owner = tensor  # type: ignore[attr-defined]  # keeps the memory alive with the view
    return memoryview(array).cast("B")


@dataclass(frozen=True)
class _Entry:
    meta: TensorMeta
    begin: int  # absolute file offset of the first byte
    end: int


def _parse_entry(path: str, name: str, raw: Any, data_start: int, data_size: int) -> _Entry:
    if not isinstance(raw, dict):
        raise _corrupt(path, f"header entry for tensor '{name}' is not an object")
    code, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(code, str):
        raise _corrupt(path, f"tensor '{name}' has no dtype")
    if code not in DTYPES:
        raise MergeError(
            f"tensor '{name}' in {path} has dtype '{code}', which nanmerge cannot read; "
            f"supported dtypes: {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _corrupt(path, f"tensor '{name}' has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor '{name}' has invalid data_offsets {offsets!r}")
    meta = TensorMeta(tuple(shape), DTYPES[code])
    begin, end = offsets
    if end - begin != meta.nbytes:
        raise _corrupt(
            path,
            f"tensor '{name}' with shape {tuple(shape)} and dtype {code} needs {meta.nbytes} "
            f"bytes but its data_offsets span {end - begin}",
        )
    if end > data_size:
        raise _corrupt(
            path,
            f"tensor '{name}' ends at byte {end} of the data area but the file holds only "
            f"{data_size} data bytes",
        )
    return _Entry(meta, data_start + begin, data_start + end)


class SafetensorsFile(CheckpointReader):
    """One `.safetensors` file, validated at open and read one tensor at a time with pread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.folder = None
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - held until close()
        self._lock = threading.Lock()  # only for platforms without pread: seek + read
        try:
            self._entries, self.metadata = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._order = tuple(sorted(self._entries, key=lambda n: self._entries[n].begin))

    def _read_header(self) -> tuple[dict[str, _Entry], dict[str, str]]:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise _corrupt(self.source, f"the file has only {size} bytes")
        length = int.from_bytes(self._pread(8, 0), "little")
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise _corrupt(
                self.source,
                f"the header claims {length} bytes but the file has {size} bytes in all",
            )
        try:
            header = json.loads(self._pread(length, 8))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _corrupt(self.source, f"the header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _corrupt(self.source, "the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise _corrupt(self.source, "__metadata__ is not a JSON object")
        data_start = 8 + length
        entries = {
            name: _parse_entry(self.source, name, raw, data_start, size - data_start)
            for name, raw in header.items()
        }
        return entries, {str(k): str(v) for k, v in metadata.items()}

    def _pread(self, count: int, offset: int) -> bytes:
        buffer = bytearray(count)
        self._read_into(memoryview(buffer), offset, "header")
        return bytes(buffer)

    def _read_into(self, view: memoryview, offset: int, what: str) -> None:
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            else:
                with self._lock:
                    self._file.seek(offset + done)
                    got = self._file.readinto(view[done:]) or 0
            if got == 0:
                raise _corrupt(
                    self.source,
                    f"the file ended after {offset + done} bytes while reading {what}",
                )
            done += got

    def keys(self) -> Sequence[str]:
        return self._order

    def meta(self, name: str) -> TensorMeta:
        entry = self._entries.get(name)
        if entry is None:
            raise self._missing(name)
        return entry.meta

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name, lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))

    def read(self, name: str, memory: Callable[[int], torch.Tensor]) -> torch.Tensor:
        entry = self._entries.get(name)
        if entry is None:
            raise self._missing(name)
        buffer = memory(entry.end - entry.begin)
        self._read_into(byte_view(buffer), entry.begin, f"tensor '{name}'")
        return buffer.view(entry.meta.dtype).reshape(entry.meta.shape)

    def close(self) -> None:
        self._file.close()


def encode_header(entries: Sequence[tuple[str, TensorMeta]], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header for tensors laid out back to back in this order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the official writer does, so
    the data area starts aligned.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, meta in entries:
        header[name] = {
            "dtype": DTYPE_CODES[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def check_writable(name: str, meta: TensorMeta) -> None:
    """Refuse, before any work, a tensor whose dtype safetensors cannot store."""
    if meta.dtype not in DTYPE_CODES:
        raise MergeError(
            f"tensor '{name}' has dtype {meta.dtype}, which safetensors cannot store; "
            f"cast it to one of: {', '.join(str(d) for d in DTYPE_CODES)}"
        )

"""The safetensors format, read with pread into fresh buffers (no mmap) and encoded for the writer.

Reading without mmap keeps memory bounded to the tensors asked for: no file-backed pages
pile up in RSS while a large model streams through the merge.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from nanmerge._types import MergeError, TensorMeta

from ._checkpoint import CheckpointReader

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# The format's dtype codes: torch's name for each and its bytes per element. Headers are
# parsed and checked with this table alone, so reading one (`inspect --headers-only`) needs
# no torch; the torch dtype is looked up only when a reader's `meta` or tensors are asked for.
_DTYPE_NAMES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """Code -> torch dtype, for the codes this torch build has (older ones lack float8, uint64)."""
    import torch

    return {
        code: getattr(torch, attr)
        for code, (attr, _) in _DTYPE_NAMES.items()
        if hasattr(torch, attr)
    }


@functools.cache
def dtype_codes() -> dict[torch.dtype, str]:
    """Torch dtype -> code: what the writer may store."""
    return {dtype: code for code, dtype in torch_dtypes().items()}


def _unreadable(path: str, name: str, code: str, readable: Iterable[str]) -> MergeError:
    return MergeError(
        f"tensor '{name}' in {path} has dtype '{code}', which nanmerge cannot read; "
        f"supported dtypes: {', '.join(readable)}"
    )


# The official implementation refuses headers above 100 MB; a larger length means corruption.
MAX_HEADER_BYTES = 100_000_000
_FIX_HINT = "re-download or re-save it"


def _corrupt(path: str, problem: str) -> MergeError:
    return MergeError(f"safetensors file {path} looks truncated or corrupt: {problem}; {_FIX_HINT}")


def _unreadable_file(path: str, exc: OSError, doing: str) -> MergeError:
    """An operating-system fault while reading (permissions, I/O error, a vanished mount)."""
    reason = exc.strerror or type(exc).__name__
    return MergeError(
        f"cannot read {path} ({reason}) while {doing}; check that the file is readable and "
        "its disk or mount is still there"
    )


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
    code: str  # the format's dtype code, a key of _DTYPE_NAMES
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int


def _parse_entry(path: str, name: str, raw: Any, data_start: int, data_size: int) -> _Entry:
    if not isinstance(raw, dict):
        raise _corrupt(path, f"header entry for tensor '{name}' is not an object")
    code, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(code, str):
        raise _corrupt(path, f"tensor '{name}' has no dtype")
    if code not in _DTYPE_NAMES:
        raise _unreadable(path, name, code, _DTYPE_NAMES)
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
    nbytes = math.prod(shape) * _DTYPE_NAMES[code][1]
    begin, end = offsets
    if end - begin != nbytes:
        raise _corrupt(
            path,
            f"tensor '{name}' with shape {tuple(shape)} and dtype {code} needs {nbytes} "
            f"bytes but its data_offsets span {end - begin}",
        )
    if end > data_size:
        raise _corrupt(
            path,
            f"tensor '{name}' ends at byte {end} of the data area but the file holds only "
            f"{data_size} data bytes",
        )
    return _Entry(code, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: str, entries: Mapping[str, _Entry], data_start: int, end: int) -> None:
    """Refuse overlaps, gaps and trailing bytes, as the safetensors library does: sorted by
    offsets, the tensors must tile the data area from its first byte to the end of the file.

    Bytes that no tensor claims, or that two claim, mean the header and the data disagree.
    """
    position, previous = data_start, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            ends = (
                "the data area starts at byte 0"
                if previous is None
                else f"tensor '{previous}' ends at byte {position - data_start}"
            )
            problem = (
                "their data overlap"
                if entry.begin < position
                else f"the {entry.begin - position} bytes between belong to no tensor"
            )
            raise _corrupt(
                path,
                f"tensor '{name}' starts at byte {entry.begin - data_start} of the data area "
                f"but {ends}; {problem}",
            )
        position, previous = entry.end, name
    if position != end:
        last = "the header" if previous is None else f"the last tensor '{previous}'"
        raise _corrupt(
            path, f"{end - position} bytes that belong to no tensor follow {last} in the file"
        )


class _DuplicateKey(ValueError):
    """A JSON object names one key twice; json.loads alone would keep only the last."""


def _header_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A header JSON object, refused where the safetensors library (serde_json) refuses it:
    a key given twice, or a lone surrogate escape in a key or string value."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        for text in (key, value):
            if isinstance(text, str) and not _is_unicode(text):
                raise ValueError(f"{text!r} has a lone surrogate escape")
        obj[key] = value
    return obj


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


class SafetensorsFile(CheckpointReader):
    """One `.safetensors` file, validated at open and read one tensor at a time with pread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.folder = None
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise _unreadable_file(self.source, exc, "opening it") from None
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
            header = json.loads(
                self._pread(length, 8).decode("utf-8"),
                object_pairs_hook=_header_object,
                parse_constant=_no_constant,
            )
        except _DuplicateKey as exc:
            raise _corrupt(self.source, f"the header names '{exc}' twice") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise _corrupt(self.source, f"the header is not valid JSON ({exc})") from None
        except RecursionError:
            raise _corrupt(self.source, "the header nests JSON too deeply") from None
        if not isinstance(header, dict):
            raise _corrupt(self.source, "the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _corrupt(self.source, "__metadata__ is not a JSON object of strings")
        data_start = 8 + length
        entries = {
            name: _parse_entry(self.source, name, raw, data_start, size - data_start)
            for name, raw in header.items()
        }
        _check_layout(self.source, entries, data_start, size)
        return entries, metadata

    def _pread(self, count: int, offset: int) -> bytes:
        buffer = bytearray(count)
        self._read_into(memoryview(buffer), offset, "header")
        return bytes(buffer)

    def _read_into(self, view: memoryview, offset: int, what: str) -> None:
        done = 0
        while done < len(view):
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                else:
                    with self._lock:
                        self._file.seek(offset + done)
                        got = self._file.readinto(view[done:]) or 0
            except OSError as exc:
                raise _unreadable_file(self.source, exc, f"reading {what}") from None
            if got == 0:
                raise _corrupt(
                    self.source,
                    f"the file ended after {offset + done} bytes while reading {what}",
                )
            done += got

    def keys(self) -> Sequence[str]:
        return self._order

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise self._missing(name)
        return entry

    def meta(self, name: str) -> TensorMeta:
        entry = self._entry(name)
        dtypes = torch_dtypes()
        if entry.code not in dtypes:
            raise _unreadable(self.source, name, entry.code, dtypes)
        return TensorMeta(entry.shape, dtypes[entry.code])

    def header(self, name: str) -> tuple[tuple[int, ...], str, int]:
        entry = self._entry(name)
        return entry.shape, _DTYPE_NAMES[entry.code][0], entry.end - entry.begin

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        return self.read(name, lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))

    def read(self, name: str, memory: Callable[[int], torch.Tensor]) -> torch.Tensor:
        entry = self._entry(name)
        buffer = memory(entry.end - entry.begin)
        self._read_into(byte_view(buffer), entry.begin, f"tensor '{name}'")
        return buffer.view(self.meta(name).dtype).reshape(entry.shape)

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
            "dtype": dtype_codes()[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def check_writable(name: str, meta: TensorMeta) -> None:
    """Refuse, before any work, a tensor whose dtype safetensors cannot store."""
    if meta.dtype not in dtype_codes():
        raise MergeError(
            f"tensor '{name}' has dtype {meta.dtype}, which safetensors cannot store; "
            f"cast it to one of: {', '.join(str(d) for d in dtype_codes())}"
        )

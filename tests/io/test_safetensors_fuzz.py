"""Mutated safetensors files: nanmerge refuses them with a MergeError or reads exactly what
the safetensors library reads; never another exception, never a hang, never a stray output."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

import nanmerge
from nanmerge._types import MergeError
from nanmerge.io import SafetensorsFile
from tests.conftest import build_family

_VALID = [
    save(
        {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "ids": torch.arange(3, dtype=torch.int64),
            "mask": torch.tensor([True, False]),
            "empty": torch.zeros(0, 2, dtype=torch.float16),
            "scalar": torch.tensor(-3, dtype=torch.int8),
        },
        metadata={"format": "pt"},
    ),
    save({"only": torch.ones(4, dtype=torch.uint8)}),
    save({}),
]
_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F4", "x"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_INT = st.integers(-3, 40) | st.integers(-(2**65), 2**65)


def _split(blob: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """The header (None unless it is a JSON object) and the data area of a well-framed file."""
    n = int.from_bytes(blob[:8], "little")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError:
        return None, blob[8 + n :]
    return (header if isinstance(header, dict) else None), blob[8 + n :]


def _frame(header_text: str, data: bytes) -> bytes:
    text = header_text.encode()
    return len(text).to_bytes(8, "little") + text + data


@st.composite
def _edit_header(draw: st.DrawFn, blob: bytes) -> bytes:
    """A structural edit of the JSON header: one field, one entry, a duplicate, or all of it."""
    header, data = _split(blob)
    if header is None:
        return blob
    names = sorted(header) or ["t"]
    name = draw(st.sampled_from(names))
    entry = header.get(name) if isinstance(header.get(name), dict) else {}
    kind = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "entry", "dup", "all"]))
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(_CODES) | _JSON)
    elif kind == "shape":
        entry["shape"] = draw(st.lists(_INT, max_size=4) | _JSON)
    elif kind == "data_offsets":
        entry["data_offsets"] = draw(st.lists(_INT, min_size=0, max_size=3) | _JSON)
    elif kind == "drop":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif kind == "entry":
        entry = draw(_JSON)
    elif kind == "dup":  # a second entry of the same name, which a dict cannot hold
        text = json.dumps(header)
        extra = json.dumps({name: entry})[1:-1]
        return _frame(text[:1] + extra + ("," if len(text) > 2 else "") + text[1:], data)
    else:
        return _frame(json.dumps(draw(_JSON)), data)
    header[name] = entry
    return _frame(json.dumps(header), data)


@st.composite
def _mutated(draw: st.DrawFn, blob: bytes | None = None) -> bytes:
    """A valid file (`blob`, or one of _VALID) after one to three random mutations."""
    blob = draw(st.sampled_from(_VALID)) if blob is None else blob
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["bytes", "data", "header", "length", "cut", "append"]))
        if kind in ("bytes", "data") and blob:
            # "data": tensor bytes only, so the file stays valid and both readers must agree.
            start = min(len(blob) - 1, 8 + int.from_bytes(blob[:8], "little"))
            first = start if kind == "data" else 0
            spots = draw(st.lists(st.integers(first, len(blob) - 1), min_size=1, max_size=4))
            raw = bytearray(blob)
            for spot in spots:
                raw[spot] = draw(st.integers(0, 255))
            blob = bytes(raw)
        elif kind == "header":
            blob = draw(_edit_header(blob))
        elif kind == "length":
            n = int.from_bytes(blob[:8], "little")
            new = draw(
                st.integers(max(0, n - 9), min(n + 9, 2**64 - 1)) | st.integers(0, 2**64 - 1)
            )
            blob = new.to_bytes(8, "little") + blob[8:]
        elif kind == "cut":
            blob = blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
        else:
            blob += draw(st.binary(min_size=1, max_size=16))
    return blob


def _ours(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with SafetensorsFile(path) as reader:
            return {name: reader[name] for name in reader}
    except MergeError:
        return None


def _peer(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(path)
    except Exception:  # the peer's refusals are its own business here
        return None


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


@settings(max_examples=1500, deadline=None)
@given(blob=_mutated())
def test_mutated_file_is_refused_or_read_as_the_library_reads_it(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(blob)
        ours = _ours(path)
        if ours is not None:
            peer = _peer(path)
            assert peer is not None, "nanmerge read a file the safetensors library refuses"
            assert _same(ours, peer)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_merge_of_a_mutated_model_fails_cleanly_or_matches_the_peer_read(
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        family = build_family(root / "in", m=2)
        blob = data.draw(_mutated(family.models[0].read_bytes()))
        family.models[0].write_bytes(blob)
        recipe = {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": "task_arithmetic",
            "output": str(root / "out"),
        }
        try:
            nanmerge.merge(recipe)
        except MergeError:
            event("refused")
            assert not (root / "out").exists()
            assert not list(root.glob(".out.partial-*"))
            return
        # Accepted: the peer reads the same file, and a clean copy of it merges identically.
        event("merged")
        save_file(load_file(family.models[0]), family.models[0])
        nanmerge.merge({**recipe, "output": str(root / "again")})
        assert _same(
            load_file(root / "out" / "model.safetensors"),
            load_file(root / "again" / "model.safetensors"),
        )

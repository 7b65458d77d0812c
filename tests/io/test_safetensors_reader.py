"""The safetensors reader against the official `safetensors` library as the peer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanmerge._types import MergeError, TensorMeta
from nanmerge.io import SafetensorsFile, open_checkpoint
from nanmerge.io import _safetensors as st_module


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=gen).to(dtype)


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES += [torch.float8_e4m3fn, torch.float8_e5m2]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reads_official_files_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": _sample(dtype, (5, 3)),
        "vector": _sample(dtype, (7,), seed=1),
        "scalar": _sample(dtype, (), seed=2),
        "empty": _sample(dtype, (0, 4)),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    truth = load_file(path)
    with SafetensorsFile(path) as reader:
        assert set(reader.keys()) == set(truth)
        for name, expected in truth.items():
            got = reader[name]
            assert _bitwise_equal(got, expected), name
            assert reader.meta(name) == TensorMeta(tuple(expected.shape), expected.dtype)


def test_mixed_dtypes_in_one_file_read_bitwise(tmp_path: Path) -> None:
    tensors = {f"t{i}": _sample(d, (3, 5), seed=i) for i, d in enumerate(DTYPES)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"origin": "test"})
    truth = load_file(path)
    with open_checkpoint(path) as reader:
        assert isinstance(reader, SafetensorsFile)
        assert reader.metadata == {"origin": "test"}
        assert reader.source == str(path)
        assert reader.folder is None
        for name, expected in truth.items():
            assert _bitwise_equal(reader[name], expected), name


def test_keys_follow_data_order_in_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(
        {"b": torch.zeros(4), "a": torch.zeros(2, dtype=torch.int8), "c": torch.ones(1)}, path
    )
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    with SafetensorsFile(path) as reader:
        assert list(reader.keys()) == by_offset
        assert list(reader) == by_offset
        assert len(reader) == 3


def test_meta_and_keys_read_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(3, 2, dtype=torch.bfloat16), "b": torch.zeros(3)}, path)
    with SafetensorsFile(path) as reader:

        def no_reads(*args: object) -> int:
            raise AssertionError("tensor data was read")

        monkeypatch.setattr(st_module.os, "preadv", no_reads)
        assert reader.meta("w") == TensorMeta((3, 2), torch.bfloat16)
        assert reader.meta("b") == TensorMeta((3,), torch.float32)
        assert "w" in reader and "missing" not in reader
        assert sorted(reader.keys()) == ["b", "w"]


def test_tensors_are_fresh_and_independent(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, path)
    with SafetensorsFile(path) as reader:
        first = reader["w"]
        first.mul_(0)
        assert torch.equal(reader["w"], torch.arange(6, dtype=torch.float32))
        assert first.is_contiguous()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
def test_one_descriptor_per_file_kept_until_close(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((4,), float(i)) for i in range(5)}, path)
    before = len(os.listdir("/proc/self/fd"))
    reader = SafetensorsFile(path)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    for name in reader:
        reader[name]
    assert len(os.listdir("/proc/self/fd")) == before + 1
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_missing_tensor_raises_key_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, path)
    with SafetensorsFile(path) as reader, pytest.raises(KeyError, match="nope"):
        reader["nope"]


def _write_raw(path: Path, header: dict[str, object] | str, data: bytes) -> None:
    """A file with this header (a dict, or JSON text for what a dict cannot hold) and data."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(4), "z_last": torch.ones(16)}, path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(MergeError, match="truncated or corrupt") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    assert "z_last" in str(info.value)
    assert "re-download or re-save" in str(info.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x01\x02", "has only 2 bytes"),
        ((10**6).to_bytes(8, "little") + b"{}", "header claims"),
        ((5).to_bytes(8, "little") + b"{bad}", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_header_raises_naming_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(MergeError, match=problem) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


def test_byte_length_must_match_shape(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16))
    with pytest.raises(MergeError, match=r"'w'.*needs 16 bytes but its data_offsets span 12"):
        SafetensorsFile(path)


def test_offsets_outside_data_area_raise(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(16))
    with pytest.raises(MergeError, match="'w' ends at byte 24"):
        SafetensorsFile(path)


def test_unknown_dtype_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    _write_raw(path, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(MergeError, match=r"'w'.*dtype 'C64'.*supported dtypes: F64, F32"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"only": torch.arange(3, dtype=torch.int16)},
        {
            "empty_a": torch.zeros(0),
            "empty_b": torch.zeros(2, 0, 3, dtype=torch.bfloat16),
            "w": _sample(torch.float32, (3, 2)),
            "scalar": torch.tensor(7, dtype=torch.int8),
            "empty_c": torch.zeros(0, dtype=torch.bool),
            "x": _sample(torch.float16, (5,), seed=1),
        },
    ],
    ids=["no tensors", "one tensor", "zero-size tensors among others"],
)
@pytest.mark.parametrize("metadata", [None, {"format": "pt", "note": "n"}], ids=["", "metadata"])
def test_every_layout_the_library_writes_is_accepted(
    tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata=metadata)
    truth = load_file(path)
    with safe_open(path, "pt") as peer:
        peer_metadata = peer.metadata() or {}
    with SafetensorsFile(path) as reader:
        assert set(reader.keys()) == set(truth)
        assert reader.metadata == peer_metadata
        for name, expected in truth.items():
            assert _bitwise_equal(reader[name], expected), name


def _entry(name: str, begin: int, end: int) -> str:
    return (
        f'"{name}": {{"dtype": "U8", "shape": [{end - begin}], "data_offsets": [{begin}, {end}]}}'
    )


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        (
            f"{{{_entry('a', 0, 4)}, {_entry('b', 2, 6)}}}",
            6,
            "tensor 'b' starts at byte 2 of the data area but tensor 'a' ends at byte 4; "
            "their data overlap",
        ),
        (
            f"{{{_entry('a', 0, 4)}, {_entry('b', 0, 4)}}}",
            4,
            "tensor 'b' starts at byte 0 .* tensor 'a' ends at byte 4; their data overlap",
        ),
        (
            f"{{{_entry('a', 2, 6)}}}",
            6,
            "tensor 'a' starts at byte 2 of the data area but the data area starts at byte 0; "
            "the 2 bytes between belong to no tensor",
        ),
        (
            f"{{{_entry('b', 6, 10)}, {_entry('a', 0, 4)}}}",
            10,
            "tensor 'b' starts at byte 6 .* tensor 'a' ends at byte 4; the 2 bytes between",
        ),
        (
            f"{{{_entry('a', 0, 4)}}}",
            7,
            "3 bytes that belong to no tensor follow the last tensor 'a'",
        ),
        ("{}", 5, "5 bytes that belong to no tensor follow the header"),
        (f"{{{_entry('a', 0, 4)}, {_entry('a', 4, 8)}}}", 8, "the header names 'a' twice"),
        (
            '{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
            1,
            "the header names 'dtype' twice",
        ),
        ('{"__metadata__": {"k": 1}}', 0, "__metadata__ is not a JSON object of strings"),
        ('{"__metadata__": []}', 0, "__metadata__ is not a JSON object of strings"),
        (
            '{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": NaN}}',
            1,
            "NaN is not a JSON number",
        ),
        ('{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', 1, "surrogate"),
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", 0, "nests JSON too deeply"),
    ],
    ids=[
        "overlap",
        "same offsets",
        "gap at the start",
        "gap between, listed out of order",
        "trailing bytes",
        "bytes but no tensors",
        "duplicate tensor",
        "duplicate field",
        "metadata value not a string",
        "metadata not an object",
        "NaN",
        "lone surrogate",
        "deep nesting",
    ],
)
def test_malformed_files_are_refused_like_the_library_refuses_them(
    tmp_path: Path, header: str, data: int, problem: str
) -> None:
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, bytes(data))
    with pytest.raises(SafetensorError), safe_open(path, "pt"):
        pass
    with pytest.raises(MergeError, match=problem) as info:
        SafetensorsFile(path)
    assert f"safetensors file {path} looks truncated or corrupt" in str(info.value)

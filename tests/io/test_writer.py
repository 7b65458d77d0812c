"""ModelWriter and parse_size: output checked with the official `safetensors` library."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nanmerge._types import MergeError, TensorMeta
from nanmerge.io import NON_WEIGHT_FILES, ModelWriter, open_checkpoint, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10_000),
        ("1KiB", 1024),
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * 2**30),
        ("1TB", 10**12),
        ("1000", 1000),
        ("7B", 7),
        (" 5 gb ", 5 * 10**9),
        ("1.5GB", 1_500_000_000),
        (123, 123),
    ],
)
def test_parse_size_follows_hugging_face_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "5XB", "-1GB", "0", "1e9", "5 G B"])
def test_parse_size_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(MergeError):
        parse_size(text)


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed dtypes and odd sizes, so tensors do not start at aligned offsets."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "mask": torch.rand(3, generator=gen) > 0.5,
        "half": torch.randn(3, generator=gen).half(),
        "weight": torch.randn(4, 5, generator=gen),
        "brain": torch.randn(7, generator=gen).bfloat16(),
        "ids": torch.randint(0, 9, (5,), generator=gen),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


def _entries(tensors: dict[str, torch.Tensor]) -> list[tuple[str, TensorMeta]]:
    return [(n, TensorMeta(tuple(t.shape), t.dtype)) for n, t in tensors.items()]


def _write_all(writer: ModelWriter, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        writer.write(name, tensor)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_single_shard_loads_bitwise_with_official_library(tmp_path: Path) -> None:
    tensors = _model()
    out = tmp_path / "merged"
    with ModelWriter(
        out, _entries(tensors), max_shard_size=10**9, metadata={"by": "nanmerge"}
    ) as w:
        _write_all(w, tensors)
        assert w.finalize() == out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert _bitwise_equal(loaded[name], tensor), name
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "by": "nanmerge"}
    assert _leftovers(tmp_path) == []


def test_header_is_padded_to_eight_bytes(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(1)}
    with ModelWriter(tmp_path / "m", _entries(tensors), max_shard_size=100) as w:
        _write_all(w, tensors)
        w.finalize()
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0
    assert len(raw) == 8 + length + 4
    json.loads(raw[8 : 8 + length])


def test_sharded_output_matches_hand_planned_layout(tmp_path: Path) -> None:
    # 400 + 400 fit in 1000; the third starts a new shard; 1200 exceeds the max and goes alone.
    tensors = {
        "a": torch.full((100,), 1.0),
        "b": torch.full((100,), 2.0),
        "c": torch.full((100,), 3.0),
        "big": torch.full((300,), 4.0),
        "d": torch.full((25,), 5.0),
        "e": torch.full((25,), 6.0),
    }
    out = tmp_path / "merged"
    with ModelWriter(out, _entries(tensors), max_shard_size=1000) as w:
        _write_all(w, tensors)
        w.finalize()
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(p.name for p in out.iterdir()) == [*names, "model.safetensors.index.json"]
    expected_members = [["a", "b"], ["c"], ["big"], ["d", "e"]]
    for shard, members in zip(names, expected_members, strict=True):
        loaded = load_file(out / shard)
        assert list(loaded) == members
        for name in members:
            assert _bitwise_equal(loaded[name], tensors[name])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * (100 + 100 + 100 + 300 + 25 + 25)
    assert index["weight_map"] == {
        name: shard
        for shard, members in zip(names, expected_members, strict=True)
        for name in members
    }


def test_sharded_mixed_dtypes_round_trip_through_both_readers(tmp_path: Path) -> None:
    tensors = _model()
    out = tmp_path / "merged"
    with ModelWriter(out, _entries(tensors), max_shard_size=30) as w:
        _write_all(w, tensors)
        w.finalize()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for name, shard in index["weight_map"].items():
        assert _bitwise_equal(load_file(out / shard)[name], tensors[name]), name
    with open_checkpoint(out) as reader:
        assert list(reader.keys()) == list(tensors)
        for name, tensor in tensors.items():
            assert _bitwise_equal(reader[name], tensor), name


def test_tensor_bytes_reach_disk_as_they_arrive(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(10), "b": torch.ones(20)}
    with ModelWriter(tmp_path / "m", _entries(tensors), max_shard_size=10**6) as w:
        w.write("a", tensors["a"])
        shard = w.temp_dir / "model.safetensors"
        raw = shard.read_bytes()
        assert len(raw) == 8 + int.from_bytes(raw[:8], "little") + 40
        w.write("b", tensors["b"])
        w.finalize()


def test_non_contiguous_and_grad_tensors_are_written_by_value(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "p": torch.nn.Parameter(torch.ones(2))}
    with ModelWriter(tmp_path / "m", _entries(tensors), max_shard_size=100) as w:
        _write_all(w, tensors)
        w.finalize()
    loaded = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(loaded["t"], base.t().contiguous())
    assert torch.equal(loaded["p"], torch.ones(2))


def test_empty_plan_writes_a_valid_empty_model(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "m", [], max_shard_size=10) as w:
        w.finalize()
    assert load_file(tmp_path / "m" / "model.safetensors") == {}


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    tensors = _model()
    out = tmp_path / "merged"
    with (
        pytest.raises(RuntimeError, match="boom"),
        ModelWriter(out, _entries(tensors), max_shard_size=40) as w,
    ):
        w.write("mask", tensors["mask"])
        w.add_file("README.md", "card")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_leaving_with_without_finalize_aborts(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(1)}
    with ModelWriter(tmp_path / "m", _entries(tensors), max_shard_size=10) as w:
        _write_all(w, tensors)
    assert list(tmp_path.iterdir()) == []


def test_abort_deletes_temp_folder(tmp_path: Path) -> None:
    writer = ModelWriter(tmp_path / "m", _entries({"a": torch.ones(1)}), max_shard_size=10)
    assert writer.temp_dir.parent == tmp_path
    assert writer.temp_dir.name.startswith(".m.partial-")
    writer.abort()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeError, match="already aborted"):
        writer.write("a", torch.ones(1))


def test_existing_output_is_refused_and_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MergeError, match=r"already exists.*--overwrite.*another output"):
        ModelWriter(out, [], max_shard_size=10)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    a_file = tmp_path / "file_out"
    a_file.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(MergeError, match=r"is a file.*never replaces a file"):
            ModelWriter(a_file, [], max_shard_size=10, overwrite=overwrite)
    assert a_file.read_text() == "x"


def test_overwrite_refuses_a_folder_nanmerge_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "merge_report.json").write_text('{"someone_else": 1}')
    with pytest.raises(MergeError, match="was not written by nanmerge"):
        ModelWriter(out, [], max_shard_size=10, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    tensors = {"a": torch.ones(2)}
    with ModelWriter(out, _entries(tensors), max_shard_size=10) as w:
        _write_all(w, tensors)
        w.finalize()
    assert torch.equal(load_file(out / "model.safetensors")["a"], torch.ones(2))


def test_overwrite_replaces_an_earlier_nanmerge_output(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    (out / "merge_report.json").write_text('{"nanmerge_version": "0.0.1"}')
    tensors = {"a": torch.ones(2)}
    with ModelWriter(out, _entries(tensors), max_shard_size=10, overwrite=True) as w:
        _write_all(w, tensors)
        w.finalize()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["a"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_out_of_order_or_unplanned_write_raises(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(1), "b": torch.ones(1)}
    with ModelWriter(tmp_path / "m", _entries(tensors), max_shard_size=10) as w:
        with pytest.raises(MergeError, match=r"expected tensor 'a' next.*got 'b'.*out of order"):
            w.write("b", tensors["b"])
        with pytest.raises(MergeError, match="'zzz', which was not planned"):
            w.write("zzz", tensors["b"])
        with pytest.raises(MergeError, match=r"shape \(2,\).*plan says shape \(1,\)"):
            w.write("a", torch.ones(2))
        with pytest.raises(MergeError, match=r"dtype torch\.float16"):
            w.write("a", torch.ones(1, dtype=torch.float16))
        _write_all(w, tensors)
        with pytest.raises(MergeError, match="all 2 are written"):
            w.write("c", torch.ones(1))
        w.finalize()
        with pytest.raises(MergeError, match="already finalized"):
            w.write("a", torch.ones(1))


def test_finalize_with_missing_tensors_raises_and_leaves_nothing(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4)}
    out = tmp_path / "m"
    with ModelWriter(out, _entries(tensors), max_shard_size=16) as w:
        w.write("a", tensors["a"])
        with pytest.raises(MergeError, match=r"2 of 3 planned tensors were never written.*'b'"):
            w.finalize()
    assert list(tmp_path.iterdir()) == []


def test_plan_rejects_duplicates_unsupported_dtypes_and_bad_sizes(tmp_path: Path) -> None:
    meta = TensorMeta((2,), torch.float32)
    entries: Sequence[tuple[str, TensorMeta]] = [("a", meta), ("a", meta)]
    with pytest.raises(MergeError, match="'a' is planned twice"):
        ModelWriter(tmp_path / "m", entries, max_shard_size=10)
    with pytest.raises(MergeError, match="safetensors cannot store"):
        ModelWriter(tmp_path / "m", [("c", TensorMeta((2,), torch.complex64))], max_shard_size=10)
    with pytest.raises(MergeError, match="max_shard_size"):
        ModelWriter(tmp_path / "m", [("a", meta)], max_shard_size=0)
    with pytest.raises(MergeError, match="strings to strings"):
        ModelWriter(tmp_path / "m", [], max_shard_size=10, metadata={"n": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_add_file_and_copy_files(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text('{"a": 1}')
    (source / "tokenizer.json").write_text("{}")
    (source / "model.safetensors").write_text("not copied")
    out = tmp_path / "out"
    with ModelWriter(out, [], max_shard_size=10) as w:
        assert w.copy_files(source, NON_WEIGHT_FILES) == ["config.json", "tokenizer.json"]
        w.add_file("README.md", "# merged\n")
        w.add_file("plots/coef.png", b"\x89PNG")
        with pytest.raises(MergeError, match="overwrite a weight file"):
            w.add_file("model.safetensors", b"")
        with pytest.raises(MergeError, match="relative path inside"):
            w.add_file("../escape.txt", "x")
        w.finalize()
    assert (out / "config.json").read_text() == '{"a": 1}'
    assert (out / "README.md").read_text() == "# merged\n"
    assert (out / "plots" / "coef.png").read_bytes() == b"\x89PNG"
    assert not (tmp_path / "escape.txt").exists()


def test_non_weight_files_cover_hugging_face_essentials() -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert name in NON_WEIGHT_FILES
    assert not any(name.endswith(".safetensors") for name in NON_WEIGHT_FILES)

"""Shards written apart (`ModelWriter.parts()`, as other processes do) and `adopt()`ed give
the files the writer writes itself; a missing or short shard is never finalized."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from nanmerge._types import MergeError, TensorMeta
from nanmerge.io import ModelWriter

TENSORS = {f"t{i}": torch.arange(24, dtype=torch.float32).reshape(4, 6) * (i + 1) for i in range(5)}
ENTRIES = [(n, TensorMeta((4, 6), torch.float32)) for n in TENSORS]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_parts_written_apart_and_adopted_give_the_writers_own_files(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "own", ENTRIES, max_shard_size=200) as writer:
        for name, tensor in TENSORS.items():
            writer.write(name, tensor)
        writer.finalize()
    with ModelWriter(tmp_path / "apart", ENTRIES, max_shard_size=200) as writer:
        for part in reversed(writer.parts()):  # in any order, each a copy as a process gets it
            part = pickle.loads(pickle.dumps(part))
            for name, _ in part.entries:
                part.write(name, TENSORS[name])
        writer.adopt()
        writer.finalize()
    own = _files(tmp_path / "own")
    assert len(own) == 4 and _files(tmp_path / "apart") == own  # 3 shards and the index


def test_a_missing_or_short_part_is_refused_and_nothing_is_finalized(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "out", ENTRIES, max_shard_size=200) as writer:
        first, second, _ = writer.parts()
        for name, _ in first.entries:
            first.write(name, TENSORS[name])
        second.write(second.entries[0][0], TENSORS[second.entries[0][0]])
        second.abandon()  # a writer that died after its first tensor
        with pytest.raises(MergeError, match=r"00002-of-00003\.safetensors .* did not finish"):
            writer.adopt()
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_part_refuses_a_tensor_out_of_its_plan(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "out", ENTRIES, max_shard_size=200) as writer:
        part = writer.parts()[1]
        with pytest.raises(MergeError, match=r"expected tensor 't2' next .* got 't0'"):
            part.write("t0", TENSORS["t0"])

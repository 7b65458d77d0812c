"""ModelWriter.copy_files copies side files (config, tokenizer) only from inside their folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import nanmerge
from nanmerge._types import MergeError
from nanmerge.io import NON_WEIGHT_FILES, ModelWriter
from tests.conftest import build_family

TOKENIZER = b'{"version": "1.0", "model": {"type": "WordPiece"}}'


def _folder_with_linked_tokenizer(tmp_path: Path, target: Path) -> Path:
    """A source folder: a real config.json, and tokenizer.json as a link to `target`."""
    folder = tmp_path / "source"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "toy"}')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(TOKENIZER)
    (folder / "tokenizer.json").symlink_to(target)
    return folder


def test_side_file_linked_outside_the_source_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret" / "tokenizer.json"
    folder = _folder_with_linked_tokenizer(tmp_path, outside)
    with ModelWriter(tmp_path / "out", [], max_shard_size=10) as writer:
        with pytest.raises(MergeError) as info:
            writer.copy_files(folder, NON_WEIGHT_FILES)
        assert not (writer.temp_dir / "tokenizer.json").exists()
    message = str(info.value)
    assert f"{folder / 'tokenizer.json'} is a link to {outside}, outside {folder}" in message
    assert "put the file itself there" in message


def test_side_file_linked_within_the_source_folder_is_copied(tmp_path: Path) -> None:
    folder = _folder_with_linked_tokenizer(tmp_path, tmp_path / "source" / "tok" / "t.json")
    with ModelWriter(tmp_path / "out", [], max_shard_size=10) as writer:
        copied = writer.copy_files(folder, NON_WEIGHT_FILES)
        assert copied == ["config.json", "tokenizer.json"]
        assert (writer.temp_dir / "tokenizer.json").read_bytes() == TOKENIZER
        assert not (writer.temp_dir / "tokenizer.json").is_symlink()


def test_merge_with_an_escaping_tokenizer_fails_and_leaves_no_output(tmp_path: Path) -> None:
    family = build_family(tmp_path / "inputs", m=2)
    folder = _folder_with_linked_tokenizer(tmp_path, tmp_path / "secret" / "tokenizer.json")
    shutil.copyfile(family.base, folder / "model.safetensors")
    out = tmp_path / "out"
    recipe = {
        "base": str(folder),
        "models": [str(p) for p in family.models],
        "method": "task_arithmetic",
        "output": str(out),
    }
    with pytest.raises(MergeError, match=re.escape(f"{folder / 'tokenizer.json'} is a link")):
        nanmerge.merge(recipe)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))

"""Build a Hugging Face hub cache on disk, laid out as huggingface_hub writes it, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """Point HF_HUB_CACHE at `cache` and switch the Hub off, so no test reaches the network."""
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _hard_link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


def add_to_hub_cache(
    cache: Path,
    repo_id: str,
    files: Mapping[str, Path | bytes],
    *,
    revision: str = "main",
    commit: str | None = None,
) -> Path:
    """Add one snapshot of `repo_id`: blobs, a snapshot folder of symlinks, refs/<revision>.

    A Path value becomes a hard link in blobs/ where the file system allows (a large file
    costs nothing), else a copy: blobs are real files inside the cache, as huggingface_hub
    writes them, and nanmerge refuses links that leave the cache. Returns the snapshot.
    """
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    for d in (snapshot, blobs, repo_dir / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        key = content if isinstance(content, bytes) else str(Path(content).resolve()).encode()
        blob = blobs / hashlib.sha256(key + name.encode()).hexdigest()
        if not blob.exists():
            if isinstance(content, bytes):
                blob.write_bytes(content)
            else:
                _hard_link_or_copy(Path(content).resolve(), blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if revision != commit:
        (repo_dir / "refs" / revision).write_text(commit)
    return snapshot

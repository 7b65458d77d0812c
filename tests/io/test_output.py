"""The overwrite rule: a merge never touches an input or a file it did not write."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nanmerge
from nanmerge import MergeError
from nanmerge.io import ModelWriter
from nanmerge.io._output import Protected, clean_stale, collisions, temp_names, write_lock


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (links not followed) with a hash of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            digest = "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = digest
    return out


def _model(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((3,), value)}, path)


def _recipe(base: Path, models: list[Path], output: Path) -> dict[str, object]:
    return {
        "base": str(base),
        "models": [str(m) for m in models],
        "method": "task_arithmetic",
        "output": str(output),
        "overwrite": True,
    }


@pytest.mark.parametrize(
    "output",
    ["in", "in/base", "in/base/model.safetensors", "in/base/sub", "in/ft0", "."],
    ids=["holds-inputs", "is-base-folder", "is-base-file", "inside-base", "is-model", "root"],
)
def test_overwrite_never_replaces_or_writes_into_an_input(tmp_path: Path, output: str) -> None:
    _model(tmp_path / "in/base/model.safetensors", 0.0)
    _model(tmp_path / "in/ft0/model.safetensors", 1.0)
    (tmp_path / "in/notes.txt").write_text("unrelated")
    before = _snapshot(tmp_path)
    recipe = _recipe(tmp_path / "in/base", [tmp_path / "in/ft0"], tmp_path / output)
    with pytest.raises(MergeError, match=r"(is|contains|lies inside) the input (base|models\[0\])"):
        nanmerge.merge(recipe)
    assert _snapshot(tmp_path) == before


def test_output_through_a_link_to_an_input_is_refused(tmp_path: Path) -> None:
    _model(tmp_path / "in/base/model.safetensors", 0.0)
    _model(tmp_path / "ft.safetensors", 1.0)
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    before = _snapshot(tmp_path)
    recipe = _recipe(tmp_path / "in/base", [tmp_path / "ft.safetensors"], tmp_path / "alias")
    with pytest.raises(MergeError, match="contains the input base"):
        nanmerge.merge(recipe)
    assert _snapshot(tmp_path) == before


def test_collisions_see_through_a_folder_of_links(tmp_path: Path) -> None:
    """A hub snapshot holds links into the cache's blobs: the blobs are inputs too."""
    blobs = tmp_path / "cache/blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    snapshot = tmp_path / "cache/snapshots/rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blobs / "abc")
    inputs = [Protected("base", snapshot)]
    assert collisions(blobs, inputs) and collisions(tmp_path / "cache", inputs)
    assert not collisions(tmp_path / "elsewhere", inputs)


_PLACES = ["a", "a/b", "a/b/c", "d", "d/e"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base_at=st.sampled_from(_PLACES),
    model_at=st.sampled_from(_PLACES),
    as_folder=st.booleans(),
    output_at=st.sampled_from([*_PLACES, "a/b/c/new", "d/new", "new", "a/x.safetensors"]),
    earlier_output=st.booleans(),
    chained=st.booleans(),
)
def test_no_layout_of_inputs_and_output_lets_a_merge_touch_an_input(
    base_at: str,
    model_at: str,
    as_folder: bool,
    output_at: str,
    earlier_output: bool,
    chained: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for place in _PLACES:
            (root / place).mkdir(parents=True, exist_ok=True)
            (root / place / "unrelated.txt").write_text(place)
        name = "model.safetensors" if as_folder else "x.safetensors"
        base = root / base_at / "base" / name
        model = root / model_at / "ft" / name
        _model(base, 0.0)
        _model(model, 2.0)
        output = root / output_at
        if earlier_output:  # an earlier nanmerge output may be there, and may be replaced
            nanmerge.merge({**_recipe(base, [model], root / "first"), "overwrite": False})
            if not output.exists():
                (root / "first").rename(output)
                if chained:  # the earlier output is now the base: the output is an input
                    base = output / "model.safetensors"
        inputs = {str(p.relative_to(root)) for p in (base, model)}
        before = _snapshot(root)
        try:
            nanmerge.merge(_recipe(base.parent if as_folder else base, [model], output))
        except MergeError:
            assert _snapshot(root) == before
        else:
            out = str(output.relative_to(root))
            after = _snapshot(root)
            kept = {k: v for k, v in before.items() if not k.startswith(out + "/")}
            assert {k: v for k, v in after.items() if k in kept} == kept
            assert all(k in after and after[k] == before[k] for k in inputs)
            merged = nanmerge.merge({**_recipe(base, [model], output), "output": None})
            assert isinstance(merged, dict) and torch.allclose(merged["w"], torch.full((3,), 0.6))
        assert not [p for p in root.rglob(".*partial*")]


def _stale(output: Path, token: str, pid: int) -> tuple[Path, Path, Path]:
    temp, old, lock = temp_names(output, token)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": None}))
    temp.mkdir()
    (temp / "model.safetensors").write_text("half")
    return temp, old, lock


def _dead_pid() -> int:
    """A pid no process has: one past the kernel's maximum."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_a_killed_runs_temporary_folder_is_removed_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    temp, _, lock = _stale(out, "deadbeef", _dead_pid())
    with ModelWriter(out, [], max_shard_size=10) as writer:
        assert len(writer.notes) == 1 and "temporary folder" in writer.notes[0]
        assert not temp.exists() and not lock.exists()
        writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_live_merges_temporary_folder_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    temp, _, lock = _stale(out, "cafe0001", os.getpid())
    assert clean_stale(out) == []
    assert temp.exists() and lock.exists()


def test_a_previous_output_parked_by_a_killed_run_is_restored(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    _, old, _ = _stale(out, "deadbeef", _dead_pid())
    old.mkdir()
    (old / "merge_report.json").write_text('{"nanmerge_version": "1"}')
    notes = clean_stale(out)
    assert any("restored" in n for n in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (out / "merge_report.json").exists()


def test_a_temporary_folder_without_an_owner_record_is_only_mentioned(tmp_path: Path) -> None:
    orphan = tmp_path / ".merged.partial-0123abcd"
    orphan.mkdir()
    notes = clean_stale(tmp_path / "merged")
    assert len(notes) == 1 and "no owner record" in notes[0] and orphan.exists()


def test_the_owner_record_exists_exactly_while_the_writer_works(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with ModelWriter(out, [], max_shard_size=10) as writer:
        lock = Path(f"{writer.temp_dir}.lock")
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        writer.finalize()
    assert not lock.exists()
    write_lock(tmp_path / "x.lock")
    assert json.loads((tmp_path / "x.lock").read_text())["host"] == socket.gethostname()

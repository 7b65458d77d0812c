"""Faults a merge must survive: kills, full disks, unwritable targets, vanishing inputs,
overflow. After each: no output that looks complete, inputs unchanged, one clear line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import nanmerge
from nanmerge import MergeError
from nanmerge.engine import _run
from tests.conftest import Family


def _hashes(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _recipe(family: Family, out: Path, **fields: Any) -> dict[str, Any]:
    return {
        "base": str(family.base),
        "models": [str(m) for m in family.models],
        "method": "task_arithmetic",
        "output": str(out),
        **fields,
    }


_CHILD = "import sys, nanmerge; print('ready', flush=True); nanmerge.merge(sys.argv[1])"


@pytest.mark.slow
def test_a_merge_killed_at_random_points_leaves_nothing_that_looks_complete(
    tmp_path: Path,
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = [{f"t{k}": torch.randn(1 << 20, generator=gen) for k in range(8)} for _ in range(3)]
    paths = [inputs / f"m{i}.safetensors" for i in range(3)]
    for t, p in zip(tensors, paths, strict=True):
        save_file(t, p)
    before = _hashes(paths)
    recipe: dict[str, Any] = {
        "base": str(paths[0]),
        "models": [str(p) for p in paths[1:]],
        "method": "task_arithmetic",
        "max_shard_size": "5MB",
    }
    start = time.perf_counter()
    expected = nanmerge.merge(recipe)
    duration = time.perf_counter() - start
    out = tmp_path / "merged"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({**recipe, "output": str(out), "overwrite": True}))
    rng = random.Random(0)
    for sig in [signal.SIGKILL, signal.SIGTERM, signal.SIGINT] * 2:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(recipe_file)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 3 * duration))
        child.send_signal(sig)
        child.wait(timeout=60)
        assert _hashes(paths) == before
        if out.exists():  # the merge finished before the signal: then it is whole
            merged = {}
            for shard in out.glob("*.safetensors"):
                merged |= load_file(shard)
            assert merged.keys() == expected.keys() and all(
                torch.equal(merged[k], v) for k, v in expected.items()
            )
            assert (out / "merge_report.json").is_file()
        if sig != signal.SIGKILL:  # cleaned up on the way out, like Ctrl-C
            assert _leftovers(tmp_path) == [], (sig, child.returncode)
        report = nanmerge.merge(recipe_file)  # the next run succeeds and cleans up
        assert isinstance(report, dict) and _leftovers(tmp_path) == []
        assert len(report["output"]["notes"]) <= 1


def _fail_with(code: int) -> Any:
    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            errno.ENOSPC,
            r"disk full while writing .*model\.safetensors: the output needs [\d,]+ "
            r"bytes; [\d,]+ bytes are free there",
        ),
        (errno.EFBIG, r"file too large for its file system: .*model\.safetensors; set a smaller"),
        (errno.EIO, r"cannot write .*model\.safetensors: Input/output error"),
    ],
)
def test_a_write_fault_is_one_line_naming_the_file_and_removes_the_partial_output(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, message: str
) -> None:
    monkeypatch.setattr("nanmerge.io._shard._start_writeback", _fail_with(code))
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=message) as caught:
        nanmerge.merge(_recipe(family, out))
    assert "\n" not in str(caught.value)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_unwritable_target_is_one_line_naming_it(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(lock: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(lock))

    monkeypatch.setattr("nanmerge.io._writer.write_lock", refuse)
    out = tmp_path / "merged"
    with pytest.raises(
        MergeError,
        match=r"cannot write .*\.merged\.partial-.*\.lock: Permission "
        "denied; choose an output you may write to",
    ):
        nanmerge.merge(_recipe(family, out))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_output_that_cannot_fit_is_refused_before_anything_is_written(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = type("usage", (), {"free": 10, "total": 10, "used": 0})
    monkeypatch.setattr("nanmerge.io._writer.shutil.disk_usage", lambda path: usage)
    out = tmp_path / "deep" / "merged"
    needed = sum(t.numel() * t.element_size() for t in family.base_tensors.values())
    with pytest.raises(MergeError, match=f"needs {needed:,} bytes but .* has only 10 bytes free"):
        nanmerge.merge(_recipe(family, out))
    assert not (tmp_path / "deep").exists()


def _plan_then(action: Any) -> Any:
    """The engine's plan, followed by `action`: a fault between checking and reading."""
    plan = _run.plan

    def planned(*args: Any, **kwargs: Any) -> Any:
        p = plan(*args, **kwargs)
        action()
        return p

    return planned


def test_an_input_deleted_after_the_plan_still_merges_from_the_open_file(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_run, "plan", _plan_then(family.models[0].unlink))
    merged = nanmerge.merge({**_recipe(family, tmp_path / "m"), "output": None})
    assert isinstance(merged, dict)
    tau = sum(m["layer.weight"] - family.base_tensors["layer.weight"] for m in family.model_tensors)
    assert torch.allclose(merged["layer.weight"], family.base_tensors["layer.weight"] + 0.3 * tau)


def test_an_input_truncated_after_the_plan_fails_naming_it(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def truncate() -> None:
        os.truncate(family.models[1], family.models[1].stat().st_size - 8)

    monkeypatch.setattr(_run, "plan", _plan_then(truncate))
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=rf"{family.models[1]} looks truncated.*file ended"):
        nanmerge.merge(_recipe(family, out))
    assert not out.exists() and _leftovers(tmp_path) == []


def _pair(tmp_path: Path, base: torch.Tensor, model: torch.Tensor) -> dict[str, Any]:
    save_file({"w": base}, tmp_path / "base.safetensors")
    save_file({"w": model}, tmp_path / "ft.safetensors")
    return {
        "base": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "ft.safetensors")],
        "method": "task_arithmetic",
        "output": str(tmp_path / "merged"),
    }


def test_a_float16_cast_that_overflows_fails_with_the_largest_magnitude(tmp_path: Path) -> None:
    half = torch.float16
    recipe = _pair(tmp_path, torch.zeros(4, dtype=half), torch.full((4,), 6e4, dtype=half))
    with pytest.raises(
        MergeError,
        match=r"tensor 'w' overflows when cast to float16 \(largest magnitude 1\.2e\+05\)"
        r".*dtype: bfloat16",
    ):
        nanmerge.merge({**recipe, "parameters": {"scale": 2.0}})
    assert _leftovers(tmp_path) == [] and not (tmp_path / "merged").exists()
    report = nanmerge.merge({**recipe, "parameters": {"scale": 2.0}, "dtype": "bfloat16"})
    assert isinstance(report, dict)
    written = load_file(tmp_path / "merged" / "model.safetensors")["w"]
    assert torch.equal(written, torch.full((4,), 120000.0).to(torch.bfloat16))


def test_float32_arithmetic_that_overflows_fails_naming_the_tensor(tmp_path: Path) -> None:
    recipe = _pair(tmp_path, torch.zeros(4), torch.full((4,), 3e38))
    with pytest.raises(MergeError, match=r"tensor 'w' overflows in float32 \(4 of 4 entries"):
        nanmerge.merge({**recipe, "parameters": {"scale": 2.0}})
    assert _leftovers(tmp_path) == [] and not (tmp_path / "merged").exists()


def test_a_damaged_input_is_named_before_any_overflow(tmp_path: Path) -> None:
    model = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    recipe = _pair(tmp_path, torch.zeros(4), model)
    with pytest.raises(MergeError, match=r"ft\.safetensors contains NaN or Inf \(1 of 4"):
        nanmerge.merge(recipe)


def test_the_report_lists_the_notes_of_a_cleaned_up_output(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    lock = tmp_path / ".merged.partial-00000000.lock"
    lock.write_text(json.dumps({"pid": 1 << 30, "host": socket.gethostname()}))
    (tmp_path / ".merged.partial-00000000").mkdir()
    report = nanmerge.merge(_recipe(family, out))
    assert isinstance(report, dict) and "killed run" in report["output"]["notes"][0]
    assert json.loads((out / "merge_report.json").read_text())["output"]["notes"]


def test_a_read_fault_is_one_line_naming_the_input(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = _fail_with(errno.EIO)
    monkeypatch.setattr(_run, "plan", _plan_then(lambda: monkeypatch.setattr("os.preadv", failing)))
    out = tmp_path / "merged"
    with pytest.raises(
        MergeError, match=r"cannot read .*base\.safetensors \(Input/output error\) while reading "
    ):
        nanmerge.merge(_recipe(family, out))
    assert not out.exists() and _leftovers(tmp_path) == []

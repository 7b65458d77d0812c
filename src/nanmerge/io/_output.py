"""Where a merge may write: the overwrite rule, input collisions and stale temporary folders.

nanmerge may delete only what it wrote. An output may replace an empty folder or a folder
nanmerge wrote before (it holds a `merge_report.json` of ours); never a file, a link, or a
path that is, contains or lies inside an input. A run's temporary folder `.NAME.partial-T`
has an owner record `.NAME.partial-T.lock` (pid, host, process start) from before the
folder exists until the run is over, so a later run can tell a killed run's leftovers from
a live merge's work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPORT_FILE = "merge_report.json"
_LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class Protected:
    """An input the merge reads: `label` names it in messages (the recipe's words)."""

    label: str
    path: Path


def _forms(path: Path) -> set[Path]:
    """The path as written (made absolute) and as resolved, with a folder's resolved entries.

    A hub snapshot's files are links into the cache's blobs: protecting the snapshot folder
    must protect what its links point at too.
    """
    forms = {Path(os.path.abspath(path)), path.resolve()}
    if path.is_dir():
        with contextlib.suppress(OSError):
            forms |= {child.resolve() for child in path.iterdir() if child.is_symlink()}
    return forms


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


def collisions(output: Path, inputs: Iterable[Protected]) -> list[str]:
    """Problems with writing `output` given the inputs: one line per colliding input."""
    out = {Path(os.path.abspath(output)), output.resolve()}
    problems = []
    for item in inputs:
        forms = _forms(item.path)
        if any(_within(o, f) or _within(f, o) for o in out for f in forms):
            how = (
                "is"
                if any(o == f for o in out for f in forms)
                else "contains"
                if any(_within(f, o) for o in out for f in forms)
                else "lies inside"
            )
            problems.append(
                f"output {output} {how} the input {item.label} ({item.path}); nanmerge never "
                "writes over or into its inputs: choose an output outside every input"
            )
    return problems


def written_by_nanmerge(folder: Path) -> bool:
    """Whether `folder` holds a merge report that nanmerge wrote."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and "nanmerge_version" in report


def occupied(path: Path) -> bool:
    """A file, a link, or a folder with anything in it."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def replace_problem(output: Path, *, overwrite: bool) -> str | None:
    """Why `output` may not be written (or replaced with `overwrite`), or None."""
    if not occupied(output):
        return None
    if output.is_symlink() or not output.is_dir():
        kind = "a link" if output.is_symlink() else "a file"
        return (
            f"output {output} is {kind}; nanmerge writes a model folder and never replaces "
            "a file or link: choose another output"
        )
    if not overwrite:
        return (
            f"output {output} already exists and is not empty; pass --overwrite "
            "(overwrite: true) to replace it, or choose another output"
        )
    if not written_by_nanmerge(output):
        return (
            f"output {output} is not empty and was not written by nanmerge (it has no "
            f"nanmerge {REPORT_FILE}); overwrite replaces only an empty folder or an earlier "
            "nanmerge output: choose another output, or empty that folder yourself"
        )
    return None


def output_problems(output: Path, *, overwrite: bool, inputs: Iterable[Protected]) -> list[str]:
    """Every reason the merge may not write `output`, for the plan and for the writer."""
    problems = collisions(output, inputs)
    problem = replace_problem(output, overwrite=overwrite)
    return problems + ([problem] if problem else [])


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so a reused pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _owner_alive(record: dict[str, object]) -> bool:
    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("host") != socket.gethostname():
        return True  # another machine's merge, or a record we cannot read: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = record.get("started")
    return started is None or _start_time(pid) in (None, started)


def write_lock(lock: Path) -> None:
    """Record this process as the owner of the temporary folder named by `lock`."""
    pid = os.getpid()
    record = {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}
    lock.write_text(json.dumps(record) + "\n", encoding="utf-8")


def temp_names(output: Path, token: str) -> tuple[Path, Path, Path]:
    """The temporary folder, the previous output's parking place and the lock of a run."""
    stem = output.parent / f".{output.name}"
    return (
        Path(f"{stem}.partial-{token}"),
        Path(f"{stem}.old-{token}"),
        Path(f"{stem}.partial-{token}{_LOCK_SUFFIX}"),
    )


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def clean_stale(output: Path) -> list[str]:
    """Remove what killed runs left beside `output`; one note per thing found.

    A run killed between parking the previous output and moving the new one into place
    leaves no output: the previous one is put back first, so nothing is lost.
    """
    notes: list[str] = []
    parent = output.parent
    if not parent.is_dir():
        return notes
    prefix = f".{output.name}.partial-"
    entries = sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
    locks = {p for p in entries if p.name.endswith(_LOCK_SUFFIX)}
    for lock in locks:
        try:
            record = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            record = {}
        if not isinstance(record, dict) or _owner_alive(record):
            continue
        token = lock.name[len(prefix) : -len(_LOCK_SUFFIX)]
        temp, old, _ = temp_names(output, token)
        if old.is_dir() and not output.exists() and not output.is_symlink():
            old.rename(output)
            notes.append(f"restored the previous output {output} that a killed run had parked")
        for leftover in (temp, old):
            _remove_tree(leftover)
        lock.unlink(missing_ok=True)
        notes.append(
            f"removed the temporary folder {temp.name} left by a killed run "
            f"(pid {record.get('pid')})"
        )
    for orphan in (
        p for p in entries if p not in locks and Path(f"{p}{_LOCK_SUFFIX}") not in locks
    ):
        notes.append(
            f"found {orphan} with no owner record (left by an older nanmerge); left it "
            "alone: delete it if no merge is writing there"
        )
    return notes


def move_into_place(temp: Path, old: Path, output: Path) -> None:
    """Make the finished `temp` the output; an earlier output is removed only afterwards."""
    if occupied(output):
        output.rename(old)
        try:
            temp.rename(output)
        except BaseException:
            old.rename(output)
            raise
        _remove_tree(old)
        return
    if output.is_dir():  # an empty folder: nothing to keep
        output.rmdir()
    temp.rename(output)


def protected_paths(pairs: Sequence[tuple[str, object]]) -> list[Protected]:
    """The local paths among labelled sources (strings or paths; in-memory inputs are not),
    each input once however many ways it was named."""
    out: dict[tuple[str, Path], Protected] = {}
    for label, source in pairs:
        if isinstance(source, str | os.PathLike):
            path = Path(source).expanduser()
            if path.exists() or path.is_symlink():
                out.setdefault((label, path.resolve()), Protected(label, path))
    return list(out.values())

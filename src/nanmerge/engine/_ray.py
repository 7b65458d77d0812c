"""`ray: true`: a merge's output shards as Ray tasks, on this machine or a cluster.

The driver does all a local merge does before merging (plan, checks, the collect pass,
coefficients) and plans the shards (`ModelWriter`). Each task plans the recipe again from
the inputs on shared storage, merges its shard's tensors through the same `merge_stream`
and writes the shard file into the writer's temporary folder. The driver gathers the norms,
per-tensor coefficients, warnings and notes in plan order and finalizes as a local merge
does: the same code on the same bytes in the same order, so the files are the local run's.
Ray is imported only here, when a merge or a search asks for it.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from nanmerge._types import Coefficients, MergeError, TensorNorms
from nanmerge.config import Recipe
from nanmerge.engine._plan import Plan, plan
from nanmerge.engine._record import Note, Recorder
from nanmerge.engine._stream import Collected, merge_stream
from nanmerge.io import ShardFile

CONNECT_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 30.0  # for cancelled tasks to end before the temporary folder goes


def reachable(address: str) -> None:
    """One line, within seconds, when nothing listens at a host:port address."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MergeError(f"--address {address!r}: write host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise MergeError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` there, or leave out --address for a local Ray"
        ) from None


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray; True when this call started it."""
    import ray

    if address:
        reachable(address)
    if ray.is_initialized():
        return False
    try:
        # workers' output stays in Ray's logs: failures come back as exceptions
        ray.init(
            address=address or "local",  # a new local Ray, even beside a `ray start` one
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError) as exc:
        raise MergeError(f"cannot join a Ray cluster at {address}: {exc}") from None
    return True


@contextmanager
def ray_session(recipe: Recipe) -> Iterator[None]:
    """Ray joined or started for a `ray: true` merge (nothing otherwise); one this started
    is shut down after."""
    started = recipe.ray and connect(recipe.address)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


@dataclass(frozen=True)
class Shared:
    """What every task needs besides its shard: shipped once through Ray's object store."""

    recipe: Recipe
    coefficients: Coefficients
    collected: object
    overrides: Mapping[str, Mapping[str, object]]


@dataclass(frozen=True)
class ShardResult:
    """What a task found on the way, for the report: the driver joins them in plan order."""

    norms: dict[str, TensorNorms]
    per_tensor: dict[str, tuple[float, ...]]
    warnings: list[str]
    notes: dict[str, dict[str, Note]]


def _task_recipe(recipe: Recipe) -> Recipe:
    """The recipe a task plans: local paths absolute (a worker's folder is its own), and
    nothing of what only the driver does (output, side files, Ray itself)."""

    def absolute(path: Any) -> Any:
        return os.path.abspath(path) if isinstance(path, str) and os.path.exists(path) else path

    models = [m.model_copy(update={"path": absolute(m.path)}) for m in recipe.models]
    statistics = None if recipe.statistics is None else [absolute(s) for s in recipe.statistics]
    update = {"base": absolute(recipe.base), "models": models, "statistics": statistics}
    update |= {"output": None, "copy_files_from": None, "chat_template": None}
    return recipe.model_copy(update=update | {"ray": False, "address": None})


def _no_kept(method: str) -> Any:
    def refuse(name: str, tensor: object) -> None:
        raise MergeError(
            f"method '{method}' keeps tensors beside the checkpoint ({name}), which a merge "
            "on Ray does not write: merge without ray (--ray)"
        )

    return refuse


def merge_shard(shared: Shared, part: ShardFile) -> ShardResult:
    """In a Ray task: merge one planned shard's tensors into its file."""
    p = plan(shared.recipe, for_output=False)
    try:
        coefficients = copy.deepcopy(shared.coefficients)  # per-tensor estimates go in here
        before = len(coefficients.warnings)
        names = {name for name, _ in part.entries}
        recorder = Recorder(_no_kept(p.method.name))
        norms = merge_stream(
            p,
            coefficients,
            part.write,
            progress=False,
            collected=shared.collected,
            overrides=shared.overrides,
            recorder=recorder,
            only=names,
        )
    finally:
        part.abandon()  # closed already after its last tensor, unless the merge failed
        p.close()
    per_tensor = {n: c for n, c in coefficients.per_tensor.items() if n in names}
    return ShardResult(norms, per_tensor, coefficients.warnings[before:], recorder.notes)


def merge_on_ray(
    p: Plan,
    coefficients: Coefficients,
    collected: Collected,
    parts: list[ShardFile],
    *,
    progress: bool,
) -> tuple[dict[str, TensorNorms], dict[str, dict[str, Note]]]:
    """Merge every shard of `parts` in a Ray task; the norms and method notes of every
    tensor, in plan order. Per-tensor coefficients and warnings go into `coefficients` in
    the order a local merge adds them. A failed task stops the others before this raises."""
    import ray

    shared = Shared(_task_recipe(p.recipe), coefficients, collected.method, collected.overrides)
    task = ray.remote(num_cpus=1)(merge_shard)
    ref = ray.put(shared)
    pending = [task.remote(ref, part) for part in parts]
    refs = list(pending)
    bar = tqdm(total=len(refs), desc="merging on Ray", unit="shard", disable=not progress)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # the first failure, at once
            bar.update(len(done))
        results: list[ShardResult] = ray.get(refs)
    except BaseException as exc:
        for r in refs:
            ray.cancel(r, force=True)
        ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MergeError):
            raise MergeError(str(cause)) from None
        raise
    finally:
        bar.close()
    norms: dict[str, TensorNorms] = {}
    notes: dict[str, dict[str, Note]] = {}
    for result in results:
        norms |= result.norms
        notes |= result.notes
        coefficients.per_tensor.update(result.per_tensor)
        coefficients.warnings += result.warnings
    return norms, notes

"""Stream: one pass over tensor names; load M (+ base) tensors, merge in float32, write, free."""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanmerge._types import Coefficients, MergeError, TensorStats
from nanmerge.coefficients import tensor_stats
from nanmerge.engine._plan import Plan
from nanmerge.methods import tensor_generator


@dataclass
class Loaded:
    """One tensor across the inputs: the float32 stack and base for floating tensors."""

    name: str
    stack: torch.Tensor | None
    base: torch.Tensor | None
    raw: torch.Tensor | None


def _check_finite(tensor: torch.Tensor, name: str, source: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeError(
            f"tensor '{name}' in {source} contains NaN or Inf ({bad} of {tensor.numel()} "
            "entries); that checkpoint is damaged or diverged: fix or re-export it"
        )


def load(plan: Plan, name: str) -> Loaded:
    """Read one tensor from every input; non-floating tensors are copied from the reference."""
    if name not in plan.merged:
        return Loaded(name, None, None, plan.reference[name])
    base = None
    if plan.base is not None:
        base = plan.base[name].to(torch.float32)
        _check_finite(base, name, plan.base.source)
    shape = plan.reference.meta(name).shape
    stack = torch.empty((len(plan.models), *shape), dtype=torch.float32)
    lacking = plan.fill_from_base.get(name, [])
    for i, model in enumerate(plan.models):
        if i in lacking and base is not None:
            stack[i] = base
            continue
        stack[i] = model[name]
        _check_finite(stack[i], name, model.source)
    return Loaded(name, stack, base, None)


def prefetch(names: list[str], fn: Callable[[str], Loaded], threads: int) -> Iterator[Loaded]:
    """Yield fn(name) in order, with up to `threads` names loading ahead in the background."""
    if threads == 0:
        yield from (fn(n) for n in names)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[Loaded]] = deque()
        queue = iter(names)
        for name in queue:
            pending.append(pool.submit(fn, name))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def norm_pass(plan: Plan, *, progress: bool) -> dict[str, TensorStats]:
    """Read every floating tensor once to collect the statistics of model-level estimators."""
    names = [n for n, _ in plan.entries if n in plan.merged]
    stats: dict[str, TensorStats] = {}
    bar = tqdm(total=len(names), desc="norms", unit="tensor", disable=not progress)
    for item in prefetch(names, lambda n: load(plan, n), plan.recipe.threads):
        assert item.stack is not None  # floating tensors always carry a stack
        stats[item.name] = tensor_stats(item.stack, item.base)
        bar.update()
    bar.close()
    return stats


def merge_stream(
    plan: Plan,
    coefficients: Coefficients,
    sink: Callable[[str, torch.Tensor], None],
    *,
    progress: bool,
) -> dict[str, TensorStats]:
    """Merge tensor by tensor into `sink`; per-tensor estimators are evaluated on the way.

    Returns the statistics of every merged tensor (for the report's norms). Layer-wise
    coefficients computed here are added to `coefficients.per_tensor`.
    """
    per_tensor = plan.estimator.needs(plan.estimator_options) == "tensor"
    fn = plan.method.fn
    wants_generator = "generator" in inspect.signature(fn).parameters
    out_meta = dict(plan.entries)
    stats: dict[str, TensorStats] = {}
    names = [n for n, _ in plan.entries]
    bar = tqdm(
        total=len(names), desc=f"merging ({plan.method.name})", unit="tensor", disable=not progress
    )
    for item in prefetch(names, lambda n: load(plan, n), plan.recipe.threads):
        if item.stack is None:
            assert item.raw is not None
            sink(item.name, item.raw)
            bar.update()
            continue
        st = tensor_stats(item.stack, item.base)
        stats[item.name] = st
        if per_tensor:
            part = plan.estimator.fn({item.name: st}, plan.model_names, **plan.estimator_options)
            coefficients.per_tensor.update(part.per_tensor)
            coefficients.warnings += part.warnings
        extra = (
            {"generator": tensor_generator(plan.recipe.seed, item.name)} if wants_generator else {}
        )
        coef = coefficients.for_tensor(item.name)
        merged = fn(item.stack, coef, base=item.base, **plan.params, **extra)
        sink(item.name, merged.to(out_meta[item.name].dtype))
        bar.update()
    bar.close()
    return stats

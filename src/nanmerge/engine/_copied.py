"""Tensors that are not floating point (position ids, masks) are copied from the layout
input, never merged: say which of them the inputs disagree on, since the others' values are
then silently dropped."""

from __future__ import annotations

import torch

from nanmerge.engine._plan import Plan

_SHOWN = 5


def copied_tensor_warning(plan: Plan) -> str | None:
    """A warning naming the copied tensors whose value differs in some input, or None.

    Reads those tensors from every input, one at a time: they are usually few and small.
    """
    source = plan.layout_input
    inputs = [c for c in [plan.base, *plan.models] if c is not None and c is not source]
    differing = []
    for name, _ in plan.entries:
        if name in plan.merged:
            continue
        kept = source[name]
        others = [c.source for c in inputs if name in c and not _equal(kept, c[name])]
        if others:
            differing.append(f"'{name}' (differs in {', '.join(others)})")
    if not differing:
        return None
    role = "the base" if source is plan.base else "the first model"
    more = f" and {len(differing) - _SHOWN} more" if len(differing) > _SHOWN else ""
    return (
        f"{len(differing)} non-floating tensor(s) differ between inputs and were copied "
        f"unchanged from {role}, {source.source}: {'; '.join(differing[:_SHOWN])}{more}. "
        "Non-floating tensors are never merged; check that the inputs share one architecture"
    )


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

"""The engine: plan (check everything first), then stream tensor by tensor."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nanmerge.engine._recipe import check_recipe

if TYPE_CHECKING:
    from nanmerge.engine._memory import memory_bound
    from nanmerge.engine._plan import Plan, plan
    from nanmerge.engine._run import estimate_coefficients, merge

# What computes loads torch, so it is imported on first use (PEP 562): `check_recipe`
# answers a misspelt recipe without it.
_LAZY = {
    "Plan": "nanmerge.engine._plan",
    "plan": "nanmerge.engine._plan",
    "estimate_coefficients": "nanmerge.engine._run",
    "memory_bound": "nanmerge.engine._memory",
    "merge": "nanmerge.engine._run",
}

__all__ = ["Plan", "check_recipe", "estimate_coefficients", "memory_bound", "merge", "plan"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nanmerge.engine' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)

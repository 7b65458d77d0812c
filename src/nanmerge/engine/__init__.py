"""The engine: plan (check everything first), then stream tensor by tensor."""

from nanmerge.engine._plan import Plan, plan
from nanmerge.engine._run import estimate_coefficients, memory_bound, merge

__all__ = ["Plan", "estimate_coefficients", "memory_bound", "merge", "plan"]

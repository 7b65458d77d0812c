"""Merge methods: typed pure functions over stacked tensors, and their registry.

Every method is `fn(tensors, coef, *, base=None, **hyperparameters) -> Tensor` with
`tensors` float32 (M, *shape) and `coef` float32 (M,), uniform = 1.0 each.
"""

from __future__ import annotations

from nanmerge.methods._data_informed import fisher, regmean
from nanmerge.methods._linear import passthrough, weight_average
from nanmerge.methods._registry import (
    METHODS,
    MethodSpec,
    check_params,
    count_problem,
    get_method,
    register,
)
from nanmerge.methods._slerp import slerp
from nanmerge.methods._sparsify import tensor_generator
from nanmerge.methods._statistic_kinds import STATISTIC_KINDS, STATISTICS, StatisticKind
from nanmerge.methods._task_arithmetic import (
    breadcrumbs,
    dare_linear,
    dare_ties,
    task_arithmetic,
    ties,
)

__all__ = [
    "METHODS",
    "STATISTICS",
    "STATISTIC_KINDS",
    "MethodSpec",
    "StatisticKind",
    "breadcrumbs",
    "check_params",
    "count_problem",
    "dare_linear",
    "dare_ties",
    "fisher",
    "get_method",
    "passthrough",
    "register",
    "regmean",
    "slerp",
    "task_arithmetic",
    "tensor_generator",
    "ties",
    "weight_average",
]

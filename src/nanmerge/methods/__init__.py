"""Merge methods: typed pure functions over stacked tensors, and their registry.

Every method is `fn(tensors, coef, *, base=None, **hyperparameters) -> Tensor` with
`tensors` float32 (M, *shape) and `coef` float32 (M,), uniform = 1.0 each.
"""

from __future__ import annotations

from nanmerge.methods._competition import magmax, pcb
from nanmerge.methods._consensus import consensus, emr
from nanmerge.methods._data_informed import fisher, regmean
from nanmerge.methods._dc_merge import dc_merge
from nanmerge.methods._della import della, della_linear
from nanmerge.methods._linear import passthrough, weight_average
from nanmerge.methods._model_stock import model_stock
from nanmerge.methods._registry import (
    METHODS,
    MethodSpec,
    check_params,
    count_problem,
    get_method,
    register,
)
from nanmerge.methods._sce import sce
from nanmerge.methods._selective import arcee_fusion, nearswap
from nanmerge.methods._slerp import karcher, multislerp, nuslerp, slerp
from nanmerge.methods._sparsify import tensor_generator
from nanmerge.methods._statistic_kinds import STATISTIC_KINDS, STATISTICS, StatisticKind
from nanmerge.methods._subspace import iso_c, iso_cts, tsv
from nanmerge.methods._task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    task_arithmetic,
    ties,
)
from nanmerge.methods._widen import widen

__all__ = [
    "METHODS",
    "STATISTICS",
    "STATISTIC_KINDS",
    "MethodSpec",
    "StatisticKind",
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "check_params",
    "consensus",
    "count_problem",
    "dare_linear",
    "dare_ties",
    "dc_merge",
    "della",
    "della_linear",
    "emr",
    "fisher",
    "get_method",
    "iso_c",
    "iso_cts",
    "karcher",
    "magmax",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "pcb",
    "register",
    "regmean",
    "sce",
    "slerp",
    "task_arithmetic",
    "tensor_generator",
    "ties",
    "tsv",
    "weight_average",
    "widen",
]

"""LiNeS (Wang et al. 2024, https://arxiv.org/abs/2410.17146): the merged task vector
scaled up with depth, after any task-vector method.

Following the authors' code (github.com/wang-kee/LiNeS: `LiNeS_scaling` in
src/eval/eval.py, the norms in src/eval/aggregation.py): block l of L is scaled by
alpha + beta * l / (L - 1), every tensor outside the blocks by alpha; for multi-task merging
alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T, the L1 norms over the whole model. Here
tau_t is weighted by its coefficient (uniform reproduces the paper) and tau_merged is the
method's merged delta at scale 1, so for task arithmetic alpha = 1/T. LiNeS's scale replaces
the method's `scale`: it is the method's `scale` parameter, set per tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from nanmerge._types import Coefficients
from nanmerge.config import LinesSpec
from nanmerge.engine._context import SCALE, lines_scale
from nanmerge.engine._plan import Plan
from nanmerge.engine._stream import (
    _chunks,
    _loads,
    checked_norms,
    estimate_tensor,
    merge_tensor,
    method_inputs,
)


def multi_task_alpha(
    plan: Plan, coefficients: Coefficients, *, progress: bool, collected: object = None
) -> tuple[float, dict[str, float]]:
    """The paper's alpha, from one pass that merges every tensor at scale 1 (the same
    coefficients, draws, statistics and `collected` whole-model statistic as the merge) and
    sums two L1 norms in float64."""
    names = [n for n, _ in plan.entries if n in plan.merged]
    per_tensor = plan.estimator.needs(plan.estimator_options) == "tensor"
    summed = merged = 0.0
    bar = tqdm(total=len(names), desc="LiNeS norms", unit="tensor", disable=not progress)
    for item in _loads(plan, names, reuse=plan.method.elementwise):
        assert item.models is not None and item.base is not None
        if per_tensor:
            estimate_tensor(plan, coefficients, item.name, checked_norms(plan, item))
        coef = coefficients.for_tensor(item.name).to(item.base.device)
        for _, stack, base in _chunks(item):
            assert base is not None
            summed += float(torch.mv((stack - base).t(), coef).abs().sum(dtype=torch.float64))
        base = item.base.to(torch.float32)  # the merge of a whole stack frees the inputs
        inputs = method_inputs(plan, item.name, collected) | {SCALE: 1.0}
        delta = merge_tensor(plan, item, coef, torch.float32, inputs).sub_(base)
        merged += float(delta.abs().sum(dtype=torch.float64))
        bar.update()
    bar.close()
    alpha = summed / merged / len(plan.models) if merged > 0 else 1.0 / len(plan.models)
    return alpha, {"l1_summed_task_vectors": summed, "l1_merged_task_vector": merged}


def lines_overrides(
    plan: Plan,
    spec: LinesSpec,
    coefficients: Coefficients,
    *,
    progress: bool,
    collected: object = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Each merged tensor's scale, and what the report says about them."""
    report: dict[str, Any] = {"beta": spec.beta, "reference": "https://arxiv.org/abs/2410.17146"}
    if spec.alpha is None:
        alpha, norms = multi_task_alpha(plan, coefficients, progress=progress, collected=collected)
        report |= {"alpha": alpha, "alpha_from": "L1 norms (the paper's multi-task rule)", **norms}
    else:
        alpha = spec.alpha
        report |= {"alpha": alpha, "alpha_from": "recipe"}
    scales = {n: lines_scale(plan.contexts[n], alpha, spec.beta) for n in plan.merged}
    unplaced = sorted(n for n in plan.merged if plan.contexts[n].layer is None)
    report["tensors_outside_blocks"] = len(unplaced)
    report["scales"] = {"min": min(scales.values()), "max": max(scales.values())}
    return {n: {SCALE: s} for n, s in scales.items()}, report

"""Diagnose merge coefficients: how far from uniform, and whether NAN's premise looks plausible.

NAN assumes that a model trained on more data has a smaller parameter norm. Whether that holds
for a user's models cannot be read off the weights alone; with the data sizes it can at least
be checked as a rank correlation. The verdict never claims the weights reflect data size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nanmerge._types import Coefficients, MergeError

NEAR_UNIFORM = 0.02
STRONG_RANK = 0.5


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho requires)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN when either side is constant or has fewer than 2 values."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs sequences of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=False))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Spread relative to the mean, so the result does not depend on the scale convention."""
    mean = sum(values) / len(values)
    low, high = min(values), max(values)
    return {
        "max_over_min": high / low if low > 0 else math.inf,
        "max_abs_deviation_from_uniform": max(abs(v / mean - 1) for v in values) if mean else 0.0,
    }


_NORM_LABELS = {"finetuned": "1/||theta||", "task_vector": "1/||tau||"}


def _rank_verdict(label: str, rho: float, used: bool) -> str:
    """One sentence per norm; the consequence is stated only for the norm the weights used."""
    if math.isnan(rho):
        return f"{label}: no rank correlation can be computed (constant norms or data sizes)"
    if rho >= STRONG_RANK:
        return (
            f"{label} ranks models in the same order as their data sizes (Spearman {rho:+.2f}): "
            "consistent with NAN's premise, which is not proof that the weights reflect data size"
        )
    if rho <= -STRONG_RANK:
        effect = (
            "these coefficients give more weight to models with less data"
            if used
            else "NAN on this norm would give more weight to models with less data"
        )
        return (
            f"{label} ranks models opposite to their data sizes (Spearman {rho:+.2f}): "
            f"NAN's premise does not hold here; {effect}"
        )
    return (
        f"{label} is only weakly related to data size (Spearman {rho:+.2f}): "
        "NAN's premise is not supported here"
    )


def diagnose(
    coefficients: Coefficients, data_sizes: Sequence[float] | None = None
) -> dict[str, Any]:
    """Spread, norms and (with data sizes) rank correlations, plus a plain-words verdict.

    The verdict is a list of sentences a user can read without knowing the method's derivation.
    """
    n_models = len(coefficients.models)
    if data_sizes is not None and len(data_sizes) != n_models:
        raise MergeError(
            f"got {len(data_sizes)} data sizes for {n_models} models "
            f"({', '.join(coefficients.models)}); give one size per model, in the same order"
        )
    verdict: list[str] = []
    result: dict[str, Any] = {
        "models": list(coefficients.models),
        "estimator": coefficients.estimator,
        "coefficients": None if coefficients.per_model is None else list(coefficients.per_model),
        "norms": {k: list(v) for k, v in coefficients.norms.items()},
        "data_sizes": None if data_sizes is None else [float(v) for v in data_sizes],
    }
    if coefficients.per_model is not None:
        spread = _spread(coefficients.per_model)
        result["spread"] = spread
        dev = spread["max_abs_deviation_from_uniform"]
        if dev <= NEAR_UNIFORM:
            verdict.append(
                f"coefficients within ±{dev:.1%} of uniform: NAN changes almost nothing here"
            )
        else:
            verdict.append(
                f"coefficients deviate up to {dev:.1%} from uniform (max/min ratio "
                f"{spread['max_over_min']:.2f}): NAN reweights these models noticeably"
            )
    if coefficients.per_tensor:
        tensor_dev = max(
            _spread(v)["max_abs_deviation_from_uniform"] for v in coefficients.per_tensor.values()
        )
        result["per_tensor_max_abs_deviation_from_uniform"] = tensor_dev
        verdict.append(f"per-tensor coefficients deviate up to {tensor_dev:.1%} from uniform")
    correlations: dict[str, float] = {}
    if data_sizes is None:
        verdict.append("no data sizes given: NAN's premise (smaller norm = more data) is unchecked")
    elif n_models < 3:
        verdict.append("fewer than 3 models: a rank correlation with data size says nothing")
    elif len(set(data_sizes)) == 1:
        verdict.append(
            "all data sizes are equal: the premise predicts uniform coefficients, so any spread "
            "comes from something other than data size"
        )
    else:
        for key, norms in coefficients.norms.items():
            label = _NORM_LABELS.get(key, f"1/||{key}||")
            inverse = [1 / v if v > 0 else math.inf for v in norms]
            rho = spearman(inverse, data_sizes)
            correlations[f"inverse_{key}_norm"] = rho
            used = coefficients.estimator == "nan" and key == coefficients.params.get(
                "norm_of", "finetuned"
            )
            verdict.append(_rank_verdict(label, rho, used))
        if not coefficients.norms:
            verdict.append("these coefficients carry no norms, so the premise cannot be checked")
    result["spearman_with_data_size"] = correlations
    result["verdict"] = verdict
    return result

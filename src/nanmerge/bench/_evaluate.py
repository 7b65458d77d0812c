"""What each merge problem's coefficients look like, and summaries over seeds.

Seed-to-seed variance can hide small effects, so besides mean ± std over seeds the paired
difference (NAN minus uniform on the same fine-tuned models) is kept per seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from nanmerge.bench._checkpoints import ModelSet
from nanmerge.bench._merging import NAN_VARIANTS, ORACLE, UNIFORM, estimate
from nanmerge.coefficients._diagnose import diagnose

ROW_KEY = ("problem", "method", "coefficients", "scale_mode")


def problem_info(models: ModelSet) -> dict[str, Any]:
    """Norms, NAN coefficients (per model and per tensor) and rank correlations with n_i."""
    coefficients: dict[str, list[float]] = {}
    per_tensor: dict[str, dict[str, list[float]]] = {}
    spread: dict[str, float] = {}
    report: dict[str, Any] = {}
    for label in NAN_VARIANTS:
        coefs = estimate(models, label)
        report = diagnose(coefs, models.data_sizes)
        coefficients[label] = list(coefs.per_model or ())
        if coefs.per_tensor:
            per_tensor[label] = {k: list(v) for k, v in coefs.per_tensor.items()}
        spread[label] = float(
            report.get(
                "per_tensor_max_abs_deviation_from_uniform",
                report.get("spread", {}).get("max_abs_deviation_from_uniform", math.nan),
            )
        )
    # The norms, hence the rank correlations, are the same whichever variant was estimated.
    rho = report["spearman_with_data_size"]
    mean_n = sum(models.data_sizes) / len(models.data_sizes)
    coefficients[ORACLE] = [n / mean_n for n in models.data_sizes]
    return {
        "names": list(models.names),
        "data_sizes": list(models.data_sizes),
        "norms": report["norms"],
        "spearman_theta": rho.get("inverse_finetuned_norm", math.nan),
        "spearman_tau": rho.get("inverse_task_vector_norm", math.nan),
        "coefficients": coefficients,
        "per_tensor": per_tensor,
        "spread": spread,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Sample std (0 for a single seed); NaNs are dropped so n/a cells stay n/a."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def aggregate(rows: Iterable[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per (problem, method, coefficients, scale mode), with mean and std over seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in ROW_KEY), []).append(row)
    out = []
    for key, members in groups.items():
        mean, std = mean_std([float(r[metric]) for r in members])
        scales = [r["scale"] for r in members if r["scale"] is not None]
        out.append(
            {
                **dict(zip(ROW_KEY, key, strict=False)),
                "mean": mean,
                "std": std,
                "seeds": len(members),
                "scales": scales,
            }
        )
    return out


def paired(rows: Iterable[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per seed, each coefficient variant minus uniform on the same models, method and mode."""
    uniform: dict[tuple[Any, ...], float] = {}
    others: list[dict[str, Any]] = []
    for row in rows:
        if row["coefficients"] == UNIFORM:
            key = (row["problem"], row["method"], row["scale_mode"], row["seed"])
            uniform[key] = float(row[metric])
        elif row["coefficients"] in (*NAN_VARIANTS, ORACLE):
            others.append(row)
    out = []
    for row in others:
        key = (row["problem"], row["method"], row["scale_mode"], row["seed"])
        if key in uniform:
            out.append(
                {
                    "problem": row["problem"],
                    "method": row["method"],
                    "scale_mode": row["scale_mode"],
                    "coefficients": row["coefficients"],
                    "seed": row["seed"],
                    "diff": float(row[metric]) - uniform[key],
                }
            )
    return out


def summarize_info(infos: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per problem: rank correlations and coefficient spread, mean ± std over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for info in infos:
        groups.setdefault(info["problem"], []).append(info)
    out = []
    for problem, members in groups.items():
        entry: dict[str, Any] = {
            "problem": problem,
            "seeds": len(members),
            "spearman_theta": mean_std([m["spearman_theta"] for m in members]),
            "spearman_tau": mean_std([m["spearman_tau"] for m in members]),
            "spread": {
                label: mean_std([m["spread"][label] for m in members]) for label in NAN_VARIANTS
            },
        }
        out.append(entry)
    return out

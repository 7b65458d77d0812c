"""Plain-text and Markdown tables, and the PNG plots, of one suite's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter

from nanmerge.bench._evaluate import mean_std
from nanmerge.bench._merging import COEFFICIENTS, LINES, NAN_VARIANTS, ORACLE, PAIR_LABEL

Table = tuple[list[str], list[list[str]]]


def text_table(table: Table) -> str:
    """Aligned columns, for the terminal."""
    headers, rows = table
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(lines)


def markdown_table(table: Table) -> str:
    """Pipes inside cells (as in ||theta||) are escaped so they do not split the columns."""
    headers, rows = table

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])


def _cell(mean: float, std: float, digits: int, seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    if seeds > 1:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def _method_label(method: str, scale_mode: str, scales: Sequence[float]) -> str:
    if scale_mode == "default":
        return f"{method} (default scale {scales[0]:g})" if scales else method
    if scale_mode == "best":
        return f"{method} (best {'beta' if method.endswith(LINES) else 'scale'} on val)"
    return method


def results_table(
    summary: list[dict[str, Any]], problem: str, digits: int, factor: float = 1.0
) -> Table:
    """Methods down, coefficient variants across; fixed rows (optimum, pretrained) at the end."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    order: list[tuple[str, str]] = []
    labels: dict[tuple[str, str], str] = {}
    for row in summary:
        if row["problem"] != problem:
            continue
        key = (row["method"], row["scale_mode"])
        if key not in cells:
            cells[key] = {}
            order.append(key)
            labels[key] = _method_label(row["method"], row["scale_mode"], row["scales"])
        text = _cell(row["mean"] * factor, row["std"] * factor, digits, row["seeds"])
        if row["scale_mode"] == "best" and row["scales"]:
            text += f" @{sum(row['scales']) / len(row['scales']):.2g}"
        cells[key][row["coefficients"]] = text
    headers = ["method", *COEFFICIENTS]
    body = []
    for key in order:
        if "-" in cells[key]:
            body.append([labels[key], cells[key]["-"], *[""] * (len(COEFFICIENTS) - 1)])
        else:
            body.append([labels[key], *[cells[key].get(c, "n/a") for c in COEFFICIENTS]])
    return headers, body


def paired_table(diffs: list[dict[str, Any]], problem: str, digits: int, factor: float) -> Table:
    """Cells: mean difference vs uniform, then each seed's difference in brackets."""
    cells: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for d in diffs:
        if d["problem"] != problem:
            continue
        key = (d["method"], d["scale_mode"])
        cells.setdefault(key, {}).setdefault(d["coefficients"], []).append(
            (d["seed"], d["diff"] * factor)
        )
    variants = [*NAN_VARIANTS, ORACLE]
    body = []
    for (method, mode), by_coef in cells.items():
        row = [_method_label(method, mode, []) if mode != "default" else f"{method} (default)"]
        for coef in variants:
            values = [v for _, v in sorted(by_coef.get(coef, []))]
            if not values:
                row.append("n/a")
                continue
            mean = f"{sum(values) / len(values):+.{digits}f}"
            if len(values) > 1:
                mean += " (" + "/".join(f"{v:+.{digits}f}" for v in values) + ")"
            row.append(mean)
        body.append(row)
    return ["method", *variants], body


def per_task_table(
    rows: list[dict[str, Any]], problem: str, digits: int, factor: float
) -> Table | None:
    """Per-task scores (mean over seeds) of the reference rows and each method at its best scale.

    None when the suite has no per-task scores. Which task gets which n_i changes with the seed.
    """
    chosen = [r for r in rows if r["problem"] == problem and r["scale_mode"] in ("best", "-")]
    tasks = [k.removeprefix("acc:") for k in chosen[0] if k.startswith("acc:")] if chosen else []
    if not tasks:
        return None
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in chosen:
        groups.setdefault((r["method"], r["coefficients"]), []).append(r)
    body = []
    for (method, coef), members in groups.items():
        cells = []
        for task in tasks:
            values = [m[f"acc:{task}"] * factor for m in members if f"acc:{task}" in m]
            cells.append(f"{sum(values) / len(values):.{digits}f}" if values else "n/a")
        body.append([method, coef, *cells])
    return ["method", "coefficients", *tasks], body


def info_table(info: list[dict[str, Any]]) -> Table:
    """Rank correlation of inverse norms with n_i, and how far each NAN variant is from uniform.

    "max dev." is max |c_i / mean(c) - 1| over models (and over tensors for layer-wise variants).
    """
    headers = [
        "problem",
        "spearman(1/||theta||, n)",
        "spearman(1/||tau||, n)",
        *[f"max dev. {v}" for v in NAN_VARIANTS],
    ]
    body = []
    for entry in info:
        seeds = entry["seeds"]
        theta: tuple[float, float] = entry["spearman_theta"]
        tau: tuple[float, float] = entry["spearman_tau"]
        row = [entry["problem"], _cell(*theta, 2, seeds), _cell(*tau, 2, seeds)]
        for variant in NAN_VARIANTS:
            spread: tuple[float, float] = entry["spread"][variant]
            row.append(_pct(*spread, seeds))
        body.append(row)
    return headers, body


def _pct(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.1%} ± {std:.1%}" if seeds > 1 else f"{mean:.1%}"


_COLOURS = {
    "uniform": "#777777",
    "nan theta/model": "#1f77b4",
    "nan theta/tensor": "#6baed6",
    "nan tau/model": "#d62728",
    "nan tau/tensor": "#ff9896",
    ORACLE: "#2ca02c",
}


def _bars(
    ax: Any, methods: list[str], cells: dict[str, dict[str, tuple[float, float]]], factor: float
) -> None:
    """One group of bars per method, one bar per coefficient variant, thin +-std whiskers."""
    variants = [c for c in COEFFICIENTS if c in cells]
    width = 0.8 / len(COEFFICIENTS)
    for coef in variants:
        offset = (COEFFICIENTS.index(coef) - len(COEFFICIENTS) / 2 + 0.5) * width
        xs = [i + offset for i in range(len(methods))]
        means = [cells[coef].get(m, (math.nan, 0.0))[0] * factor for m in methods]
        stds = [cells[coef].get(m, (math.nan, 0.0))[1] * factor for m in methods]
        ax.bar(xs, means, width, label=coef, color=_COLOURS[coef], zorder=2)
        ax.errorbar(xs, means, yerr=stds, fmt="none", ecolor="#333333", elinewidth=0.6, zorder=3)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([_tick_label(m) for m in methods], rotation=35, ha="right", fontsize=7)


def _tick_label(method: str) -> str:
    """A method's label without its parenthetical, except a two-model method's "(2 tasks)"."""
    name = method.split(" (")[0]
    return f"{name} (2 tasks)" if method.endswith(PAIR_LABEL) else name


def plot_methods(
    summary: list[dict[str, Any]],
    diffs: list[dict[str, Any]],
    problems: Sequence[str],
    ylabel: str,
    factor: float,
    path: Path,
) -> None:
    """Top: each method (best scale where it has one) under every coefficient variant.

    Bottom: the paired difference to uniform on the same models, whose spread over seeds is far
    smaller than the seed-to-seed spread of the scores themselves. Two-model methods are shown
    as "(2 tasks)": their scores cover those 2 tasks only.
    """
    fig, axes = plt.subplots(2, len(problems), figsize=(4.2 * len(problems), 6.4), squeeze=False)
    for col, problem in enumerate(problems):
        rows = [
            r
            for r in summary
            if r["problem"] == problem
            and r["scale_mode"] in ("best", "-")
            and r["coefficients"] != "-"
        ]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        scores: dict[str, dict[str, tuple[float, float]]] = {}
        for r in rows:
            scores.setdefault(r["coefficients"], {})[r["method"]] = (r["mean"], r["std"])
        top, bottom = axes[0][col], axes[1][col]
        _bars(top, methods, scores, factor)
        top.set_title(f"{problem}: score (best scale)", fontsize=9)
        top.set_ylabel(ylabel, fontsize=8)
        finite = [r["mean"] * factor for r in rows if not math.isnan(r["mean"])]
        if finite:
            low, high = min(finite), max(finite)
            pad = (high - low) * 0.15 or 0.01
            top.set_ylim(low - pad, high + pad)
        gaps: dict[str, dict[str, list[float]]] = {}
        for d in diffs:
            if d["problem"] == problem and d["scale_mode"] in ("best", "-"):
                gaps.setdefault(d["coefficients"], {}).setdefault(d["method"], []).append(d["diff"])
        paired_cells = {
            coef: {m: mean_std(v) for m, v in by_method.items()} for coef, by_method in gaps.items()
        }
        _bars(bottom, methods, paired_cells, factor)
        bottom.axhline(0.0, color="#777777", lw=0.8)
        bottom.set_title(f"{problem}: minus uniform, same models", fontsize=9)
        bottom.set_ylabel("difference", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_coefficients(infos: list[dict[str, Any]], problems: Sequence[str], path: Path) -> None:
    """Each model's NAN coefficient against its training-set size, every seed as a point."""
    fig, axes = plt.subplots(1, len(problems), figsize=(3.8 * len(problems), 3.4), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=False):
        for info in (i for i in infos if i["problem"] == problem):
            for label in (*NAN_VARIANTS, ORACLE):
                if "tensor" in label:
                    continue
                values = info["coefficients"].get(label)
                if values:
                    ax.scatter(
                        info["data_sizes"],
                        values,
                        s=12,
                        color=_COLOURS[label],
                        alpha=0.7,
                        label=label if info["seed"] == infos[0]["seed"] else None,
                    )
        ax.axhline(1.0, color="#777777", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(problem, fontsize=9)
        ax.set_xlabel("training-set size n_i", fontsize=8)
        ax.set_ylabel("coefficient (uniform = 1)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_heatmap(info: dict[str, Any], variant: str, path: Path) -> None:
    """Layer-wise NAN coefficients: tensors down, models (sorted by n_i) across."""
    per_tensor = info["per_tensor"][variant]
    order = sorted(range(len(info["data_sizes"])), key=lambda i: info["data_sizes"][i])
    names = list(per_tensor)
    grid = [[per_tensor[t][i] for i in order] for t in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(order), 0.9 + 0.4 * len(names)))
    image = ax.imshow(grid, cmap="coolwarm", vmin=min(map(min, grid)), vmax=max(map(max, grid)))
    for r, values in enumerate(grid):
        for c, value in enumerate(values):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(
        [f"{info['names'][i]}\nn={info['data_sizes'][i]}" for i in order], fontsize=6
    )
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_title(f"{variant} coefficients, {info['problem']} (seed {info['seed']})", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

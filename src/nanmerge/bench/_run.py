"""Run a suite over seeds, print its tables and write report.md with the plots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanmerge.bench import _digits, _lsq
from nanmerge.bench._evaluate import aggregate, paired, summarize_info
from nanmerge.bench._report import (
    info_table,
    markdown_table,
    paired_table,
    per_task_table,
    plot_coefficients,
    plot_heatmap,
    plot_methods,
    results_table,
    text_table,
)

RunSeed = Callable[
    [Any, int, Path, "tqdm | None"], tuple[list[dict[str, Any]], list[dict[str, Any]]]
]


@dataclass(frozen=True)
class _Suite:
    """How one suite is run and how its metric is shown."""

    sizes: dict[str, Any]
    run_seed: RunSeed
    work_per_seed: Callable[[Any], int]
    metric: str
    metric_label: str
    axis_label: str
    factor: float
    digits: int
    heatmap_problem: str
    intro: str
    # (premise check, paired differences, summary rows) -> paragraphs under the premise table
    notes: Callable[[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]], list[str]]


SUITES: dict[str, _Suite] = {
    "lsq": _Suite(
        sizes=_lsq.SIZES,
        run_seed=_lsq.run_seed,
        work_per_seed=_lsq.merges_per_seed,
        metric=_lsq.METRIC,
        metric_label="joint training loss / optimum (lower is better)",
        axis_label="joint loss / optimum (lower is better)",
        factor=1.0,
        digits=3,
        heatmap_problem="ridge",
        intro=_lsq.INTRO,
        notes=lambda premise, diffs, summary: _lsq.regmean_note(summary),
    ),
    "digits": _Suite(
        sizes=_digits.SIZES,
        run_seed=_digits.run_seed,
        work_per_seed=_digits.work_per_seed,
        metric=_digits.METRIC,
        metric_label="held-out accuracy, % averaged over tasks (higher is better)",
        axis_label="mean test accuracy, %",
        factor=100.0,
        digits=1,
        heatmap_problem="a_equal_budget",
        intro=_digits.INTRO,
        notes=lambda premise, diffs, summary: _digits.control_note(premise, diffs),
    ),
}


def run(
    name: str, *, out_dir: Path, cache_dir: Path, seeds: int, size: str, progress: bool
) -> dict[str, Any]:
    """All seeds of one suite: raw rows saved as JSON, then tables, plots and Markdown."""
    started = time.perf_counter()
    raw = collect(name, cache_dir=cache_dir, seeds=seeds, size=size, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}_results.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return {**render(raw, out_dir), "seconds": time.perf_counter() - started}


def collect(name: str, *, cache_dir: Path, seeds: int, size: str, progress: bool) -> dict[str, Any]:
    """Fine-tune (or load from the cache) and merge every seed: the raw rows, nothing drawn."""
    if name not in SUITES:
        raise ValueError(f"unknown suite '{name}'; choose one of {', '.join(SUITES)}")
    suite = SUITES[name]
    if size not in suite.sizes:
        raise ValueError(f"unknown size '{size}'; choose one of {', '.join(suite.sizes)}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    config = suite.sizes[size]
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    # One thread: these matrices are tiny, and on a shared 2-core machine a second thread
    # made a training step ~90x slower (thread hand-off under contention), not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tqdm(
            total=seeds * suite.work_per_seed(config),
            desc=f"{name} ({size})",
            disable=not progress,
        ) as bar:
            for seed in range(seeds):
                seed_rows, seed_infos = suite.run_seed(config, seed, cache_dir, bar)
                rows += seed_rows
                infos += seed_infos
    finally:
        torch.set_num_threads(threads)
    return {"suite": name, "size": size, "seeds": seeds, "rows": rows, "infos": infos}


def render(raw: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Tables, plots and Markdown from a suite's raw rows (as saved in NAME_results.json)."""
    name, size, seeds = raw["suite"], raw["size"], raw["seeds"]
    rows, infos = raw["rows"], raw["infos"]
    suite = SUITES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows, suite.metric)
    diffs = paired(rows, suite.metric)
    info = summarize_info(infos)
    problems = list(dict.fromkeys(r["problem"] for r in rows))

    plots = {
        "methods": f"{name}_methods.png",
        "coefficients": f"{name}_coefficients_vs_size.png",
        "heatmap": f"{name}_layerwise_heatmap.png",
    }
    plot_methods(
        summary, diffs, problems, suite.axis_label, suite.factor, out_dir / plots["methods"]
    )
    plot_coefficients(infos, problems, out_dir / plots["coefficients"])
    heat = next(i for i in infos if i["problem"] == suite.heatmap_problem)
    plot_heatmap(heat, "nan tau/tensor", out_dir / plots["heatmap"])

    text = [f"== {name} ({size}, {seeds} seed(s)): {suite.metric_label} =="]
    markdown = [
        f"## Suite `{name}` (size {size}, {seeds} seed(s))",
        suite.intro,
        f"Metric: {suite.metric_label}. Cells are mean ± std over seeds; best-scale cells end "
        "with the mean chosen scale (`@s`), chosen on the validation split only.",
    ]
    for problem in problems:
        table = results_table(summary, problem, suite.digits, suite.factor)
        text += [f"\n[{problem}]", text_table(table)]
        markdown += [f"### {name}: {problem}", markdown_table(table)]
    notes = suite.notes(info, diffs, summary)
    markdown += [
        f"### {name}: premise check (rank correlation with n_i, NAN spread from uniform)",
        markdown_table(info_table(info)),
        *notes,
        f"### {name}: paired differences, coefficient variant minus uniform, same models",
        "Each cell: mean over seeds, then each seed's difference (seed 0/1/...).",
    ]
    text += ["\n[premise check]", text_table(info_table(info)), *notes]
    for problem in problems:
        markdown += [
            f"#### {problem}",
            markdown_table(paired_table(diffs, problem, suite.digits, suite.factor)),
        ]
    for problem in problems:
        per_task = per_task_table(rows, problem, suite.digits, suite.factor)
        if per_task is not None:
            markdown += [
                f"### {name}: per-task scores, {problem} (mean over seeds; best scale where "
                "a method has one; which task gets which n_i rotates with the seed)",
                markdown_table(per_task),
            ]
    markdown += [
        f"![accuracy by method]({plots['methods']})",
        f"![NAN coefficient against training-set size]({plots['coefficients']})",
        f"![layer-wise NAN coefficients]({plots['heatmap']})",
    ]
    return {
        "suite": name,
        "size": size,
        "seeds": seeds,
        "rows": rows,
        "infos": infos,
        "summary": summary,
        "paired": diffs,
        "premise": info,
        "plots": {k: str(out_dir / v) for k, v in plots.items()},
        "text": "\n".join(text),
        "markdown": "\n\n".join(markdown),
    }

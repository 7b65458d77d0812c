"""The `digits` suite: a small backbone, fine-tuned on derived tasks of scikit-learn's digits.

Follows the standard task-vector protocol at toy scale: a backbone pretrained on a pretext task
(rotation prediction), one frozen linear head per task fitted on pretrained features, then the
backbone fine-tuned per task with its head frozen. Only the backbone is merged; each task is
scored with its own head. Training-set sizes differ on purpose (NAN's premise), and four
scenarios decide whether that difference shows up in the norms at all.

This file runs one seed and words the control; the data are in `_digits_data`, the model and
its training loop in `_digits_model`, the cached checkpoints in `_digits_build`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

import nanmerge
from nanmerge.bench import _data_informed
from nanmerge.bench._checkpoints import load_checkpoint
from nanmerge.bench._digits_build import Problem, build
from nanmerge.bench._digits_data import SCENARIOS, SIZES, DigitsSize, Eval
from nanmerge.bench._digits_model import WithHead, accuracies
from nanmerge.bench._evaluate import problem_info
from nanmerge.bench._merging import (
    COEFFICIENTS,
    LINES_METHODS,
    NAN_VARIANTS,
    ORACLE,
    PAIR_LABEL,
    State,
    lines_sweep,
    merge_methods,
    sweep,
    sweep_size,
)

__all__ = [
    "INTRO",
    "METRIC",
    "SCENARIOS",
    "SIZES",
    "control_note",
    "run_seed",
    "work_per_seed",
]

METRIC = "avg_acc"
INTRO = (
    "UCI handwritten digits (bundled with scikit-learn). A 3-layer MLP backbone is pretrained "
    "on rotation prediction, then copied and fine-tuned on derived tasks (image transformations "
    "and relabellings) with deliberately different training-set sizes n_i; each task keeps its "
    "own frozen head and only the backbone is merged. Scenarios: (a) every task gets the same "
    "number of steps; (b) fixed epochs, so steps grow with n_i; (c) equal n_i for every task, "
    "the control; (d) as (a) with half the labels replaced by random ones on every other task."
)


def _scores(accuracies: dict[str, float]) -> dict[str, float]:
    return {METRIC: sum(accuracies.values()) / len(accuracies)} | {
        f"acc:{k}": v for k, v in accuracies.items()
    }


def run_seed(
    size: DigitsSize, seed: int, cache_dir: Path, bar: tqdm | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for every scenario: pretrained, individual fine-tuned, every method x coefficients."""
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    methods = merge_methods(size.tasks, size.methods)
    for scenario in SCENARIOS:
        problem = build(size, scenario, seed, cache_dir, bar)

        scenario_rows = sweep(
            problem.models,
            methods,
            size.scale_grid,
            seed,
            _scorer(size, problem, problem.val, problem.models.names, METRIC),
            _scorer(size, problem, problem.test, problem.models.names, None),
            bar,
        )
        scenario_rows += lines_sweep(
            problem.models,
            size.beta_grid,
            seed,
            _scorer(size, problem, problem.val, problem.models.names, METRIC),
            _scorer(size, problem, problem.test, problem.models.names, None),
            bar,
        )
        scenario_rows += _pair_rows(size, problem, seed, bar)
        scenario_rows += _fixed_rows(size, problem)
        scenario_rows += _data_informed_rows(size, problem, seed, bar)
        for row in scenario_rows:
            row.update(problem=scenario, seed=seed)
        rows += scenario_rows
        infos.append(
            {
                "problem": scenario,
                "seed": seed,
                "steps": problem.steps,
                **problem_info(problem.models),
            }
        )
    return rows, infos


def _scorer(
    size: DigitsSize, problem: Problem, data: Eval, names: tuple[str, ...], key: str | None
) -> Callable[[State], Any]:
    """Scores of a merged backbone on the named tasks: all of them, or the metric alone."""

    def score(state: State) -> Any:
        each = accuracies(size, state, problem.heads, data)
        scores = _scores({n: each[n] for n in names})
        return scores if key is None else scores[key]

    return score


def pair_methods(size: DigitsSize) -> list[str]:
    """The two-model methods (slerp) of this size's selection."""
    two = merge_methods(2, size.methods)
    return [name for name in two if nanmerge.METHODS[name].max_models == 2]


def _pair_rows(
    size: DigitsSize, problem: Problem, seed: int, bar: tqdm | None
) -> list[dict[str, Any]]:
    """Two-model methods (slerp) merge the tasks with the fewest and most data, scored on those."""
    methods = pair_methods(size)
    order = sorted(range(size.tasks), key=lambda i: problem.models.data_sizes[i])
    pair = problem.models.subset((order[0], order[-1]))
    rows = sweep(
        pair,
        methods,
        size.scale_grid,
        seed,
        _scorer(size, problem, problem.val, pair.names, METRIC),
        _scorer(size, problem, problem.test, pair.names, None),
        bar,
    )
    for row in rows:
        row["method"] = f"{row['method']} {PAIR_LABEL}"
    return rows


def _data_informed_rows(
    size: DigitsSize, problem: Problem, seed: int, bar: tqdm | None
) -> list[dict[str, Any]]:
    """fisher and regmean, each model's statistics computed on its own task's training inputs."""
    names = problem.models.names
    modules = [
        WithHead(size, load_checkpoint(path), problem.heads[name])
        for name, path in zip(names, problem.models.models, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="nanmerge-statistics-") as folder:
        files = _data_informed.statistics_files(
            problem.models, modules, problem.train_inputs, Path(folder)
        )
        validate = _scorer(size, problem, problem.val, names, METRIC)
        test = _scorer(size, problem, problem.test, names, None)
        rows = _data_informed.rows(problem.models, files, seed, validate, test, bar)
        # AdaMerging learns on the validation inputs without their labels (never on test), one
        # batch of 50 per task and step; steps scale with the fine-tuning budget (100 at full).
        pretrained = load_checkpoint(problem.models.base)
        heads = [WithHead(size, pretrained, problem.heads[name]) for name in names]
        unlabeled = [list(problem.val.x[problem.val.slices[name]].split(50)) for name in names]
        steps = max(5, size.budget_steps // 3)
        return rows + _data_informed.adamerging_rows(
            problem.models, heads, unlabeled, steps, seed, Path(folder), validate, test, bar
        )


def _fixed_rows(size: DigitsSize, problem: Problem) -> list[dict[str, Any]]:
    """Reference points: the pretrained backbone, and each task's own fine-tuned backbone."""
    base_scores = _scores(
        accuracies(size, load_checkpoint(problem.models.base), problem.heads, problem.test)
    )
    own = {
        name: accuracies(size, load_checkpoint(path), problem.heads, problem.test)[name]
        for name, path in zip(problem.models.names, problem.models.models, strict=False)
    }
    fixed = [("pretrained", base_scores), ("fine-tuned (individual)", _scores(own))]
    return [
        {
            "method": label,
            "coefficients": "-",
            "scale_mode": "-",
            "scale": None,
            "val": math.nan,
            **scores,
        }
        for label, scores in fixed
    ]


def work_per_seed(size: DigitsSize) -> int:
    """Fine-tunes plus merges per seed, the units of the progress bar."""
    merges = sweep_size(merge_methods(size.tasks, size.methods), size.scale_grid) + sweep_size(
        pair_methods(size), size.scale_grid
    )
    lines = len(LINES_METHODS) * len(COEFFICIENTS) * len(size.beta_grid)
    return len(SCENARIOS) * (size.tasks + merges + lines + _data_informed.work())


def control_note(premise: list[dict[str, Any]], diffs: list[dict[str, Any]]) -> list[str]:
    """The equal-data control in words: how far NAN moves from uniform when n_i are all equal."""
    control = next((p for p in premise if p["problem"] == "c_equal_data"), None)
    if control is None:
        return []
    spread = ", ".join(f"{v} {m:.1%}" for v, (m, _) in control["spread"].items())
    nan_diffs = [
        d for d in diffs if d["problem"] == "c_equal_data" and d["coefficients"] in NAN_VARIANTS
    ]
    oracle_diffs = [
        abs(d["diff"])
        for d in diffs
        if d["problem"] == "c_equal_data" and d["coefficients"] == ORACLE
    ]
    largest = max(oracle_diffs, default=0.0) * 100
    text = (
        "Control (c_equal_data): every task has the same n_i, so the data-size premise predicts "
        "uniform coefficients. The oracle weights are exactly uniform (largest oracle - uniform "
        f"difference: {largest:.2f} points). NAN's coefficients still deviate from uniform by "
        f"up to: {spread}; that spread comes from something other than data size."
    )
    if nan_diffs:
        worst = max(nan_diffs, key=lambda d: abs(d["diff"]))
        where = f"{worst['method']}, {worst['coefficients']}, {worst['scale_mode']} scale"
        text += (
            " Largest single-seed NAN - uniform accuracy difference here: "
            f"{worst['diff'] * 100:+.1f} points ({where})."
        )
    return [text]

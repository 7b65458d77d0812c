"""The `digits` suite: a small backbone, fine-tuned on derived tasks of scikit-learn's digits.

Follows the standard task-vector protocol at toy scale: a backbone pretrained on a pretext task
(rotation prediction), one frozen linear head per task fitted on pretrained features, then the
backbone fine-tuned per task with its head frozen. Only the backbone is merged; each task is
scored with its own head. Training-set sizes differ on purpose (NAN's premise), and four
scenarios decide whether that difference shows up in the norms at all.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

import nanmerge
from nanmerge.bench import _data_informed
from nanmerge.bench._checkpoints import (
    ModelSet,
    cache_folder,
    load_checkpoint,
    save_checkpoint,
)
from nanmerge.bench._evaluate import problem_info
from nanmerge.bench._merging import (
    NAN_VARIANTS,
    ORACLE,
    PAIR_LABEL,
    State,
    sweep,
    sweep_size,
)

METRIC = "avg_acc"
INTRO = (
    "UCI handwritten digits (bundled with scikit-learn). A 3-layer MLP backbone is pretrained "
    "on rotation prediction, then copied and fine-tuned on derived tasks (image transformations "
    "and relabellings) with deliberately different training-set sizes n_i; each task keeps its "
    "own frozen head and only the backbone is merged. Scenarios: (a) every task gets the same "
    "number of steps; (b) fixed epochs, so steps grow with n_i; (c) equal n_i for every task, "
    "the control; (d) as (a) with half the labels replaced by random ones on every other task."
)
SCENARIOS = ("a_equal_budget", "b_budget_grows", "c_equal_data", "d_noisy_labels")
PRETRAIN_N, VAL_N, TEST_N = 500, 200, 300


@dataclass(frozen=True)
class DigitsSize:
    tasks: int
    hidden: int
    pretrain_steps: int
    budget_steps: int
    probe_steps: int
    batch: int
    lr: float
    n_min: int
    n_max: int
    noisy_fraction: float
    scale_grid: tuple[float, ...]


_FULL = DigitsSize(
    8, 256, 1500, 300, 200, 32, 1e-4, 25, 780, 0.5, (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
)
SIZES = {
    "tiny": DigitsSize(6, 32, 60, 15, 30, 32, 1e-3, 20, 320, 0.5, ()),
    # the full models (seed 0 checkpoints are shared with `full`), a coarser scale grid
    "demo": replace(_FULL, scale_grid=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0)),
    "full": _FULL,
}


def _flip_lr(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _flip_ud(x: np.ndarray) -> np.ndarray:
    return x[:, ::-1, :]


def _rot90(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 1))


def _invert(x: np.ndarray) -> np.ndarray:
    return 1.0 - x


def _same(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class _TaskDef:
    name: str
    transform: Callable[[np.ndarray], np.ndarray]
    label: Callable[[np.ndarray], np.ndarray]
    classes: int


TASKS = (
    _TaskDef("digit", _same, lambda y: y, 10),
    _TaskDef("rot90", _rot90, lambda y: y, 10),
    _TaskDef("invert", _invert, lambda y: y, 10),
    _TaskDef("parity_T", _transpose, lambda y: y % 2, 2),
    _TaskDef("mod3_flip", _flip_lr, lambda y: y % 3, 3),
    _TaskDef("vflip", _flip_ud, lambda y: y, 10),
    _TaskDef("large", _same, lambda y: (y >= 5).astype(np.int64), 2),
    _TaskDef("hflip", _flip_lr, lambda y: y, 10),
)


class Backbone(nn.Module):
    """The merged part: its state dict is exactly what each checkpoint holds."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


@dataclass
class _Split:
    x: torch.Tensor
    y: torch.Tensor


def _images() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def _task_split(task: _TaskDef, images: np.ndarray, labels: np.ndarray) -> _Split:
    x = np.ascontiguousarray(task.transform(images)).reshape(len(images), 64)
    return _Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(task.label(labels)))


def _batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches from successive shuffles, so every sample is seen before any repeats."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + batch] for i in range(0, n, batch)]
    return out[:steps]


def _pretrain(size: DigitsSize, images: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
    """Rotation prediction: a pretext task that teaches stroke features without digit labels."""
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    torch.manual_seed(seed * 1000 + 7)
    x = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)]).reshape(-1, 64)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.arange(4).repeat_interleave(len(images))
    backbone = Backbone(size.hidden)
    head = nn.Linear(size.hidden, 4)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=size.lr)
    for idx in _batches(len(xt), 64, size.pretrain_steps, gen):
        loss = nn.functional.cross_entropy(head(backbone(xt[idx])), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return backbone.state_dict()


def _fit_head(
    size: DigitsSize, backbone: Backbone, data: _Split, classes: int, gen: torch.Generator
) -> nn.Linear:
    """A linear probe on frozen pretrained features: the task's head, frozen from then on."""
    head = nn.Linear(size.hidden, classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
        features = backbone(data.x)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(size.probe_steps):
        loss = nn.functional.cross_entropy(head(features), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def _finetune(
    size: DigitsSize,
    base: dict[str, torch.Tensor],
    head: nn.Linear,
    data: _Split,
    steps: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    backbone = Backbone(size.hidden)
    backbone.load_state_dict(base)
    head.requires_grad_(False)
    opt = torch.optim.Adam(backbone.parameters(), lr=size.lr)
    for idx in _batches(len(data.x), size.batch, steps, gen):
        loss = nn.functional.cross_entropy(head(backbone(data.x[idx])), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return backbone.state_dict()


def _sizes(size: DigitsSize, scenario: str, seed: int) -> list[int]:
    """Geometric spread of n_i, assigned to tasks in a seed-dependent order."""
    if scenario == "c_equal_data":
        return [round(math.sqrt(size.n_min * size.n_max))] * size.tasks
    spread = [round(v) for v in np.geomspace(size.n_min, size.n_max, size.tasks)]
    order = np.random.default_rng([seed, 2]).permutation(size.tasks)
    return [spread[i] for i in order]


def _steps(size: DigitsSize, scenario: str, sizes: list[int]) -> list[int]:
    """(b) fixes epochs so the mean step count equals the equal-budget scenarios' budget."""
    if scenario != "b_budget_grows":
        return [size.budget_steps] * len(sizes)
    per_epoch = [math.ceil(n / size.batch) for n in sizes]
    epochs = max(1, round(size.budget_steps * len(sizes) / sum(per_epoch)))
    return [epochs * p for p in per_epoch]


@dataclass
class _Eval:
    """Every task's evaluation inputs stacked, so one backbone pass scores all tasks."""

    x: torch.Tensor
    y: torch.Tensor
    slices: dict[str, slice]

    @classmethod
    def of(cls, splits: dict[str, _Split]) -> _Eval:
        slices, start = {}, 0
        for name, split in splits.items():
            slices[name] = slice(start, start + len(split.y))
            start += len(split.y)
        x = torch.cat([s.x for s in splits.values()])
        return cls(x, torch.cat([s.y for s in splits.values()]), slices)


@dataclass
class _Problem:
    models: ModelSet
    heads: dict[str, nn.Linear]
    val: _Eval
    test: _Eval
    steps: list[int]
    train_inputs: list[torch.Tensor] = field(default_factory=list)


def _build(
    size: DigitsSize, scenario: str, seed: int, cache_dir: Path, bar: tqdm | None
) -> _Problem:
    """Fine-tune (or load from the cache) every task's backbone for one scenario and seed."""
    images, labels = _images()
    order = np.random.default_rng([seed, 1]).permutation(len(images))
    pre, val_idx = order[:PRETRAIN_N], order[PRETRAIN_N : PRETRAIN_N + VAL_N]
    test_idx = order[PRETRAIN_N + VAL_N : PRETRAIN_N + VAL_N + TEST_N]
    pool = order[PRETRAIN_N + VAL_N + TEST_N :]
    tasks = TASKS[: size.tasks]
    sizes = _sizes(size, scenario, seed)
    steps = _steps(size, scenario, sizes)

    # The scale grid only affects merging, so it stays out of the checkpoints' cache key.
    settings = {**asdict(size), "seed": seed, "scale_grid": None}
    base_path = (
        cache_folder(cache_dir, "digits", {**settings, "part": "pretrain"}) / "base.safetensors"
    )
    if not base_path.exists():
        save_checkpoint(_pretrain(size, images[pre], seed), base_path)
    base = load_checkpoint(base_path)
    pretrained = Backbone(size.hidden)
    pretrained.load_state_dict(base)

    folder = cache_folder(cache_dir, "digits", {**settings, "scenario": scenario})
    heads_path = folder / "heads.safetensors"
    heads: dict[str, nn.Linear] = {}
    paths = [folder / f"{task.name}.safetensors" for task in tasks]
    # Heads are written last, so their file marks a complete scenario; otherwise retrain all.
    cached = heads_path.exists() and all(p.exists() for p in paths)
    train_inputs = []
    for i, (task, n, n_steps, path) in enumerate(zip(tasks, sizes, steps, paths, strict=True)):
        if bar is not None:
            bar.update(1)
        pick = np.random.default_rng([seed, 3, i]).permutation(pool)[:n]
        train = _task_split(task, images[pick], labels[pick])
        train_inputs.append(train.x)  # unlabeled inputs for the data-informed methods
        if cached:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + 100 + i)
        torch.manual_seed(seed * 1000 + 100 + i)
        if scenario == "d_noisy_labels" and i % 2 == 1:
            noisy = torch.rand(n, generator=gen) < size.noisy_fraction
            train.y[noisy] = torch.randint(task.classes, (int(noisy.sum()),), generator=gen)
        heads[task.name] = _fit_head(size, pretrained, train, task.classes, gen)
        save_checkpoint(_finetune(size, base, heads[task.name], train, n_steps, gen), path)
    if heads:
        save_checkpoint(_head_tensors(heads), heads_path)
    stored = load_checkpoint(heads_path)
    for task in tasks:
        head = nn.Linear(size.hidden, task.classes)
        head.load_state_dict(
            {"weight": stored[f"{task.name}.weight"], "bias": stored[f"{task.name}.bias"]}
        )
        heads[task.name] = head
    names = tuple(t.name for t in tasks)
    return _Problem(
        ModelSet(base_path, tuple(paths), tuple(sizes), names),
        heads,
        _Eval.of({t.name: _task_split(t, images[val_idx], labels[val_idx]) for t in tasks}),
        _Eval.of({t.name: _task_split(t, images[test_idx], labels[test_idx]) for t in tasks}),
        steps,
        train_inputs,
    )


def _head_tensors(heads: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, head in heads.items():
        out[f"{name}.weight"] = head.weight.detach()
        out[f"{name}.bias"] = head.bias.detach()
    return out


def _accuracies(
    size: DigitsSize, state: State, heads: dict[str, nn.Linear], data: _Eval
) -> dict[str, float]:
    backbone = Backbone(size.hidden)
    backbone.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        features = backbone(data.x)
        return {
            name: float((heads[name](features[sl]).argmax(1) == data.y[sl]).float().mean())
            for name, sl in data.slices.items()
        }


def _scores(accuracies: dict[str, float]) -> dict[str, float]:
    return {METRIC: sum(accuracies.values()) / len(accuracies)} | {
        f"acc:{k}": v for k, v in accuracies.items()
    }


def merge_methods(tasks: int) -> list[str]:
    """Every registered method that accepts this many models and needs no data statistics
    (those run in `_data_informed_rows`, after their statistics are computed)."""
    return [
        name
        for name, spec in nanmerge.METHODS.items()
        if spec.min_models <= tasks
        and (spec.max_models is None or spec.max_models >= tasks)
        and not spec.statistics
    ]


def run_seed(
    size: DigitsSize, seed: int, cache_dir: Path, bar: tqdm | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for every scenario: pretrained, individual fine-tuned, every method x coefficients."""
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    methods = merge_methods(size.tasks)
    for scenario in SCENARIOS:
        problem = _build(size, scenario, seed, cache_dir, bar)

        scenario_rows = sweep(
            problem.models,
            methods,
            size.scale_grid,
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
    size: DigitsSize, problem: _Problem, data: _Eval, names: tuple[str, ...], key: str | None
) -> Callable[[State], Any]:
    """Scores of a merged backbone on the named tasks: all of them, or the metric alone."""

    def score(state: State) -> Any:
        accuracies = _accuracies(size, state, problem.heads, data)
        scores = _scores({n: accuracies[n] for n in names})
        return scores if key is None else scores[key]

    return score


def _pair_rows(
    size: DigitsSize, problem: _Problem, seed: int, bar: tqdm | None
) -> list[dict[str, Any]]:
    """Two-model methods (slerp) merge the tasks with the fewest and most data, scored on those."""
    methods = [
        name
        for name, spec in nanmerge.METHODS.items()
        if spec.max_models == 2 and name not in merge_methods(size.tasks)
    ]
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


class _WithHead(Backbone):
    """A fine-tuned backbone with its task's frozen head: what Fisher is computed on."""

    def __init__(self, size: DigitsSize, state: dict[str, torch.Tensor], head: nn.Linear) -> None:
        super().__init__(size.hidden)
        self.load_state_dict(state)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(super().forward(x))
        return out


def _data_informed_rows(
    size: DigitsSize, problem: _Problem, seed: int, bar: tqdm | None
) -> list[dict[str, Any]]:
    """fisher and regmean, each model's statistics computed on its own task's training inputs."""
    names = problem.models.names
    modules = [
        _WithHead(size, load_checkpoint(path), problem.heads[name])
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
        heads = [_WithHead(size, pretrained, problem.heads[name]) for name in names]
        unlabeled = [list(problem.val.x[problem.val.slices[name]].split(50)) for name in names]
        steps = max(5, size.budget_steps // 3)
        return rows + _data_informed.adamerging_rows(
            problem.models, heads, unlabeled, steps, seed, Path(folder), validate, test, bar
        )


def _fixed_rows(size: DigitsSize, problem: _Problem) -> list[dict[str, Any]]:
    """Reference points: the pretrained backbone, and each task's own fine-tuned backbone."""
    base_scores = _scores(
        _accuracies(size, load_checkpoint(problem.models.base), problem.heads, problem.test)
    )
    own = {
        name: _accuracies(size, load_checkpoint(path), problem.heads, problem.test)[name]
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
    pairs = [name for name, spec in nanmerge.METHODS.items() if spec.max_models == 2]
    merges = sweep_size(merge_methods(size.tasks), size.scale_grid) + sweep_size(
        [m for m in pairs if m not in merge_methods(size.tasks)], size.scale_grid
    )
    return len(SCENARIOS) * (size.tasks + merges + _data_informed.work())


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

"""`nanmerge search`: trials of merge recipes on Ray Tune, from a laptop to a cluster.

Ray Tune schedules, samples (grid, random, or Optuna's CMA-ES sampler), records and resumes;
this module only turns a spec into Tune's search space and a trial into a merge. A trial
merges through the public API with the recipe's fixed seed, so any row of the results can be
rerun alone and gives the same model. Ray is imported only here, when a search starts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanmerge._types import MergeError
from nanmerge.engine._ray import connect
from nanmerge.learn._search_check import accepts, check_space, expected_trials
from nanmerge.learn._search_results import Table, write_results
from nanmerge.learn._search_spec import (
    SearchSpec,
    load_spec,
    trial_recipe,
)

EXPERIMENT = "search"
INSTALL = "pip install 'nanmerge[ray]'"
# the bundled suites' module, loaded by name: the layering keeps library code off bench/
SUITES_MODULE = "nanmerge.bench._search_suites"


@dataclass(frozen=True)
class SearchResult:
    table: Table
    out: Path
    files: list[Path]
    seconds: float
    complete: bool


def require_ray(strategy: str = "random") -> None:
    """Fail in one line when Ray Tune (or, for cmaes, Optuna and cmaes) is not installed."""
    needed = ["ray.tune"] + (["optuna", "cmaes"] if strategy == "cmaes" else [])
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MergeError(
                f"nanmerge search needs {name.split('.')[0]}, which is not installed: {INSTALL}"
            ) from None


def search(
    spec: SearchSpec | Mapping[str, Any] | str | Path,
    *,
    out: str | Path,
    address: str | None = None,
    resume: bool = False,
    cache: str | Path = "cache",
) -> SearchResult:
    """Run (or resume) a search; write the results table, plot and best recipe(s) to `out`."""
    spec = load_spec(spec)
    require_ray(spec.strategy)
    spec = _absolute_function(spec)
    out = Path(out).resolve()
    storage = out / "tune"
    saved = out / "spec.json"
    text = json.dumps(spec.model_dump(mode="json"), indent=1, sort_keys=True)
    if resume:
        if not (storage / EXPERIMENT).is_dir():
            raise MergeError(f"nothing to resume in {out}: no search was started there")
        if saved.read_text() != text:
            raise MergeError(
                f"the spec differs from the one {out} was started with ({saved}); resume with "
                "that spec, or start the new one in another --out"
            )
    elif (storage / EXPERIMENT).exists():
        raise MergeError(f"{out} already holds a search; pass --resume to go on, or another --out")
    setup = _setup(spec, Path(cache).resolve())
    check_space(spec, setup["models"])
    expected = expected_trials(spec, len(setup["models"].get("models", [])))
    started = connect(address)
    try:
        start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(text)
        results = _fit(spec, setup, storage, resume)
        table = Table.of(spec, results, setup, accepts)
        files = write_results(table, out)
        seconds = time.perf_counter() - start
    finally:
        if started:
            import ray

            ray.shutdown()
    complete = not table.unfinished and (expected is None or len(table.rows) >= expected)
    return SearchResult(table, out, files, seconds, complete)


def _absolute_function(spec: SearchSpec) -> SearchSpec:
    """A `file.py:function` objective by its absolute path: trials run in other folders."""
    target = spec.objective.function
    if target is None:
        return spec
    where, _, name = target.rpartition(":")
    if not where.endswith(".py"):
        return spec
    path = Path(where).resolve()
    if not path.is_file():
        raise MergeError(f"objective.function: file not found: {path}")
    objective = spec.objective.model_copy(update={"function": f"{path}:{name}"})
    return spec.model_copy(update={"objective": objective})


def _setup(spec: SearchSpec, cache: Path) -> dict[str, Any]:
    """What every trial needs, small enough to ship: the spec, the models, the cache folder.
    Building it here first also builds a suite's checkpoints once, before any trial."""
    setup = {"spec": spec.model_dump(mode="json"), "cache": str(cache)}
    models, _, metrics = objective_of(json.dumps(setup, sort_keys=True))
    return {**setup, "models": _absolute_models(models or spec.recipe), "metrics": metrics}


def _absolute_models(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """`base` and `models` with local paths made absolute (Tune runs trials in their folders)."""

    def fix(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {**value, "path": fix(value["path"])} if "path" in value else value
        return str(Path(value).resolve()) if Path(str(value)).exists() else value

    picked = {k: recipe[k] for k in ("base", "models") if k in recipe}
    if "base" in picked and picked["base"] is not None:
        picked["base"] = fix(picked["base"])
    if "models" in picked:
        picked["models"] = [fix(m) for m in picked["models"]]
    return picked


@functools.lru_cache(maxsize=4)
def objective_of(key: str) -> tuple[dict[str, Any], Callable[..., Any], dict[str, str]]:
    """(models, score, metrics) of a setup, once per process: a suite's data are loaded once."""
    setup = json.loads(key)
    spec = SearchSpec.model_validate(setup["spec"])
    objective = spec.objective
    if objective.suite is not None:
        module = importlib.import_module(SUITES_MODULE)
        suite = getattr(module, objective.suite)(cache=Path(setup["cache"]), **objective.options)
        return suite.models, suite.score, dict(objective.metrics or suite.metrics)
    return {}, _load_function(str(objective.function)), dict(objective.metrics)


def _load_function(target: str) -> Callable[..., Any]:
    where, _, name = target.rpartition(":")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(f"_nanmerge_objective_{name}", where)
            if loader is None or loader.loader is None:
                raise ImportError(f"cannot load {where}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, OSError) as exc:
        raise MergeError(f"objective.function {target!r}: cannot import {where}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise MergeError(f"objective.function {target!r}: {where} has no function {name!r}")
    return fn


def _param_space(spec: SearchSpec, models: int) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in spec.dimensions(models).items():
        if spec.strategy == "grid":
            space[key] = tune.grid_search(dim.grid())
        elif dim.choice is not None:
            space[key] = tune.choice(list(range(len(dim.choice))))
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            space[key] = tune.loguniform(*dim.loguniform)
        elif dim.integer is not None:
            space[key] = tune.randint(dim.integer[0], dim.integer[1] + 1)
    return space


def _tune_config(spec: SearchSpec, metrics: Mapping[str, str]) -> Any:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    metric, mode = next(iter(metrics.items()))
    # the sampler's own concurrency limit: Tune's max_concurrent_trials wraps Searchers only
    searcher: Any = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.workers or 0)
    if spec.strategy == "cmaes":
        from optuna.samplers import CmaEsSampler
        from ray.tune.search.optuna import OptunaSearch

        sampler = CmaEsSampler(
            seed=spec.seed,
            n_startup_trials=0,
            popsize=spec.population,
            warn_independent_sampling=False,
        )
        searcher = OptunaSearch(sampler=sampler)
    minutes = spec.budget.minutes
    return tune.TuneConfig(
        metric=metric,
        mode=mode,
        search_alg=searcher,
        num_samples=1 if spec.strategy == "grid" else (spec.budget.trials or -1),
        max_concurrent_trials=spec.workers if spec.strategy == "cmaes" else None,
        time_budget_s=None if minutes is None else minutes * 60,
        reuse_actors=True,  # one worker process runs many trials: a suite's data load once
    )


def _fit(spec: SearchSpec, setup: dict[str, Any], storage: Path, resume: bool) -> list[Any]:
    """Tune's trials, in the order they were created: (config, metrics, error)."""
    from ray import tune

    trainable = tune.with_parameters(run_trial, setup=setup)
    if resume:
        path = str(storage / EXPERIMENT)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=False)
    else:
        count = len(setup["models"].get("models", []))
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec, count),
            tune_config=_tune_config(spec, setup["metrics"]),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    return [(r.config, r.metrics or {}, r.error) for r in (grid[i] for i in range(len(grid)))]


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial, in a Ray worker: the recipe this config makes, merged and scored."""
    from ray import tune

    key = json.dumps({"spec": setup["spec"], "cache": setup["cache"]}, sort_keys=True)
    _, score, metrics = objective_of(key)
    spec = SearchSpec.model_validate(setup["spec"])
    recipe = trial_recipe(spec, config, setup["models"], accepts)
    tune.report(evaluate(recipe, score, spec.objective.input, metrics))


def evaluate(
    recipe: Mapping[str, Any], score: Callable[..., Any], given: str, metrics: Mapping[str, str]
) -> dict[str, float]:
    """Merge `recipe` (in memory, or into a scratch folder removed afterwards) and score it."""
    from nanmerge.engine import merge

    if given == "folder":
        with tempfile.TemporaryDirectory(prefix="nanmerge-trial-") as scratch:
            target = Path(scratch) / "model"
            merge({**recipe, "output": str(target)})
            found = score(target)
    else:
        found = score(merge(recipe))
    if not isinstance(found, Mapping):
        raise MergeError(f"the objective returned a {type(found).__name__}, not a dict of metrics")
    numbers = {
        str(k): float(v)
        for k, v in found.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    missing = [m for m in metrics if m not in numbers]
    if missing:
        raise MergeError(
            f"the objective returned no number for metric(s) {', '.join(missing)}; it returned "
            f"{', '.join(map(str, found)) or 'nothing'}"
        )
    return numbers

"""A search's results: every trial's recipe and metrics as a table, a plot, the best recipes.

The table is written as CSV (one column per searched value and metric) and JSON (each trial's
whole recipe, runnable as is, and a failed trial's traceback); the best recipe (one metric)
or the Pareto front's recipes (several) as YAML that `nanmerge run` takes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanmerge.learn._search_spec import SearchSpec, trial_recipe


@dataclass
class Table:
    """One row per trial, in the order Tune created them."""

    rows: list[dict[str, Any]]
    metrics: dict[str, str]  # name -> min | max; the first is the searched one
    searched: list[str] = field(default_factory=list)  # parameter names that vary

    @classmethod
    def of(
        cls,
        spec: SearchSpec,
        outcomes: list[Any],
        setup: Mapping[str, Any],
        accepts: Callable[[str], frozenset[str]],
    ) -> Table:
        metrics: dict[str, str] = dict(setup["metrics"])
        rows = []
        for index, (config, found, error) in enumerate(outcomes):
            # Tune's `done`: the trial returned; one that reported but had not returned when
            # the search was killed runs again on resume
            status = (
                "failed" if error is not None else "finished" if found.get("done") else "unfinished"
            )
            rows.append(
                {
                    "trial": index,
                    "status": status,
                    "recipe": trial_recipe(spec, config, setup["models"], accepts),
                    "metrics": {k: v for k, v in found.items() if _is_metric(k, v, metrics)},
                    "seconds": found.get("time_total_s"),
                    "error": None if error is None else _traceback(error),
                }
            )
        return cls(rows, metrics, sorted(spec.space.parameters))

    @property
    def primary(self) -> str:
        return next(iter(self.metrics))

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def unfinished(self) -> int:
        return self.count("unfinished")

    def finished(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "finished"]

    def best(self) -> dict[str, Any] | None:
        """The finished trial with the best searched metric (the first such, on ties)."""
        done = self.finished()
        return min(done, key=lambda r: self._key(r, self.primary)) if done else None

    def front(self) -> list[dict[str, Any]]:
        """The finished trials no other trial beats on every metric (the Pareto front)."""
        done = self.finished()
        keys = [[self._key(r, m) for m in self.metrics] for r in done]

        def dominated(i: int) -> bool:
            return any(
                all(a <= b for a, b in zip(other, keys[i], strict=True)) and other != keys[i]
                for other in keys
            )

        front = [r for i, r in enumerate(done) if not dominated(i)]
        return sorted(front, key=lambda r: self._key(r, self.primary))

    def _key(self, row: Mapping[str, Any], metric: str) -> float:
        value = float(row["metrics"].get(metric, math.nan))
        if math.isnan(value):
            return math.inf
        return value if self.metrics[metric] == "min" else -value


def _is_metric(key: str, value: Any, metrics: Mapping[str, str]) -> bool:
    """The objective's numbers, without Tune's bookkeeping (time, iteration, ids)."""
    bookkeeping = {"timestamp", "training_iteration", "pid", "time_this_iter_s", "time_total_s"}
    return key in metrics or (
        isinstance(value, float) and key not in bookkeeping and not key.startswith("time_")
    )


def _traceback(error: BaseException) -> str:
    """What Ray kept of the trial's exception, with the worker's traceback in it."""
    cause = getattr(error, "cause", None)
    text = str(error)
    return text if cause is None or str(cause) in text else f"{text}\n{cause}"


def write_results(table: Table, out: Path) -> list[Path]:
    """results.csv, results.json, search.png and the best recipe(s) as YAML; their paths."""
    files = [_write_csv(table, out / "results.csv"), out / "results.json"]
    best = table.best()
    summary = {
        "metrics": table.metrics,
        "trials": len(table.rows),
        "finished": table.count("finished"),
        "failed": table.count("failed"),
        "unfinished": table.unfinished,
        "best": None if best is None else best["trial"],
        "front": [r["trial"] for r in table.front()] if len(table.metrics) > 1 else None,
        "rows": table.rows,
    }
    files[1].write_text(json.dumps(summary, indent=1, default=str))
    plot = _plot(table, out / "search.png")
    files += [plot] if plot else []
    if len(table.metrics) > 1:
        folder = out / "front"
        folder.mkdir(exist_ok=True)
        for row in table.front():
            files.append(_write_recipe(row, folder / f"trial_{row['trial']:04d}.yaml", out))
    elif best is not None:
        files.append(_write_recipe(best, out / "best.yaml", out))
    return files


def _write_recipe(row: Mapping[str, Any], path: Path, out: Path) -> Path:
    """A recipe `nanmerge run` takes: the trial's, writing into out/models/trial_N."""
    recipe = {**row["recipe"], "output": str(out / "models" / f"trial_{row['trial']:04d}")}
    scores = ", ".join(f"{k} {v:.6g}" for k, v in row["metrics"].items())
    header = f"# nanmerge search, trial {row['trial']}: {scores}\n"
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return path


def _write_csv(table: Table, path: Path) -> Path:
    metric_names = list(dict.fromkeys(m for r in table.rows for m in r["metrics"]))
    header = ["trial", "status", "method", *table.searched, "coefficients", "model_coefficients"]
    header += [*metric_names, "seconds", "error"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in table.rows:
            recipe = row["recipe"]
            coefs = [m.get("coefficient") for m in recipe.get("models", []) if isinstance(m, dict)]
            writer.writerow(
                [
                    row["trial"],
                    row["status"],
                    recipe.get("method"),
                    *(recipe.get("parameters", {}).get(p, "") for p in table.searched),
                    json.dumps(recipe.get("coefficients", "uniform")),
                    json.dumps(coefs) if any(c is not None for c in coefs) else "",
                    *(row["metrics"].get(m, "") for m in metric_names),
                    row["seconds"] if row["seconds"] is not None else "",
                    (row["error"] or "").strip().splitlines()[-1:][0] if row["error"] else "",
                ]
            )
    return path


def _plot(table: Table, path: Path) -> Path | None:
    """The searched metric against trials (best so far as a line) and, for two metrics, the
    trials in the metrics' plane with the Pareto front; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = table.finished()
    two = len(table.metrics) == 2
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 4), squeeze=False)
    ax = axes[0][0]
    metric = table.primary
    xs = [r["trial"] for r in done]
    ys = [r["metrics"][metric] for r in done]
    ax.scatter(xs, ys, s=14, label="trial")
    pick = min if table.metrics[metric] == "min" else max
    best_so_far = [pick(ys[: i + 1]) for i in range(len(ys))]
    ax.step(xs, best_so_far, where="post", color="C1", label="best so far")
    failed = [r["trial"] for r in table.rows if r["status"] == "failed"]
    if failed and ys:
        ax.scatter(failed, [min(ys)] * len(failed), marker="x", color="C3", label="failed")
    ax.set(xlabel="trial", ylabel=f"{metric} ({table.metrics[metric]})", title="search")
    ax.legend()
    if two:
        ax = axes[0][1]
        first, second = list(table.metrics)
        ax.scatter([r["metrics"][first] for r in done], [r["metrics"][second] for r in done], s=14)
        front = table.front()
        ax.plot(
            [r["metrics"][first] for r in front],
            [r["metrics"][second] for r in front],
            "o-",
            color="C1",
            label="Pareto front",
        )
        ax.set(xlabel=f"{first} ({table.metrics[first]})", ylabel=second, title="Pareto front")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

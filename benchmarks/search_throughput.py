"""Trials per minute of `nanmerge search` on the digits suite, with 1 and 2 workers.

    python benchmarks/search_throughput.py [--trials 30] [--size tiny] [--cache cache]

One local Ray (as many CPUs as the largest worker count) runs the same random search (task
arithmetic's scale, uniform or NAN coefficients) once per worker count. The rate counts the
whole search, Ray Tune's bookkeeping and each worker's start-up (importing torch, loading the
suite) included; `steady` leaves out the first trial of each worker. It is a benchmark, not
a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from nanmerge.learn._search import search


def spec(trials: int, workers: int, size: str) -> dict[str, object]:
    return {
        "recipe": {"method": "task_arithmetic"},
        "space": {
            "parameters": {"scale": {"uniform": [0.1, 1.0]}},
            "coefficients": ["uniform", {"estimator": "nan", "norm_of": "task_vector"}],
        },
        "objective": {"suite": "digits", "options": {"size": size}},
        "strategy": "random",
        "budget": {"trials": trials},
        "workers": workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--size", default="tiny", choices=["tiny", "demo", "full"])
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    figures = []
    try:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as out:
                result = search(
                    spec(args.trials, workers, args.size), out=Path(out), cache=args.cache
                )
            rows = result.table.finished()
            seconds = sorted(r["seconds"] for r in rows)
            # the slowest `workers` trials are the ones that started a worker process
            steady_s = sum(seconds[:-workers]) / max(1, len(seconds) - workers)
            figures.append(
                {
                    "workers": workers,
                    "trials": len(rows),
                    "seconds": round(result.seconds, 1),
                    "trials_per_minute": round(60 * len(rows) / result.seconds, 1),
                    "steady_seconds_per_trial_in_worker": round(steady_s, 3),
                }
            )
            print(json.dumps(figures[-1]))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

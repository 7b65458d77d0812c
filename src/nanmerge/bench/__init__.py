"""Benchmark suites and the demo: what each merge method does with uniform and NAN coefficients.

Nothing in the library imports this package; it uses the public API like a user would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanmerge.bench._run import SUITES, run

__all__ = ["SUITES", "run_demo", "run_suite"]

DEMO_SEEDS = 1


def _write_report(out_dir: Path, title: str, sections: list[str]) -> Path:
    path = out_dir / "report.md"
    path.write_text(f"# {title}\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return path


def run_suite(
    name: str,
    *,
    out_dir: Path,
    cache_dir: Path,
    seeds: int,
    size: str = "demo",
    progress: bool = True,
) -> dict[str, Any]:
    """Run one suite (`lsq` or `digits`), print its tables, write out_dir/report.md and plots.

    `progress` only switches the progress bar; the tables are always printed.
    """
    result = run(
        name, out_dir=out_dir, cache_dir=cache_dir, seeds=seeds, size=size, progress=progress
    )
    print(result["text"])
    section = f"{result['markdown']}\n\nWall time: {result['seconds']:.0f} s."
    result["report"] = str(_write_report(out_dir, f"nanmerge bench: {name}", [section]))
    return result


def run_demo(*, out_dir: Path, cache_dir: Path, progress: bool = True) -> Path:
    """Both suites at demo size (minutes on a laptop CPU); returns the report.md path."""
    sections = []
    for name in SUITES:
        result = run(
            name,
            out_dir=out_dir,
            cache_dir=cache_dir,
            seeds=DEMO_SEEDS,
            size="demo",
            progress=progress,
        )
        print(result["text"])
        sections.append(f"{result['markdown']}\n\nWall time: {result['seconds']:.0f} s.")
    return _write_report(out_dir, "nanmerge demo: uniform vs NAN coefficients", sections)

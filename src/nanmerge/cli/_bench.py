"""The commands that run a model or the benchmarks: `demo`, `bench`, `stats`."""

from __future__ import annotations

import typing
from pathlib import Path

import click

from nanmerge._types import MergeError
from nanmerge.cli._report import fail
from nanmerge.methods import STATISTICS  # torch-free: torch is imported where tensors are made


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--cache", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo(out: Path, cache: Path, quiet: bool) -> None:
    """The main job: both benchmark suites at demo size, a results table, report.md and plots."""
    from nanmerge.bench import run_demo

    report = run_demo(out_dir=out, cache_dir=cache, progress=not quiet)
    click.echo(f"report: {report}")


@click.command()
@click.option("--suite", type=click.Choice(["lsq", "digits"]), required=True)
@click.option("--seeds", type=int, default=3, show_default=True)
@click.option(
    "--size", type=click.Choice(["tiny", "demo", "full"]), default="full", show_default=True
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="output folder (default: results/SUITE)",
)
@click.option("--cache", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bars")
def bench(suite: str, seeds: int, size: str, out: Path | None, cache: Path, quiet: bool) -> None:
    """Run one benchmark suite: what each method does with uniform and NAN coefficients."""
    from nanmerge.bench import run_suite

    result = run_suite(
        suite,
        out_dir=out or Path("results") / suite,
        cache_dir=cache,
        seeds=seeds,
        size=size,
        progress=not quiet,
    )
    click.echo(f"report: {result['report']}")


@click.command()
@click.argument("source")
@click.option("--kind", type=click.Choice(STATISTICS), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="safetensors file")
@click.option("--quiet", is_flag=True, help="no progress bar")
def stats(source: str, kind: str, out: Path, quiet: bool) -> None:
    """Compute one model's Fisher or Gram statistics for the fisher / regmean methods.

    SOURCE is MODULE:FUNCTION or FILE.py:FUNCTION, a function of yours that returns
    (model, batches): the fine-tuned model and batches of its task's inputs (or
    (inputs, labels) pairs). Run once per model; list the files under `statistics`.
    """
    from nanmerge.learn import Kind, compute_statistics, load_source, save_statistics

    chosen = typing.cast(Kind, kind)
    try:
        model, batches = load_source(source)
        result = compute_statistics(model, batches, kind=chosen, progress=not quiet)
    except MergeError as exc:
        fail(exc)
        return
    path = save_statistics(result, out, kind=chosen)
    click.echo(f"{kind} statistics of {len(result)} tensors written to {path}")

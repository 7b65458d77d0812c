"""`nanmerge search`: a sweep or evolutionary search over merge recipes, on Ray Tune."""

from __future__ import annotations

from pathlib import Path

import click

from nanmerge._types import MergeError
from nanmerge.cli._report import fail


@click.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option(
    "--address",
    default=None,
    help="join the Ray cluster at host:port (or `auto`); default: a local Ray on this machine",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("search_out"),
    show_default=True,
    help="results, plot, best recipe(s) and Tune's state (shared storage on a cluster)",
)
@click.option("--resume", is_flag=True, help="go on with the search in --out, after a kill")
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=Path("cache"),
    show_default=True,
    help="where a bundled suite keeps its checkpoints",
)
def search(spec: Path, address: str | None, out: Path, resume: bool, cache: Path) -> None:
    """Search merge recipes: methods, parameters, coefficients, on Ray Tune (`nanmerge[ray]`)."""
    try:
        from nanmerge.learn._search import require_ray

        require_ray()
        from nanmerge.learn._search import search as run_search

        result = run_search(spec, out=out, address=address, resume=resume, cache=cache)
    except MergeError as exc:
        fail(exc)
        return
    table = result.table
    click.echo(
        f"{len(table.rows)} trial(s) in {result.seconds:.0f} s: {table.count('finished')} "
        f"finished, {table.count('failed')} failed, {table.unfinished} unfinished"
    )
    best = table.best()
    if len(table.metrics) > 1:
        click.echo(f"Pareto front over {', '.join(table.metrics)}: {len(table.front())} trial(s)")
    elif best is not None:
        recipe = best["recipe"]
        value = best["metrics"][table.primary]
        click.echo(
            f"best {table.primary} {value:.6g} (trial {best['trial']}): {recipe['method']} "
            f"{recipe.get('parameters') or ''} coefficients {recipe.get('coefficients', '-')}"
        )
    if table.count("failed"):
        click.echo(f"failed trials: their tracebacks are in {result.out / 'results.json'}")
    if not result.complete:
        click.echo(
            f"the search stopped early; go on with: nanmerge search {spec} --out {out} --resume"
        )
    for path in result.files:
        click.echo(f"wrote {path}")

"""The commands that look without merging: `inspect` a model input, list the `methods`."""

from __future__ import annotations

import inspect
import json
from typing import Any

import click

from nanmerge._types import MergeError
from nanmerge.cli._report import fail


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option(
    "--headers-only", is_flag=True, help="read headers only: no norms, no tensor is loaded"
)
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option(
    "--allow-downloads", is_flag=True, help="download a Hugging Face repo id missing from the cache"
)
def inspect_command(
    path: str, as_json: bool, headers_only: bool, quiet: bool, allow_downloads: bool
) -> None:
    """Tensor names, shapes, dtypes, L2 norms and total size of PATH (any model input)."""
    from nanmerge.io import format_inspection, inspect_checkpoint

    try:
        info = inspect_checkpoint(
            path,
            norms=not headers_only,
            allow_downloads=allow_downloads,
            progress=not (quiet or as_json or headers_only),
        )
    except MergeError as exc:
        fail(exc)
        return
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def methods(as_json: bool) -> None:
    """List the merge methods, their parameters with defaults and constraints, and references."""
    from nanmerge.methods import METHODS

    rows: dict[str, dict[str, Any]] = {
        name: {
            "parameters": spec.params,
            "constraints": spec.signature.words,
            "rule": None if spec.validate is None else inspect.getdoc(spec.validate),
            "needs_base": spec.needs_base,
            "models": [spec.min_models, spec.max_models],
            "statistics": list(spec.statistics),
            "reference": spec.reference,
        }
        for name, spec in METHODS.items()
    }
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for name, row in rows.items():
        click.echo(f"{name:<16} {row['reference']}")
        for key, default in row["parameters"].items():
            click.echo(f"    {key}={default} ({row['constraints'][key]})")
        if row["rule"]:
            click.echo(f"    and {row['rule']}")

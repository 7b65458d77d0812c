"""The commands that look without merging: `inspect` a model input, list the `methods`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
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
    "--layers", is_flag=True, help="the parsed layout: each tensor's layer and role (headers only)"
)
@click.option(
    "--allow-downloads", is_flag=True, help="download a Hugging Face repo id missing from the cache"
)
def inspect_command(
    path: str, as_json: bool, headers_only: bool, quiet: bool, layers: bool, allow_downloads: bool
) -> None:
    """Tensor names, shapes, dtypes, L2 norms and total size of PATH (any model input)."""
    from nanmerge.io import format_inspection, inspect_checkpoint

    try:
        info = inspect_checkpoint(
            path,
            norms=not (headers_only or layers),
            allow_downloads=allow_downloads,
            progress=not (quiet or as_json or headers_only or layers),
        )
    except MergeError as exc:
        fail(exc)
        return
    if layers:
        layout = _layout(info)
        click.echo(json.dumps(layout, indent=2) if as_json else _format_layout(layout))
        return
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


def _layout(info: dict[str, Any]) -> dict[str, Any]:
    """Each tensor's context as the engine reads it, with the config's layer count."""
    from nanmerge.engine._context import config_layers, tensor_contexts

    folder = info["folder"]
    configured = config_layers(None if folder is None else Path(folder))
    contexts = tensor_contexts([t["name"] for t in info["tensors"]], configured_layers=configured)
    return {
        "source": info["source"],
        "config_layers": configured,
        "tensors": {
            name: {"layer": c.layer, "num_layers": c.num_layers, "role": c.role}
            for name, c in contexts.items()
        },
    }


def _format_layout(layout: dict[str, Any]) -> str:
    """Per layer: its tensors by role; then the tensors outside the blocks."""
    by_layer: dict[tuple[int, int], list[str]] = {}
    outside: list[str] = []
    for name, c in layout["tensors"].items():
        if c["layer"] is None:
            outside.append(f"{name} ({c['role']})")
        else:
            by_layer.setdefault((c["num_layers"], c["layer"]), []).append(c["role"])
    stacks = sorted({size for size, _ in by_layer})
    lines = [
        f"{layout['source']}: {len(by_layer)} blocks in {len(stacks)} stack(s) of "
        f"{', '.join(map(str, stacks)) or 'no'} layers"
        + (f"; config.json says {layout['config_layers']}" if layout["config_layers"] else "")
    ]
    for (size, layer), roles in sorted(by_layer.items()):
        counts = ", ".join(f"{r} {roles.count(r)}" for r in sorted(set(roles)))
        lines.append(f"  layer {layer} of {size}: {len(roles)} tensors ({counts})")
    lines.append(f"outside the blocks ({len(outside)}): " + (", ".join(outside) or "none"))
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def methods(as_json: bool) -> None:
    """List the merge methods, their parameters with defaults and constraints, and references."""
    from nanmerge.methods import METHODS

    rows: dict[str, dict[str, Any]] = {
        name: {
            "parameters": spec.params,
            "required": [k for k in spec.signature.words if k not in spec.params],
            "constraints": spec.signature.words,
            "per_model": list(spec.per_model),
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
        for key in row["required"]:
            click.echo(f"    {key} (required; {row['constraints'][key]})")
        for key, default in row["parameters"].items():
            each = "; or one per model" if key in row["per_model"] else ""
            click.echo(f"    {key}={default} ({row['constraints'][key]}{each})")
        if row["rule"]:
            rule = " ".join(row["rule"].split())  # the docstring's lines as one
            click.echo(f"    and {rule}")

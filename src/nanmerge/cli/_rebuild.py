"""`rebuild`: write one task's model from a merge that kept per-task masks."""

from __future__ import annotations

from pathlib import Path

import click

from nanmerge._types import MergeError
from nanmerge.cli._report import fail


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@click.command("rebuild")
@click.argument("merged_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--task", type=int, required=True, help="0-based index of the model to rebuild")
@click.option("--base", default=None, help="the base model (default: the merge report's)")
@click.option("--overwrite", is_flag=True, help="replace an earlier nanmerge output")
@click.option(
    "--allow-downloads", is_flag=True, help="download a Hugging Face base missing from the cache"
)
def rebuild(
    merged_dir: Path,
    output_dir: Path,
    task: int,
    base: str | None,
    overwrite: bool,
    allow_downloads: bool,
) -> None:
    """Rebuild model TASK of a consensus (export_masks) or emr merge in MERGED_DIR."""
    from nanmerge.engine._rebuild import rebuild as run_rebuild

    try:
        info = run_rebuild(
            merged_dir,
            task,
            output_dir,
            base=base,
            overwrite=overwrite,
            allow_downloads=allow_downloads,
        )
    except MergeError as exc:
        fail(exc)
        return
    storage = info["storage"]
    whole = ", ".join(f"{k} {v:.6g}" for k, v in info["whole_model"].items())
    scaled = f" ({whole})" if whole else ""
    click.echo(f"rebuilt task {task} ({info['model']}) with {info['method']}{scaled}: {output_dir}")
    every = storage["fine_tuned_models_bytes"]
    click.echo(
        f"storage: masks and extras {_mib(storage['kept_bytes'])} + merged model "
        f"{_mib(storage['merged_model_bytes'])}, against {_mib(every)} for every fine-tuned "
        f"model ({(storage['kept_bytes'] + storage['merged_model_bytes']) / every:.1%})"
    )

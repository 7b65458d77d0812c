"""The commands that merge or estimate: `run` (a YAML recipe), `merge` (flags), `coefficients`."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import click

from nanmerge._types import MergeError
from nanmerge._yaml import yaml_value
from nanmerge.cli._mergekit import flag_updates, load_chain, mergekit_options
from nanmerge.cli._report import coefficient_table, fail, plan_details, print_summary
from nanmerge.config import Recipe, load_recipe

# Recipe fields whose flags are spelt by hand: lists and mappings need a KEY=VALUE syntax;
# `notes` are a translation's remarks, not something to give on the command line.
_COMPOUND = {"models", "parameters", "coefficients", "lines", "notes"}


def _key_values(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """Parse KEY=VALUE flags; values are YAML scalars so `density=0.2` gives a float."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MergeError(f"{flag} expects KEY=VALUE, got '{pair}'")
        out[key] = yaml_value(value)
    return out


def _field_option(name: str) -> click.Option:
    """A click option generated from one Recipe field, so CLI and YAML cannot drift."""
    info = Recipe.model_fields[name]
    flag = "--" + name.replace("_", "-")
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = args[0]
    help_text = info.description or ""
    if kind is bool:
        return click.Option([flag], is_flag=True, default=None, help=help_text)
    if typing.get_origin(kind) is typing.Literal:
        return click.Option([flag], type=click.Choice(typing.get_args(kind)), help=help_text)
    if typing.get_origin(kind) is list:
        return click.Option([flag], multiple=True, help=f"{help_text} (repeat)")
    click_type: Any = {int: int, Path: click.Path(path_type=Path)}.get(kind, str)
    return click.Option([flag], type=click_type, default=None, help=help_text)


def _recipe_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in flags.items() if k in Recipe.model_fields and v not in (None, ())}
    data["models"] = list(flags["model"])
    if flags["coefficient"]:
        if len(flags["coefficient"]) != len(flags["model"]):
            raise MergeError(
                f"--coefficient given {len(flags['coefficient'])} times for "
                f"{len(flags['model'])} --model flags; give one per model, in order"
            )
        data["models"] = [
            {"path": m, "coefficient": c}
            for m, c in zip(flags["model"], flags["coefficient"], strict=True)
        ]
    data["parameters"] = _key_values(flags["param"], "--param")
    if flags["lines"]:
        data["lines"] = _key_values(flags["lines"], "--lines")
    estimator = {} if flags["coefficients"] is None else {"estimator": flags["coefficients"]}
    data["coefficients"] = {
        **estimator,
        **_key_values(flags["coefficients_option"], "--coefficients-option"),
    }
    return data


def _run_merge(recipes: list[Recipe], quiet: bool, verbose: bool = False) -> None:
    """Merge each recipe in turn (several: a mergekit-mega chain). Every recipe is checked
    before the first merge; a failure stops the chain and leaves the outputs before it."""
    if quiet and verbose:
        fail(MergeError("--quiet and --verbose contradict each other; pass one"))
    if any(r.output is None for r in recipes):
        fail(MergeError("the recipe has no `output`; set one or pass --output"))
    import nanmerge.engine as engine  # its torch-free part: `merge` loads torch on first use

    try:
        for recipe in recipes:  # a misspelt method or parameter, answered before torch
            engine.check_recipe(recipe)
    except MergeError as exc:
        fail(exc)
    for i, recipe in enumerate(recipes):
        if not quiet:
            if len(recipes) > 1:
                click.echo(f"merge {i + 1} of {len(recipes)}: {recipe.output}")
            for note in recipe.notes:
                click.echo(f"note: {note}")
        try:
            result = engine.merge(recipe, progress=not quiet)
        except MergeError as exc:
            done = f"; merges 1-{i} are complete" if i else ""
            where = f"merge {i + 1} of {len(recipes)} ({recipe.output}){done}: "
            fail(MergeError(f"{where}{exc}") if len(recipes) > 1 else exc)
            return
        if not quiet:
            print_summary(result)
        if verbose:
            click.echo(plan_details(result))


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("out_path", required=False, type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="override the recipe's output")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--quiet", is_flag=True, help="no progress bars or summary")
@click.option("--verbose", is_flag=True, help="also print the plan and per-tensor coefficients")
@click.option(
    "--allow-downloads", is_flag=True, help="download Hugging Face repo ids missing from the cache"
)
@mergekit_options
def run(
    recipe: Path,
    out_path: Path | None,
    output: Path | None,
    overwrite: bool,
    quiet: bool,
    verbose: bool,
    allow_downloads: bool,
    ray: bool | None,
    address: str | None,
    **mergekit_flags: Any,
) -> None:
    """Merge as RECIPE (a YAML file) says, into OUT_PATH when given (as mergekit-yaml's
    positional output). A file of several YAML documents (mergekit-mega) runs each in turn."""
    try:
        updates, notes = flag_updates(mergekit_flags)
        if out_path is not None and output is not None and out_path != output:
            raise MergeError(f"two outputs given, {out_path} and --output {output}; give one")
        if overwrite:
            updates["overwrite"] = True
        if allow_downloads:
            updates["allow_downloads"] = True
        updates |= {k: v for k, v in (("ray", ray), ("address", address)) if v is not None}
        if (out_path or output) is not None:
            updates["output"] = out_path or output
        recipes = load_chain(recipe, updates, notes)
        if len(recipes) > 1 and "output" in updates:
            raise MergeError(
                f"{recipe} holds {len(recipes)} recipes, each with its own out_path; drop the "
                "output argument"
            )
    except MergeError as exc:
        fail(exc)
        return
    _run_merge(recipes, quiet, verbose)


run.params += [_field_option("ray"), _field_option("address")]  # as `merge` and YAML spell them


def _merge_command() -> click.Command:
    params: list[click.Parameter] = [
        _field_option(name) for name in Recipe.model_fields if name not in _COMPOUND
    ]
    params += [
        click.Option(["--model"], multiple=True, required=True, help="a fine-tuned model (repeat)"),
        click.Option(
            ["--coefficient"],
            type=float,
            multiple=True,
            help="per-model weight for --coefficients manual (repeat, in order)",
        ),
        click.Option(["--param"], multiple=True, help="method parameter KEY=VALUE (repeat)"),
        click.Option(
            ["--lines"], multiple=True, help="LiNeS option KEY=VALUE: beta=..., alpha=... (repeat)"
        ),
        click.Option(
            ["--coefficients"],
            default=None,
            help="coefficient estimator, e.g. nan or manual (default: uniform weights)",
        ),
        click.Option(
            ["--coefficients-option"],
            multiple=True,
            help="estimator option KEY=VALUE, e.g. norm_of=task_vector (repeat)",
        ),
        click.Option(["--quiet"], is_flag=True, help="no progress bars or summary"),
        click.Option(
            ["--verbose"], is_flag=True, help="also print the plan and per-tensor coefficients"
        ),
    ]

    def callback(**flags: Any) -> None:
        try:
            r = load_recipe(_recipe_from_flags(flags))
        except MergeError as exc:
            fail(exc)
            return
        _run_merge([r], flags["quiet"], flags["verbose"])

    return click.Command(
        "merge",
        params=params,
        callback=callback,
        help="Merge with the recipe given as flags (same fields as YAML).",
    )


merge = _merge_command()


def _data_sizes(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MergeError(
            f"--data-sizes expects comma-separated numbers, one per model; got '{text}'"
        ) from None


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print JSON (reusable with from_file)")
@click.option("--diagnose", is_flag=True, help="judge whether NAN's premise looks plausible")
@click.option("--data-sizes", help="training-set size per model, comma-separated (--diagnose)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def coefficients(
    recipe: Path, as_json: bool, diagnose: bool, data_sizes: str | None, quiet: bool
) -> None:
    """Estimate and print RECIPE's coefficients and per-model norms, without merging."""
    from nanmerge.coefficients import diagnose as run_diagnosis
    from nanmerge.engine import estimate_coefficients

    try:
        sizes = _data_sizes(data_sizes)
        coefs = estimate_coefficients(recipe, progress=not quiet and not as_json)
        diagnosis = run_diagnosis(coefs, sizes) if diagnose or sizes is not None else None
    except MergeError as exc:
        fail(exc)
        return
    if as_json:
        data = coefs.to_json()
        if diagnosis is not None:
            data["diagnosis"] = diagnosis
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(coefficient_table(coefs))
    if diagnosis is not None:
        click.echo("diagnosis:")
        click.echo("\n".join(f"  - {line}" for line in diagnosis["verdict"]))

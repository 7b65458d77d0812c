"""Command line: parse arguments, load a recipe, call the engine, print the report."""

from __future__ import annotations

import ctypes
import json
import sys
import typing
from pathlib import Path
from typing import Any

import click
import yaml

from nanmerge._types import Coefficients, MergeError
from nanmerge.config import Recipe, load_recipe

# The engine, io and methods (and with them torch) are imported inside the commands that use
# them, so --help, `methods`, `inspect --headers-only` and recipe errors answer at once.

# Recipe fields whose flags are spelt by hand: lists and mappings need a KEY=VALUE syntax.
_COMPOUND = {"models", "parameters", "coefficients"}


def _fail(exc: MergeError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _key_values(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """Parse KEY=VALUE flags; values are YAML scalars so `density=0.2` gives a float."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MergeError(f"{flag} expects KEY=VALUE, got '{pair}'")
        out[key] = yaml.safe_load(value)
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
    data["coefficients"] = {
        "estimator": flags["coefficients"],
        **_key_values(flags["coefficients_option"], "--coefficients-option"),
    }
    return data


def _print_summary(report: dict[str, Any]) -> None:
    click.echo(_coefficient_table(Coefficients.from_json(report["coefficients"])))
    mem = report["memory"]
    click.echo(
        f"merged {report['tensors']['merged']} tensors "
        f"({report['tensors']['copied_from_reference']} copied) with "
        f"{report['method']['name']} in {sum(report['timings_s'].values()):.1f} s; "
        f"memory bound {mem['bound_bytes'] / 2**20:.1f} MiB; output {report['output']['path']}"
    )
    for note in report["output"].get("notes", []):
        click.echo(f"note: {note}")
    lora = report["output"].get("lora")
    if lora is not None:
        click.echo(
            f"LoRA adapter of rank {lora['rank']}: {len(lora['tensors'])} matrices, largest "
            f"relative error {lora['max_relative_error']:.2e}; {len(lora['stored_full'])} "
            "tensors stored in full"
        )
        for note in lora["notes"]:
            click.echo(f"note: {note}")


def _coefficient_table(coefs: Coefficients) -> str:
    lines = [f"coefficients: {coefs.estimator} {json.dumps(coefs.params)}"]
    header = f"  {'model':<40} {'||theta||':>12} {'||tau||':>12} {'coefficient':>12}"
    lines.append(header)
    theta = coefs.norms.get("finetuned", ())
    tau = coefs.norms.get("task_vector", ())
    for i, model in enumerate(coefs.models):
        c = "layer-wise" if coefs.per_model is None else f"{coefs.per_model[i]:.6f}"
        t = f"{theta[i]:.4f}" if i < len(theta) else "-"
        v = f"{tau[i]:.4f}" if i < len(tau) else "-"
        lines.append(f"  {model[-40:]:<40} {t:>12} {v:>12} {c:>12}")
    if coefs.per_tensor:
        lines.append(f"  ({len(coefs.per_tensor)} per-tensor coefficient vectors in the report)")
    lines += [f"warning: {w}" for w in coefs.warnings]
    return "\n".join(lines)


@click.group()
@click.version_option(package_name="nanmerge")
def main() -> None:
    """nanmerge: merge fine-tuned models with norm-aware (NAN) coefficients."""
    _keep_freed_memory()


def _plan_details(report: dict[str, Any]) -> str:
    """--verbose: the plan's counts and memory bound, and layer-wise coefficients per tensor."""
    tensors, mem = report["tensors"], report["memory"]
    lines = [
        f"plan: {tensors['total']} tensors: {tensors['merged']} merged, "
        f"{tensors['copied_from_reference']} copied from the reference, "
        f"{len(tensors['filled_from_base'])} filled from the base",
        f"memory bound: {mem['bound_bytes'] / 2**20:.1f} MiB ({mem['bound_bytes']:,} bytes) = "
        f"{mem['formula']}; largest tensor '{mem['largest_tensor']}' "
        f"({mem['largest_tensor_float32_bytes']:,} bytes), M = {mem['models']}, "
        f"threads = {mem['threads']}; peak RSS {mem['peak_rss_bytes'] / 2**20:.1f} MiB",
    ]
    per_tensor = report["coefficients"]["per_tensor"]
    if per_tensor:
        width = max(len(name) for name in per_tensor)
        models = report["coefficients"]["models"]
        lines.append("coefficients per tensor (one column per model, in order):")
        lines += [f"  model {i}: {m}" for i, m in enumerate(models)]
        lines += [
            f"  {name:<{width}}  " + "  ".join(f"{c:10.6f}" for c in values)
            for name, values in per_tensor.items()
        ]
    return "\n".join(lines)


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse rather than hand it back to the kernel.

    A merge frees and allocates tensor-sized buffers all the time; by default glibc returns
    large ones to the kernel, and each reuse then faults in fresh zeroed pages (on the
    `small` benchmark model: 390K page faults and 2.8 s of system time per merge, against
    144K and 1.2 s with this; peak RSS unchanged). Only the CLI does this, since it owns
    its process; a library call leaves the caller's allocator alone. No-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: heap, not mmap, up to glibc's 32 MiB maximum


def _run_merge(recipe: Recipe, quiet: bool, verbose: bool = False) -> None:
    if quiet and verbose:
        _fail(MergeError("--quiet and --verbose contradict each other; pass one"))
    if recipe.output is None:
        _fail(MergeError("the recipe has no `output`; set one or pass --output"))
    import nanmerge.engine as engine  # its torch-free part: `merge` loads torch on first use

    try:
        engine.check_recipe(recipe)  # a misspelt method or parameter, answered before torch
        result = engine.merge(recipe, progress=not quiet)
    except MergeError as exc:
        _fail(exc)
        return
    if not quiet:
        _print_summary(result)
    if verbose:
        click.echo(_plan_details(result))


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="override the recipe's output")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--quiet", is_flag=True, help="no progress bars or summary")
@click.option("--verbose", is_flag=True, help="also print the plan and per-tensor coefficients")
@click.option(
    "--allow-downloads", is_flag=True, help="download Hugging Face repo ids missing from the cache"
)
def run(
    recipe: Path,
    output: Path | None,
    overwrite: bool,
    quiet: bool,
    verbose: bool,
    allow_downloads: bool,
) -> None:
    """Merge as RECIPE (a YAML file) says."""
    try:
        r = load_recipe(recipe)
        updates = {"overwrite": True} if overwrite else {}
        if allow_downloads:
            updates["allow_downloads"] = True
        if output is not None:
            updates["output"] = output  # type: ignore[assignment]
        r = load_recipe({**r.model_dump(), **updates})
    except MergeError as exc:
        _fail(exc)
        return
    _run_merge(r, quiet, verbose)


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
            ["--coefficients"],
            default="uniform",
            show_default=True,
            help="estimator: uniform | manual | nan | from_file",
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
            _fail(exc)
            return
        _run_merge(r, flags["quiet"], flags["verbose"])

    return click.Command(
        "merge",
        params=params,
        callback=callback,
        help="Merge with the recipe given as flags (same fields as YAML).",
    )


main.add_command(_merge_command())


def _data_sizes(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MergeError(
            f"--data-sizes expects comma-separated numbers, one per model; got '{text}'"
        ) from None


@main.command()
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
        _fail(exc)
        return
    if as_json:
        data = coefs.to_json()
        if diagnosis is not None:
            data["diagnosis"] = diagnosis
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(_coefficient_table(coefs))
    if diagnosis is not None:
        click.echo("diagnosis:")
        click.echo("\n".join(f"  - {line}" for line in diagnosis["verdict"]))


@main.command("inspect")
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
        _fail(exc)
        return
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def methods(as_json: bool) -> None:
    """List the merge methods, their parameters with defaults, and references."""
    from nanmerge.methods import METHODS

    rows: dict[str, dict[str, Any]] = {
        name: {
            "parameters": spec.params,
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
        params = ", ".join(f"{k}={v}" for k, v in row["parameters"].items()) or "-"
        click.echo(f"{name:<16} {params:<44} {row['reference']}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--cache", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo(out: Path, cache: Path, quiet: bool) -> None:
    """The main job: both benchmark suites at demo size, a results table, report.md and plots."""
    from nanmerge.bench import run_demo

    report = run_demo(out_dir=out, cache_dir=cache, progress=not quiet)
    click.echo(f"report: {report}")


@main.command()
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


@main.command()
@click.argument("source")
@click.option("--kind", type=click.Choice(["fisher", "gram"]), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="safetensors file")
@click.option("--quiet", is_flag=True, help="no progress bar")
def stats(source: str, kind: str, out: Path, quiet: bool) -> None:
    """Compute one model's Fisher or Gram statistics for the fisher / regmean methods.

    SOURCE is MODULE:FUNCTION or FILE.py:FUNCTION, a function of yours that returns
    (model, batches): the fine-tuned model and batches of its task's inputs (or
    (inputs, labels) pairs). Run once per model; list the files under `statistics`.
    """
    from nanmerge.statistics import Kind, compute_statistics, load_source, save_statistics

    chosen = typing.cast(Kind, kind)
    try:
        model, batches = load_source(source)
        result = compute_statistics(model, batches, kind=chosen, progress=not quiet)
    except MergeError as exc:
        _fail(exc)
        return
    path = save_statistics(result, out, kind=chosen)
    click.echo(f"{kind} statistics of {len(result)} tensors written to {path}")

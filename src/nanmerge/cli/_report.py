"""How the CLI words its results and failures: summary, coefficient table, plan details."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from nanmerge._types import Coefficients, MergeError


def fail(exc: MergeError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def print_summary(report: dict[str, Any]) -> None:
    click.echo(coefficient_table(Coefficients.from_json(report["coefficients"])))
    mem = report["memory"]
    click.echo(
        f"merged {report['tensors']['merged']} tensors "
        f"({report['tensors']['copied_from_reference']} copied) with "
        f"{report['method']['name']} in {sum(report['timings_s'].values()):.1f} s; "
        f"memory bound {mem['bound_bytes'] / 2**20:.1f} MiB; output {report['output']['path']}"
    )
    if "ray" in report:
        click.echo(
            f"on Ray ({report['ray']['address']}): one task per shard, {report['ray']['tasks']}"
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


def coefficient_table(coefs: Coefficients) -> str:
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


def plan_details(report: dict[str, Any]) -> str:
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

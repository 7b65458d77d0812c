"""The two entry points: estimate coefficients, and merge (to a folder or to a state dict)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import yaml

from nanmerge._types import Coefficients, TensorNorms
from nanmerge._version import __version__
from nanmerge.coefficients import cancellation_warning, identical_models, model_norms
from nanmerge.config import Recipe, load_recipe
from nanmerge.engine._chat_template import chat_template_files
from nanmerge.engine._copied import copied_tensor_warning
from nanmerge.engine._inputs import same_file_pairs
from nanmerge.engine._layered import with_multipliers
from nanmerge.engine._lines import lines_overrides
from nanmerge.engine._memory import memory_bound
from nanmerge.engine._plan import Plan, plan
from nanmerge.engine._ray import merge_on_ray, ray_session
from nanmerge.engine._recipe import check_ray
from nanmerge.engine._record import KeptFiles, Recorder, discarded_warning
from nanmerge.engine._slices import layer_count_config
from nanmerge.engine._stream import Collected, collect_pass, merge_stream
from nanmerge.io import (
    NON_WEIGHT_FILES,
    TOKENIZER_FILES,
    LoraWriter,
    ModelWriter,
    parse_repo_id,
    parse_size,
)

RecipeLike = Recipe | Mapping[str, Any] | str | os.PathLike[str]
_MAX_WARNINGS = 12


def _finish(p: Plan, coefficients: Coefficients, norms: Mapping[str, TensorNorms]) -> Coefficients:
    """Attach the per-model norms every report shows, the plan's warnings (inputs first, so
    condensing never drops them) and those about the numbers; condense repeated warnings."""
    coefficients.norms = model_norms(norms.values())
    checks = [copied_tensor_warning(p)]
    if coefficients.per_tensor and p.estimator.summary is not None:
        checks.append(p.estimator.summary(coefficients))
    if p.divides_by_coefficient_sum:
        checks.append(cancellation_warning(coefficients))
    flagged = same_file_pairs(p.recipe, p.models)
    checks += [
        f"models[{i}] ({p.model_names[i]}) and models[{j}] ({p.model_names[j]}) have the same "
        "norm in every tensor: probably the same weights under two names, merged twice with "
        "twice the weight; list the model once (with coefficients: manual to weight it)"
        for i, j in identical_models(norms)
        if (i, j) not in flagged
    ]
    found = [w for w in checks if w]
    coefficients.warnings = [*p.warnings, *coefficients.warnings, *found]
    unique = list(dict.fromkeys(coefficients.warnings))
    if len(unique) > _MAX_WARNINGS:
        unique = [*unique[:_MAX_WARNINGS], f"... and {len(unique) - _MAX_WARNINGS} more warnings"]
    coefficients.warnings = unique
    return coefficients


def _initial_coefficients(p: Plan, *, progress: bool) -> tuple[Coefficients, Collected]:
    """Coefficients known before the merge, after the one pass that gathers what the
    estimator (model-level statistics) and the method (its `collect`) need, if either does."""
    needs = p.estimator.needs(p.estimator_options)
    collected = Collected({})
    if needs == "model" or p.method.collect_for(p.params) is not None:
        collected = collect_pass(p, progress=progress)
    if needs == "tensor":
        coefficients = Coefficients(p.model_names, p.estimator.name)
        probe = p.estimator.fn({}, p.model_names, **p.estimator_options)
        coefficients.params = probe.params
    else:
        norms = collected.norms if needs == "model" else {}
        coefficients = p.estimator.fn(norms, p.model_names, **p.estimator_options)
    return with_multipliers(coefficients, p.layered), collected


def estimate_coefficients(recipe: RecipeLike, *, progress: bool = False) -> Coefficients:
    """Read every input once and return the recipe's coefficients with per-model norms.

    Layer-wise estimators return one entry per floating tensor; nothing is merged or written.
    """
    p = plan(load_recipe(recipe), for_output=False)
    try:
        norms = collect_pass(p, progress=progress).norms
        coefficients = p.estimator.fn(norms, p.model_names, **p.estimator_options)
        return _finish(p, with_multipliers(coefficients, p.layered), norms)
    finally:
        p.close()


def _versions() -> dict[str, str]:
    import safetensors

    return {
        "nanmerge": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _report(
    p: Plan, coefficients: Coefficients, timings: dict[str, float], extra: dict[str, Any]
) -> dict[str, Any]:
    recipe = p.recipe.model_dump(mode="json", exclude={"ray", "address"})  # how, not what
    recipe["base"] = None if p.base is None else p.base.source
    for entry, name in zip(recipe["models"], p.model_names, strict=True):
        entry["path"] = name
    return {
        "nanmerge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe,
        "inputs": {"base": recipe["base"], "models": list(p.model_names)},
        "method": {
            "name": p.method.name,
            "parameters": p.params,
            "per_tensor": p.layered.params,  # only the parameters that vary
            "reference": p.method.reference,
        },
        "statistics": None if p.statistics is None else p.statistics.summary(),
        "coefficients": coefficients.to_json(),
        "tensors": {
            "total": len(p.entries),
            "merged": len(p.merged),
            "copied_from_reference": len(p.entries) - len(p.merged),
            "filled_from_base": sorted(p.fill_from_base),
        },
        "memory": {
            **memory_bound(p),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        "timings_s": timings,
        "warnings": coefficients.warnings,
        "versions": _versions(),
        **extra,
    }


def _model_card(report: dict[str, Any]) -> str:
    lora = report["recipe"].get("output_format") == "lora"
    front = {"library_name": "peft" if lora else "transformers", "tags": ["merge", "nanmerge"]}
    base = report["inputs"]["base"]
    if base:
        # The Hub's base_model must be a repo id (no revision); a local base is named below.
        repo = None if Path(base).exists() else parse_repo_id(base)
        if repo is not None:
            front["base_model"] = repo.repo_id
    coefs = report["coefficients"]
    rows = "\n".join(
        f"| {name} | {'layer-wise' if coefs['coefficients'] is None else f'{c:.4f}'} |"
        for name, c in zip(
            coefs["models"], coefs["coefficients"] or [None] * len(coefs["models"]), strict=True
        )
    )
    recipe = yaml.safe_dump(report["recipe"], sort_keys=False)
    over = f", over the base model `{base}`" if base else ""
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# Merged model\n\nMerged with nanmerge {__version__} using "
        f"`{report['method']['name']}` ({report['method']['reference']}) and "
        f"`{coefs['estimator']}` coefficients{over}.\n\n"
        f"| model | coefficient |\n|---|---|\n{rows}\n\n"
        f"## Recipe\n\n```yaml\n{recipe}```\n\nFull details: `merge_report.json`.\n"
    )


@contextmanager
def _signals_end_like_ctrl_c() -> Iterator[None]:
    """While a merge writes, SIGTERM and SIGHUP raise in the main thread as Ctrl-C does, so
    the writer's `with` block removes its temporary folder on the way out.

    Only handlers still at their defaults are replaced, and only in the main thread (where
    Python runs handlers): a caller's own handlers are left alone. The exit status is the
    usual 128 + signal number.
    """
    replaced: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                replaced[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in replaced.items():
            signal.signal(sig, previous)


def merge(
    recipe: RecipeLike, *, progress: bool = False
) -> dict[str, Any] | dict[str, torch.Tensor]:
    """Merge as the recipe says. Returns the report, or a state dict when it has no output.

    Every input is checked before any work; a failure leaves no output folder behind.
    """
    r = load_recipe(recipe)
    check_ray(r)
    p = plan(r)
    session = ExitStack()
    try:
        session.enter_context(ray_session(r))  # joined after the plan, before any work
        start = time.perf_counter()
        coefficients, collected = _initial_coefficients(p, progress=progress)
        timings = {"collect_pass": time.perf_counter() - start}
        if r.lines is not None:
            start = time.perf_counter()
            collected.overrides, collected.lines = lines_overrides(
                p, r.lines, coefficients, progress=progress, collected=collected.method
            )
            timings["lines_pass"] = time.perf_counter() - start
        if r.output is None:
            state: dict[str, torch.Tensor] = {}
            recorder = Recorder(None)  # no report and no folder: notes and kept are dropped
            merge_stream(
                p,
                coefficients,
                state.__setitem__,
                progress=progress,
                collected=collected.method,
                overrides=collected.overrides,
                recorder=recorder,
            )
            discarded_warning(recorder)
            return state
        with _signals_end_like_ctrl_c():
            return _write(p, coefficients, timings, collected, progress=progress)
    finally:
        session.close()
        p.close()


def _write(
    p: Plan,
    coefficients: Coefficients,
    timings: dict[str, float],
    collected: Collected,
    *,
    progress: bool,
) -> dict[str, Any]:
    """Merge into a temporary folder and move it into place; the report says what was done."""
    r = p.recipe
    assert r.output is not None
    inputs = [getattr(c, "folder", None) for c in [p.base, *p.models] if c is not None]
    template = (
        {}
        if r.chat_template is None
        else chat_template_files(
            r.chat_template, p.copy_files_from if p.vocab is None else p.vocab.folder, inputs
        )
    )
    metadata = {"merged_with": f"nanmerge {__version__}", "method": p.method.name}
    writer = (
        ModelWriter(
            r.output,
            p.entries,
            max_shard_size=parse_size(r.max_shard_size),
            overwrite=r.overwrite,
            metadata=metadata,
            inputs=p.protected,
        )
        if r.output_format == "full"
        else LoraWriter(  # the recipe check guarantees a base and a rank
            r.output,
            p.entries,
            rank=r.rank or 0,
            base=p.layout_input,
            base_model_name_or_path=p.layout_input.source,
            overwrite=r.overwrite,
            metadata=metadata,
            inputs=p.protected,
        )
    )
    shard_size = parse_size(r.max_shard_size)
    with writer, KeptFiles(writer.temp_dir, max_shard_size=shard_size, metadata=metadata) as kept:
        start = time.perf_counter()
        recorder = Recorder(kept.write)
        extra: dict[str, Any] = {"collect_pass": collected.ran, "lines": collected.lines}
        if p.vocab is not None:
            extra["tokenizer"] = p.vocab.summary
        if r.ray:  # the same shards, each merged and written by a Ray task
            parts = writer.parts()
            norms, recorder.notes = merge_on_ray(
                p, coefficients, collected, parts, progress=progress
            )
            writer.adopt()
            extra["ray"] = {"address": r.address or "local", "tasks": len(parts)}
        else:
            norms = merge_stream(
                p,
                coefficients,
                writer.write,
                progress=progress,
                collected=collected.method,
                overrides=collected.overrides,
                recorder=recorder,
            )
        timings["merge"] = time.perf_counter() - start
        _finish(p, coefficients, norms)
        report = _report(p, coefficients, timings, extra)
        report["method_notes"] = recorder.notes
        report["output"] = {
            "path": str(r.output),
            "weight_files": list(writer.shard_names),
            "notes": writer.notes,
            "kept": kept.finish(
                models=len(p.models), model_bytes=sum(m.nbytes for _, m in p.entries)
            ),
        }
        if isinstance(writer, LoraWriter):
            report["output"]["lora"] = writer.summary()
        if p.copy_files_from is not None:
            own = () if p.vocab is None else TOKENIZER_FILES  # from the vocabulary's folder
            writer.copy_files(p.copy_files_from, [n for n in NON_WEIGHT_FILES if n not in own])
            config = p.num_layers and layer_count_config(p.copy_files_from, p.source_layers)
            if config:
                writer.add_file("config.json", config)
        if p.vocab is not None:
            writer.copy_files(p.vocab.folder, TOKENIZER_FILES)
            for name, text in p.vocab.files.items():  # union tokenizer.json, config vocab_size
                writer.add_file(name, text)
        for name, text in template.items():
            writer.add_file(name, text)
        writer.add_file("merge_report.json", json.dumps(report, indent=2))
        writer.add_file("README.md", _model_card(report))
        writer.finalize()
    return report

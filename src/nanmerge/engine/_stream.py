"""Stream: one pass over tensor names; load M (+ base) tensors, merge in float32, write, free.

With `threads` > 0 the three stages overlap: loader threads read and convert the next
tensors while the main thread merges the current one and a writer thread writes the
previous one (torch and file I/O release the GIL). Output order never changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Generator, Iterable, Mapping
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from nanmerge._types import (
    Checkpoint,
    Coefficients,
    Collect,
    MergeError,
    TensorContext,
    TensorNorms,
)
from nanmerge.coefficients import tensor_norms
from nanmerge.coefficients._norms import NORM_BLOCK
from nanmerge.engine._plan import Plan
from nanmerge.engine._record import Recorder, TensorRecord
from nanmerge.engine._threads import BackgroundSink, ReadBuffers, prefetch, to_cpu
from nanmerge.io import CheckpointReader
from nanmerge.methods import tensor_generator
from nanmerge.methods._sparsify import DRAW

# Elementwise methods (the registry says which) are merged in chunks of CHUNK entries per
# model: every pass then runs on cache-sized, reused buffers instead of fresh tensor-sized
# ones, and no float32 copy of the whole tensor is made. A multiple of DRAW and of the norms'
# block, so that random masks and norms do not depend on where chunks begin.
CHUNK = 1 << 19
assert CHUNK % DRAW == 0 and CHUNK % NORM_BLOCK == 0


@dataclass
class Loaded:
    """One tensor across the inputs, as read (source dtype, on the recipe's device).

    `models` has one tensor per model (the base's where a model lacks it); `raw` is a
    non-floating tensor copied from the layout input unchanged.
    """

    name: str
    models: list[torch.Tensor] | None
    base: torch.Tensor | None
    raw: torch.Tensor | None


def _check_finite(tensor: torch.Tensor, name: str, source: str) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise MergeError(
            f"tensor '{name}' in {source} contains NaN or Inf ({bad} of {tensor.numel()} "
            "entries); that checkpoint is damaged or diverged: fix or re-export it"
        )


def _chunks(
    item: Loaded,
) -> Generator[tuple[int, torch.Tensor, torch.Tensor | None], None, None]:
    """The offset, float32 (M, c) stack and (c,) base of successive chunks of the flattened
    tensor.

    The two buffers are reused from chunk to chunk; on a GPU the whole tensor is one chunk.
    """
    assert item.models is not None
    flat = [t.reshape(-1) for t in item.models]
    base = None if item.base is None else item.base.reshape(-1)
    numel, device = flat[0].numel(), flat[0].device
    step = CHUNK if device.type == "cpu" else max(numel, 1)
    stack = torch.empty((len(flat), min(step, numel)), dtype=torch.float32, device=device)
    base_buffer = None if base is None else torch.empty_like(stack[0])
    for begin in range(0, max(numel, 1), step):
        end = min(begin + step, numel)
        part = stack[:, : end - begin]
        for row, tensor in zip(part, flat, strict=True):
            row.copy_(tensor[begin:end])
        base_part = None
        if base is not None and base_buffer is not None:
            base_part = base_buffer[: end - begin].copy_(base[begin:end])
        yield begin, part, base_part


def checked_norms(
    plan: Plan, item: Loaded, parts: Iterable[TensorNorms] | None = None
) -> TensorNorms:
    """The tensor's norms, which double as the finiteness check of every input.

    Summed over chunks: `parts` collected by a merge on the way, or computed here chunk by
    chunk (the same way, so both give the same numbers). A sum of squares is finite exactly
    when every entry is (norms are scaled against overflow), so the inputs are scanned entry
    by entry only when a sum is not finite, to name the damaged one.
    """
    assert item.models is not None  # floating tensors always carry their models
    if parts is None:
        parts = (tensor_norms(stack, base) for _, stack, base in _chunks(item))
    finetuned = [0.0] * len(item.models)
    task_vector = None if item.base is None else [0.0] * len(item.models)
    for part in parts:
        finetuned = [a + b for a, b in zip(finetuned, part.sumsq_finetuned, strict=True)]
        if task_vector is not None and part.sumsq_task_vector is not None:
            task_vector = [a + b for a, b in zip(task_vector, part.sumsq_task_vector, strict=True)]
    st = TensorNorms(
        item.models[0].numel(),
        tuple(finetuned),
        None if task_vector is None else tuple(task_vector),
    )
    if not all(math.isfinite(s) for s in finetuned + (task_vector or [])):
        if plan.base is not None and item.base is not None:
            _check_finite(item.base.float(), item.name, plan.base.source)
        for (model, _), tensor in zip(plan.sources_of(item.name), item.models, strict=True):
            _check_finite(tensor.float(), item.name, model.source)
    route = plan.routes.get(item.name)
    return st if route is None else route.per_model(st, len(plan.models))


def merge_tensor(
    plan: Plan,
    item: Loaded,
    coef: torch.Tensor,
    dtype: torch.dtype,
    inputs: Mapping[str, object],
    norms: list[TensorNorms] | None = None,
) -> torch.Tensor:
    """Merge one tensor in float32 and cast it to `dtype`: chunk by chunk when the method is
    elementwise, on every tensor or on this one (`chunked`; after its `prepare` step over
    the whole tensor), else over the whole (M, *shape) stack.

    `inputs` are the method's per-tensor keyword inputs (generator, statistics). A chunked
    merge appends each chunk's norms to `norms` when given: one pass over the inputs
    instead of two.
    """
    assert item.models is not None
    spec, params = plan.method_of(item.name), {**plan.params_of(item.name), **inputs}
    shape, device = item.models[0].shape, item.models[0].device
    if plan.chunked(item.name, tuple(shape)):
        if spec.prepare is not None:
            params |= spec.prepare(item.models, item.base, **params)
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.reshape(-1)
        for begin, stack, base in _chunks(item):
            if norms is not None:
                norms.append(tensor_norms(stack, base))
            where = {} if spec.prepare is None else {"offset": begin}
            merged = spec.fn(stack, coef, base=base, **params, **where)
            part = flat[begin : begin + stack.shape[1]]
            part.copy_(merged)
            if not _all_finite(part):
                checked_norms(plan, item)  # a damaged input is named first
                raise _overflow(item.name, merged, dtype)
        return out
    stack = torch.empty((len(item.models), *shape), dtype=torch.float32, device=device)
    for row, tensor in zip(stack, item.models, strict=True):
        row.copy_(tensor)
    base = None if item.base is None else item.base.to(torch.float32)
    item.models = item.base = None  # the float32 copies replace what was read
    merged = spec.fn(stack, coef, base=base, **params)
    out = merged.to(dtype)
    if not _all_finite(out):
        raise _overflow(item.name, merged, dtype)
    return out


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite: the smallest and largest are, as min and max propagate
    NaN. On this CPU 0.08 ns an entry in bfloat16, against 8.8 for `isfinite(t).all()`."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _overflow(name: str, merged: torch.Tensor, dtype: torch.dtype) -> MergeError:
    """The error for a merged tensor that is not finite in float32 or in the output dtype."""
    bad = int((~torch.isfinite(merged)).sum())
    if bad:
        return MergeError(
            f"merged tensor '{name}' overflows in float32 ({bad} of {merged.numel()} entries "
            "are Inf or NaN) and nanmerge never writes them: check the coefficients and the "
            "scale, since large or nearly cancelling weights amplify the models"
        )
    return MergeError(
        f"merged tensor '{name}' overflows when cast to {str(dtype).removeprefix('torch.')} "
        f"(largest magnitude {float(merged.abs().max()):.4g}) and nanmerge never writes Inf: "
        "write a wider dtype, `dtype: bfloat16` (float32's range) or `dtype: float32`"
    )


def load(plan: Plan, name: str, buffers: ReadBuffers | None, index: int) -> Loaded:
    """Read tensor number `index` from every input onto the recipe's device, in its stored
    dtype: into `buffers` where given and the reader can (valid until they are reused), else
    into fresh memory.

    Non-floating tensors are copied from the layout input (a slice's first source) unchanged.
    """
    sources = plan.sources_of(name)
    if name not in plan.merged:
        model, source = sources[0] if name in plan.routes else (plan.layout_input, name)
        return Loaded(name, None, None, model[source])
    device = torch.device(plan.recipe.device)

    def read(checkpoint: Checkpoint, slot: int, source: str) -> torch.Tensor:
        if buffers is None or not isinstance(checkpoint, CheckpointReader):
            return checkpoint[source].to(device)
        return checkpoint.read(source, buffers.memory(index, slot)).to(device)

    base_name = plan.base_name_of(name)
    base = None if plan.base is None or base_name is None else read(plan.base, 0, base_name)
    lacking = plan.fill_from_base.get(name, [])
    models = [
        base if i in lacking and base is not None else read(model, i + 1, source)
        for i, (model, source) in enumerate(sources)
    ]
    if plan.vocab is not None and name in plan.vocab.names:  # rows in the output's token order
        base, models = plan.vocab.align(base, models, lacking)
    return Loaded(name, models, base, None)


def _loads(plan: Plan, names: list[str], *, reuse: bool) -> Generator[Loaded, None, None]:
    """Every name loaded in order through `prefetch`; into reused read buffers when `reuse`
    (not for whole-stack methods, which free each read as they convert it to float32)."""
    buffers = ReadBuffers(plan.recipe.threads + 1) if reuse else None
    index = {name: i for i, name in enumerate(names)}
    return prefetch(names, lambda n: load(plan, n, buffers, index[n]), plan.recipe.threads)


@dataclass
class Collected:
    """What the pass before the merge gathered: every merged tensor's norms (what
    model-level estimators read) and the method's declared whole-model statistic."""

    norms: dict[str, TensorNorms]
    method: object = None
    ran: bool = False
    # per-tensor parameter values from a pass of their own (LiNeS's scale), and its report
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    lines: dict[str, Any] | None = None


def collect_pass(plan: Plan, *, progress: bool) -> Collected:
    """Read every floating tensor once, chunk by chunk, for everything gathered before the
    merge: the norms (which double as the inputs' finiteness check) and the method's
    `collect`, folded chunk after chunk so no whole model is ever held; then once more for
    each `refine` the collect asks for (a second look that needs the first total)."""
    names = [n for n, _ in plan.entries if n in plan.merged]
    collect = plan.method.collect_for(plan.params)
    out = Collected({}, ran=True)
    bar = tqdm(total=len(names), desc="collecting", unit="tensor", disable=not progress)
    for item in _loads(plan, names, reuse=True):
        parts = []
        for _, stack, base in _chunks(item):
            parts.append(tensor_norms(stack, base))
            if collect is not None:
                out.method = _fold(collect, out.method, plan.contexts[item.name], stack, base)
        out.norms[item.name] = checked_norms(plan, item, parts)
        bar.update()
    bar.close()
    while collect is not None and collect.refine is not None and out.method is not None:
        collect = collect.refine(out.method)
        out.method = _collect_again(plan, names, collect, progress=progress)
    return out


def _fold(
    collect: Collect[Any],
    total: object,
    context: TensorContext,
    stack: torch.Tensor,
    base: torch.Tensor | None,
) -> object:
    part = collect.partial(context, stack, base)
    return part if total is None else collect.combine(total, part)


def _collect_again(
    plan: Plan, names: list[str], collect: Collect[Any], *, progress: bool
) -> object:
    """One more read of every merged tensor, chunk by chunk, for `collect` alone."""
    total = None
    bar = tqdm(total=len(names), desc="collecting again", unit="tensor", disable=not progress)
    for item in _loads(plan, names, reuse=True):
        for _, stack, base in _chunks(item):
            total = _fold(collect, total, plan.contexts[item.name], stack, base)
        bar.update()
    bar.close()
    return total


def method_inputs(
    plan: Plan, name: str, collected: object, record: TensorRecord | None = None
) -> dict[str, object]:
    """The per-tensor keyword inputs the method asks for: its seeded generator, the tensor's
    context, the collected whole-model statistic, its statistics files' entries, the
    values of its parameters that vary by tensor (schedules, filters), and its record
    (None outside the merge pass: what a method finds in a pass before it is not kept)."""
    spec = plan.method_of(name)
    inputs: dict[str, object] = dict(plan.layered.params.get(name, {}))
    if spec.uses_generator:
        inputs["generator"] = tensor_generator(plan.recipe.seed, name)
    if spec.uses_context:
        inputs["context"] = plan.contexts[name]
    if spec.uses_record:
        inputs["record"] = record
    if spec.collect is not None:
        inputs["collected"] = collected
    if plan.statistics is not None:
        inputs |= plan.statistics.inputs(name)
    return inputs


def estimate_tensor(plan: Plan, coefficients: Coefficients, name: str, norms: TensorNorms) -> None:
    """Evaluate a per-tensor estimator on one tensor's norms into `coefficients`."""
    part = plan.estimator.fn({name: norms}, plan.model_names, **plan.estimator_options)
    coefficients.per_tensor.update(part.per_tensor)
    coefficients.warnings += part.warnings


def merge_stream(
    plan: Plan,
    coefficients: Coefficients,
    sink: Callable[[str, torch.Tensor], None],
    *,
    progress: bool,
    collected: object = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    recorder: Recorder | None = None,
    only: Collection[str] | None = None,
) -> dict[str, TensorNorms]:
    """Merge tensor by tensor into `sink` (CPU tensors, in plan order); per-tensor
    estimators are evaluated on the way. `collected` is the method's whole-model statistic
    from `collect_pass`, when it declares one; `overrides` are per-tensor parameter values
    that replace the recipe's (LiNeS's scale by depth); `recorder` hands a method that
    declares `record` one per tensor, and takes its notes and kept tensors once it is merged.
    `only` limits the merge to those tensors (one output shard, in a Ray task).

    Returns the norms of every merged tensor (for the report). Layer-wise
    coefficients computed here are added to `coefficients.per_tensor`.
    """
    per_tensor = plan.estimator.needs(plan.estimator_options) == "tensor"
    overrides = overrides or {}
    out_meta = dict(plan.entries)
    norms: dict[str, TensorNorms] = {}

    def merge_one(item: Loaded, record: TensorRecord | None) -> torch.Tensor:
        if item.models is None:
            assert item.raw is not None
            return item.raw
        inputs = method_inputs(plan, item.name, collected, record)
        inputs |= dict(overrides.get(item.name, {}))
        dtype, device = out_meta[item.name].dtype, item.models[0].device
        # with the coefficients known before the merge, the norms come from its own pass
        fused = plan.chunked(item.name, out_meta[item.name].shape) and not per_tensor
        if not fused:
            st = norms[item.name] = checked_norms(plan, item)
            if per_tensor:
                estimate_tensor(plan, coefficients, item.name, st)
        coef = plan.coef_of(item.name, coefficients.for_tensor(item.name)).to(device)
        if not fused:
            return merge_tensor(plan, item, coef, dtype, inputs)
        parts: list[TensorNorms] = []
        merged = merge_tensor(plan, item, coef, dtype, inputs, parts)
        norms[item.name] = checked_norms(plan, item, parts)
        return merged

    names = [n for n, _ in plan.entries if only is None or n in only]
    bar = tqdm(
        total=len(names), desc=f"merging ({plan.method.name})", unit="tensor", disable=not progress
    )
    writer = BackgroundSink(sink) if plan.recipe.threads > 0 else nullcontext(to_cpu(sink))
    loaded = _loads(plan, names, reuse=plan.method.elementwise)
    with writer as write, closing(loaded):
        for name in names:
            spec = plan.method_of(name)
            in_chunks = plan.chunked(name, out_meta[name].shape)
            record = None if recorder is None else recorder.start(spec, name, in_chunks)
            # no name holds the inputs: they are freed before the result waits for the writer
            write(name, merge_one(next(loaded), record))
            if record is not None and recorder is not None:
                recorder.finish(record)
            bar.update()
    bar.close()
    return norms

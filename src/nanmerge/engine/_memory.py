"""What the report states about memory: an upper estimate of the merge's working set, from
the method's declared cost per tensor and the plan's largest tensors."""

from __future__ import annotations

from typing import Any

from nanmerge.engine._plan import Plan
from nanmerge.engine._stream import CHUNK
from nanmerge.methods._registry import ELEMENTWISE


def memory_bound(p: Plan) -> dict[str, Any]:
    """Upper estimate of the merge's working set above the interpreter, stated in the report.

    The method states its working set for one tensor (`MethodSpec.memory_for`) in units of L, the
    largest tensor in float32 bytes, and C, one float32 chunk; the read buffers kept for
    reuse, `threads + 1` sets of M + 1, fit that allowance. Each loader thread may hold one
    more such working set; with threads > 0 the writer thread also holds up to two merged
    tensors (2 L at most), within that allowance. Per-tensor statistics (RegMean's Grams)
    are held on the merging thread only. The writer buffers no shard: each tensor goes to
    disk as it is merged. Measured growth: docs/PERFORMANCE.md.
    """
    cost, m = p.method.memory_for(p.params), len(p.models)
    if p.method.elementwise_on is not None:
        return _mixed_bound(p)
    largest_name, largest = max(p.entries, key=lambda e: e[1].numel)
    unit = largest.numel * 4
    chunks = cost.chunks(m)
    per_thread = cost.tensors(m) * unit + chunks * 4 * min(CHUNK, largest.numel)
    formula = f"(threads + 1) * ({cost.formula})"
    extra = statistics_bound(p)
    if extra:
        formula += f" + {cost.statistics_formula}"
    return {
        "bound_bytes": (p.recipe.threads + 1) * per_thread + extra,
        "formula": formula
        + "; L = largest tensor in float32 bytes"
        + (f", C = {4 * CHUNK} bytes (a float32 chunk)" if chunks else ""),
        "largest_tensor": largest_name,
        "largest_tensor_float32_bytes": unit,
        "models": m,
        "threads": p.recipe.threads,
    }


def _mixed_bound(p: Plan) -> dict[str, Any]:
    """`memory_bound` for a method that is elementwise on some tensors only (`elementwise_on`):
    the larger of its own working set on the largest tensor it merges whole (L) and the
    elementwise one on the largest it merges in chunks (V)."""
    m, whole, chunks = len(p.models), p.method.memory_for(p.params), ELEMENTWISE
    largest: dict[bool, tuple[str, int]] = {True: ("", 0), False: ("", 0)}
    for name, meta in p.entries:
        in_chunks = p.chunked(name, meta.shape)
        if meta.numel > largest[in_chunks][1]:
            largest[in_chunks] = (name, meta.numel)
    (l_name, l_numel), (v_name, v_numel) = largest[False], largest[True]
    per_thread = max(
        whole.tensors(m) * 4 * l_numel + whole.chunks(m) * 4 * min(CHUNK, l_numel),
        chunks.tensors(m) * 4 * v_numel + chunks.chunks(m) * 4 * min(CHUNK, v_numel),
    )
    extra = statistics_bound(p)
    return {
        "bound_bytes": (p.recipe.threads + 1) * per_thread + extra,
        "formula": f"(threads + 1) * max({whole.formula}, {chunks.formula.replace('L', 'V')})"
        + (f" + {whole.statistics_formula}" if extra else "")
        + "; L = largest tensor merged whole, V = largest merged in chunks, in float32 "
        + f"bytes; C = {4 * CHUNK} bytes (a float32 chunk)",
        "largest_tensor": l_name,
        "largest_tensor_float32_bytes": 4 * l_numel,
        "largest_chunked_tensor": v_name,
        "largest_chunked_tensor_float32_bytes": 4 * v_numel,
        "models": m,
        "threads": p.recipe.threads,
    }


def statistics_bound(p: Plan) -> int:
    """Bytes the method's per-tensor statistics add, for the widest one (d inputs)."""
    s, cost = p.statistics, p.method.memory_for(p.params).statistics
    if s is None or cost is None or not s.names:
        return 0
    d = max(s.shapes[n][-1] if len(s.shapes[n]) == 2 else 1 for n in s.names)
    return cost(len(p.models), d)

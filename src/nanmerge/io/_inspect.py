"""What a checkpoint holds: names, shapes, dtypes, L2 norms and sizes, one tensor at a time."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ._readers import open_checkpoint

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


def _l2(tensor: torch.Tensor) -> float:
    """The L2 norm in float64, so low-precision weights and large tensors do not round it."""
    import torch

    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    return float(torch.linalg.vector_norm(tensor.to(torch.float64)))


def inspect_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    norms: bool = True,
    allow_downloads: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Describe every tensor of a checkpoint (anything `open_checkpoint` accepts).

    Tensors are loaded one at a time to take their norm, so memory stays at one tensor;
    with `norms=False` only headers are read (no tensor, and no torch for safetensors).
    Returns a JSON-ready dict: `tensors` (name, shape, dtype, numel, bytes, and norm unless
    `norms=False`) in file order, and the totals `tensor_count`, `parameters` and `bytes`.
    """
    reader = open_checkpoint(source, allow_downloads=allow_downloads)
    try:
        rows = []
        for name in tqdm(reader.keys(), desc="inspect", unit="tensor", disable=not progress):
            shape, dtype, nbytes = reader.header(name)
            row = {
                "name": name,
                "shape": list(shape),
                "dtype": dtype,
                "numel": math.prod(shape),
                "bytes": nbytes,
            }
            if norms:
                row["norm"] = _l2(reader[name])
            rows.append(row)
        folder = getattr(reader, "folder", None)
        return {
            "source": reader.source,
            "folder": None if folder is None else str(folder),
            "tensor_count": len(rows),
            "parameters": sum(r["numel"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "tensors": rows,
        }
    finally:
        reader.close()


def _size(nbytes: int) -> str:
    value, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"


def format_inspection(info: Mapping[str, Any]) -> str:
    """The inspection as an aligned table with a totals line, for the terminal."""
    rows = info["tensors"]
    shapes = [str(tuple(r["shape"])) for r in rows]
    name_w = max([len("tensor"), *(len(r["name"]) for r in rows)])
    shape_w = max([len("shape"), *(len(s) for s in shapes)])
    lines = [f"{info['source']}" + (f"  ({info['folder']})" if info["folder"] else "")]
    norms = all("norm" in r for r in rows)
    header = f"  {'tensor':<{name_w}}  {'shape':<{shape_w}}  {'dtype':<8}"
    lines.append(header + f"  {'L2 norm':>14}" if norms else header.rstrip())
    for row, shape in zip(rows, shapes, strict=True):
        line = f"  {row['name']:<{name_w}}  {shape:<{shape_w}}  {row['dtype']:<8}"
        lines.append(line + f"  {row['norm']:>14.6g}" if norms else line.rstrip())
    lines.append(
        f"{info['tensor_count']} tensors, {info['parameters']:,} parameters, "
        f"{_size(info['bytes'])} ({info['bytes']:,} bytes)"
    )
    return "\n".join(lines)

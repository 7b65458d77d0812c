"""The statistics step (Fisher, Gram) lives in `nanmerge.learn`; this path keeps working."""

from __future__ import annotations

from nanmerge.learn._statistics import (
    Kind,
    LossFn,
    compute_statistics,
    load_source,
    save_statistics,
)

__all__ = ["Kind", "LossFn", "compute_statistics", "load_source", "save_statistics"]

"""Model-in-the-loop drivers: they run the user's model on data to learn or measure something.

AdaMerging learns task-arithmetic coefficients by entropy minimization; the statistics step
computes the per-tensor Fisher or Gram matrices that `fisher` and `regmean` merge with.
Each produces a file the merge reads (coefficients JSON, statistics safetensors).
"""

from __future__ import annotations

from nanmerge.learn._adamerging import AdaMergingResult, adamerging, entropy, save_coefficients
from nanmerge.learn._statistics import Kind, compute_statistics, load_source, save_statistics

__all__ = [
    "AdaMergingResult",
    "Kind",
    "adamerging",
    "compute_statistics",
    "entropy",
    "load_source",
    "save_coefficients",
    "save_statistics",
]

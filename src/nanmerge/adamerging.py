"""AdaMerging lives in `nanmerge.learn`; this path keeps working."""

from __future__ import annotations

from nanmerge.learn._adamerging import AdaMergingResult, adamerging, entropy, save_coefficients

__all__ = ["AdaMergingResult", "adamerging", "entropy", "save_coefficients"]

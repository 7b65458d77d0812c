"""nanmerge: model merging with norm-aware (NAN) coefficients, streamed tensor by tensor."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nanmerge._types import Coefficients, MergeError
from nanmerge._version import __version__
from nanmerge.config import Recipe, load_recipe

if TYPE_CHECKING:
    from nanmerge.coefficients import ESTIMATORS
    from nanmerge.engine import estimate_coefficients, merge
    from nanmerge.methods import METHODS

# Re-exports that load torch, imported on first use (PEP 562) so `import nanmerge.cli` stays fast.
_LAZY = {
    "ESTIMATORS": "nanmerge.coefficients",
    "METHODS": "nanmerge.methods",
    "estimate_coefficients": "nanmerge.engine",
    "merge": "nanmerge.engine",
}

__all__ = [
    "ESTIMATORS",
    "METHODS",
    "Coefficients",
    "MergeError",
    "Recipe",
    "__version__",
    "estimate_coefficients",
    "load_recipe",
    "merge",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nanmerge' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)

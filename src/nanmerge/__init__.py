"""nanmerge: model merging with norm-aware (NAN) coefficients, streamed tensor by tensor."""

from nanmerge._types import Coefficients, MergeError
from nanmerge._version import __version__
from nanmerge.coefficients import ESTIMATORS
from nanmerge.config import Recipe, load_recipe
from nanmerge.engine import estimate_coefficients, merge
from nanmerge.methods import METHODS

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

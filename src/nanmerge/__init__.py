"""nanmerge: model merging with norm-aware (NAN) coefficients, streamed tensor by tensor."""

__version__ = "0.1.0"

from nanmerge._types import Coefficients, MergeError  # noqa: E402
from nanmerge.coefficients import ESTIMATORS  # noqa: E402
from nanmerge.config import Recipe, load_recipe  # noqa: E402
from nanmerge.engine import estimate_coefficients, merge  # noqa: E402
from nanmerge.methods import METHODS  # noqa: E402

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

"""The recipe: what to merge, how, and where to write it (YAML, dict or object)."""

from nanmerge.config._load import load_recipe, load_recipes
from nanmerge.config._model import (
    IN_MEMORY,
    CoefficientSpec,
    LinesSpec,
    ModelEntry,
    Recipe,
    Slice,
    SliceSource,
    TokenizerSpec,
)

__all__ = [
    "IN_MEMORY",
    "CoefficientSpec",
    "LinesSpec",
    "ModelEntry",
    "Recipe",
    "Slice",
    "SliceSource",
    "TokenizerSpec",
    "load_recipe",
    "load_recipes",
]

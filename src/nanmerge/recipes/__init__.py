"""Translators from other tools' recipes into nanmerge's: pure functions over parsed YAML."""

from __future__ import annotations

from nanmerge.recipes._layer_swap import layer_swap
from nanmerge.recipes._mega import chain_order
from nanmerge.recipes._mergekit import from_mergekit

__all__ = ["chain_order", "from_mergekit", "layer_swap"]

"""The per-tensor statistics data-informed methods read, keyed by the keyword that takes them.

A method declares the kind by naming its keyword (`fisher`, `gram`); the engine checks each
statistics file's shapes against `file_shape` and fills tensors that no file covers as
`fill_missing` says, knowing no method by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StatisticKind:
    """How one kind of statistic is stored for a tensor of a given shape."""

    # The stored shape for a tensor of this shape, or None when the kind has no entry for it.
    file_shape: Callable[[tuple[int, ...]], tuple[int, ...] | None]
    # Whether a merged tensor that no file covers gets zeros (True) or no input at all.
    fill_missing: bool


def _gram_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A weight (out, in) has the Gram of its inputs; a bias, that of a constant input."""
    if len(shape) == 1:
        return (1, 1)
    return (shape[1], shape[1]) if len(shape) == 2 else None


STATISTIC_KINDS: dict[str, StatisticKind] = {
    "fisher": StatisticKind(file_shape=lambda shape: shape, fill_missing=True),
    "gram": StatisticKind(file_shape=_gram_shape, fill_missing=False),
}
STATISTICS = tuple(STATISTIC_KINDS)

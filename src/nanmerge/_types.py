"""The few types shared by every layer: tensor metadata, per-tensor statistics, coefficients."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


class MergeError(Exception):
    """A problem with the user's inputs or recipe; the message says what, where and what to do."""


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype read from a checkpoint header, without loading the tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint(Protocol):
    """What the engine needs from a reader: a read-only mapping of names to tensors plus headers."""

    source: str

    def keys(self) -> Sequence[str]: ...

    def meta(self, name: str) -> TensorMeta: ...

    def __getitem__(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TensorStats:
    """Float64 sums of squares of one tensor for each of the M models.

    Sums of squares (not norms) are kept because they add up exactly across tensors, so
    the model-level norm is the square root of the sum of the per-tensor entries.
    """

    numel: int
    sumsq_finetuned: tuple[float, ...]
    sumsq_task_vector: tuple[float, ...] | None = None


@dataclass
class Coefficients:
    """The one coefficient slot of every merge method, answered per tensor.

    `per_model` holds one weight per model (uniform is 1.0 each); `per_tensor` overrides it
    for the tensors it names (layer-wise estimators). `norms` and `warnings` are kept so the
    report can show what the estimate was based on.
    """

    models: tuple[str, ...]
    estimator: str
    params: dict[str, Any] = field(default_factory=dict)
    per_model: tuple[float, ...] | None = None
    per_tensor: dict[str, tuple[float, ...]] = field(default_factory=dict)
    norms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def for_tensor(self, name: str) -> torch.Tensor:
        """The float32 coefficient vector (one entry per model) to use for tensor `name`."""
        import torch

        values = self.per_tensor.get(name, self.per_model)
        if values is None:
            raise MergeError(
                f"coefficients from estimator '{self.estimator}' have no entry for tensor "
                f"'{name}' and no per-model default; re-estimate them for this model"
            )
        return torch.tensor(values, dtype=torch.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "estimator": self.estimator,
            "params": self.params,
            "coefficients": None if self.per_model is None else list(self.per_model),
            "per_tensor": {k: list(v) for k, v in self.per_tensor.items()},
            "norms": {k: list(v) for k, v in self.norms.items()},
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Coefficients:
        per_model = data.get("coefficients")
        return cls(
            models=tuple(data["models"]),
            estimator=str(data.get("estimator", "from_file")),
            params=dict(data.get("params", {})),
            per_model=None if per_model is None else tuple(float(v) for v in per_model),
            per_tensor={
                k: tuple(float(x) for x in v) for k, v in data.get("per_tensor", {}).items()
            },
            norms={k: tuple(float(x) for x in v) for k, v in data.get("norms", {}).items()},
            warnings=list(data.get("warnings", [])),
        )

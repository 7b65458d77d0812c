"""The few types shared by every layer: tensor metadata, per-tensor norms, coefficients."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

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


Role = Literal["embedding", "attention", "mlp", "norm", "head", "other"]


@dataclass(frozen=True)
class TensorContext:
    """Where one tensor sits in its model, computed once per tensor by the plan.

    A method or hook receives it by declaring a keyword-only `context` parameter. `layer`
    is the index of the transformer block the tensor belongs to (None outside the blocks
    or for names nanmerge cannot place), counted within its stack (T5's encoder and decoder
    are two stacks); `num_layers` is that stack's size.
    """

    name: str
    layer: int | None
    num_layers: int | None
    role: Role


P = TypeVar("P")


@dataclass(frozen=True)
class Collect(Generic[P]):
    """A whole-model statistic, gathered in the engine's one pass before the merge.

    `partial` sees each chunk of each merged tensor (its context, the float32 (M, c) stack of
    the models and the (c,) base or None); `combine` folds two partial results, so the
    result never needs a whole model in memory. The method then receives the total as its
    `collected` keyword.

    `refine`, when set, takes that total and returns the Collect of one more pass over the
    model (a second look that needs the first answer: the one histogram bin holding a
    whole-model top-k cut); its total, refined in turn if it says so, is what the method
    receives. Each refine costs one more read of every input, which the method states.
    """

    partial: Callable[[TensorContext, torch.Tensor, torch.Tensor | None], P]
    combine: Callable[[P, P], P]
    refine: Callable[[P], Collect[Any]] | None = None


class Record(Protocol):
    """Where a method leaves what it found while merging one tensor, beside the merged tensor.

    A method receives one by declaring a keyword-only `record` parameter (None when called
    directly without one). `note` values (numbers or short strings: an SVD's approximation
    error, a kept rank) go to the merge report under the tensor's name; `keep` tensors (a
    task's packed mask, its rescaler) are written beside the merged checkpoint, named
    `<key>/<tensor name>`, for methods whose output is more than one model.
    """

    def note(self, key: str, value: float | int | str) -> None: ...

    def keep(self, key: str, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Rebuild:
    """How `nanmerge rebuild` makes task t's model from a merge that kept per-task tensors.

    `masks` is the kept key whose (T, ...) rows mark a rebuilt tensor (tensors without it are
    copied from the merged model). `whole(kept, names, task)` computes, once, the named
    values every tensor needs from the whole model (EMR's rescaler), from `kept(key, name)`,
    the kept tensor `key/name`. `tensor(merged, base, kept, *, task, params, whole)` returns
    task t's tensor as float32, flat, with `kept(key)` reading this tensor's kept entries and
    `params` the method's parameters for this tensor.
    """

    masks: str
    tensor: Callable[..., torch.Tensor]
    # what a recipe sets for the method to keep its masks (empty when it always does)
    kept_with: str = ""
    whole: (
        Callable[[Callable[[str, str], torch.Tensor], Sequence[str], int], dict[str, float]] | None
    ) = None


@dataclass(frozen=True)
class MemoryCost:
    """A method's working set for one tensor, above the inputs' read buffers' bookkeeping:
    `tensors(M)` times L (the largest tensor in float32 bytes) plus `chunks(M)` times C (one
    float32 chunk), plus `statistics(M, d)` bytes when it reads per-tensor statistics of
    width d. The formulas say the same in words for the report."""

    tensors: Callable[[int], int]
    chunks: Callable[[int], int]
    formula: str
    statistics: Callable[[int, int], int] | None = None
    statistics_formula: str = ""


@dataclass(frozen=True)
class TensorNorms:
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
    for the tensors it names (layer-wise estimators). `multiplier` scales the estimate of the
    tensors it names, one factor per model (a recipe's coefficient schedules and filters), so
    the report keeps the estimate and the factor apart. `norms` and `warnings` are kept so the
    report can show what the estimate was based on.
    """

    models: tuple[str, ...]
    estimator: str
    params: dict[str, Any] = field(default_factory=dict)
    per_model: tuple[float, ...] | None = None
    per_tensor: dict[str, tuple[float, ...]] = field(default_factory=dict)
    norms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    multiplier: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def for_tensor(self, name: str) -> torch.Tensor:
        """The float32 coefficient vector (one entry per model) to use for tensor `name`."""
        import torch

        values = self.per_tensor.get(name, self.per_model)
        if values is None:
            raise MergeError(
                f"coefficients from estimator '{self.estimator}' have no entry for tensor "
                f"'{name}' and no per-model default; re-estimate them for this model"
            )
        factors = self.multiplier.get(name)
        if factors is not None:
            values = tuple(v * f for v, f in zip(values, factors, strict=True))
        return torch.tensor(values, dtype=torch.float32)

    def to_json(self) -> dict[str, Any]:
        scaled = {k: list(v) for k, v in self.multiplier.items()}
        return {
            "models": list(self.models),
            "estimator": self.estimator,
            "params": self.params,
            "coefficients": None if self.per_model is None else list(self.per_model),
            "per_tensor": {k: list(v) for k, v in self.per_tensor.items()},
            "norms": {k: list(v) for k, v in self.norms.items()},
            "warnings": list(self.warnings),
            **({"multiplier": scaled} if scaled else {}),
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
            multiplier={
                k: tuple(float(x) for x in v) for k, v in data.get("multiplier", {}).items()
            },
        )

"""The base every reader shares, so each kind only says how to list, describe and load tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from nanmerge._types import TensorMeta
from nanmerge.io._tokenizer import TOKENIZER_FILES

# Files a Hugging Face model folder needs besides its weights.
NON_WEIGHT_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "preprocessor_config.json",
)


if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

_Reader = TypeVar("_Reader", bound="CheckpointReader")


class CheckpointReader(ABC):
    """A read-only `Mapping[str, Tensor]` plus `meta(name)`, in the shape of `safe_open`.

    `source` names the input in messages; `folder` is the model folder (config.json,
    tokenizer files) when the input was a folder, else None.
    """

    source: str
    folder: Path | None

    @abstractmethod
    def keys(self) -> Sequence[str]:
        """Tensor names in file order, so reading them in this order is sequential I/O."""

    @abstractmethod
    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of `name` from the header, without loading the tensor."""

    def header(self, name: str) -> tuple[tuple[int, ...], str, int]:
        """Shape, dtype name (float32, bfloat16, ...) and bytes of `name`, as `meta` gives
        them; readers of formats that spell dtypes out (safetensors) answer without torch."""
        meta = self.meta(name)
        return meta.shape, str(meta.dtype).removeprefix("torch."), meta.nbytes

    @abstractmethod
    def __getitem__(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor that owns its memory; callers may modify or free it."""

    def read(self, name: str, memory: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """`self[name]`, read into `memory(nbytes)` (a uint8 CPU tensor) by readers that read
        raw bytes, so a caller can reuse one buffer across tensors instead of faulting in
        fresh pages for each; the result is valid until that memory is reused. Other readers
        return `self[name]`."""
        return self[name]

    @abstractmethod
    def close(self) -> None:
        """Release file handles; the reader must not be used afterwards."""

    @abstractmethod
    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self: _Reader) -> _Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} tensors)"

    def _missing(self, name: str) -> KeyError:
        return KeyError(f"tensor '{name}' is not in checkpoint {self.source}")

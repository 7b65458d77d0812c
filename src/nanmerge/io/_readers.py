"""Open any supported checkpoint (file, Hugging Face folder, in-memory state dict) as one reader."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nanmerge._types import MergeError, TensorMeta

from ._checkpoint import CheckpointReader
from ._hub import hub_snapshot, parse_repo_id, stays_in_source
from ._safetensors import SafetensorsFile

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# What a Hugging Face folder may hold, in the order we prefer them.
FOLDER_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _tensor_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Check that a loaded object is a flat dict of tensors and return it."""
    import torch

    if (
        isinstance(obj, Mapping)
        and set(obj) == {"state_dict"}
        and isinstance(obj["state_dict"], Mapping)
    ):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise MergeError(
            f"{source} holds a {type(obj).__name__}, not a dict of tensors; save the "
            "weights with torch.save(model.state_dict(), path) and pass that file"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise MergeError(f"{source} has a non-string key {key!r}; tensor names must be strings")
        if not isinstance(value, torch.Tensor):
            raise MergeError(
                f"entry '{key}' in {source} is a {type(value).__name__}, not a tensor; nanmerge "
                "reads a flat dict of tensors (or {'state_dict': {...}} alone), so save only "
                "model.state_dict()"
            )
        tensors[key] = value
    return tensors


class StateDictCheckpoint(CheckpointReader):
    """Tensors already in memory (a state dict or a module's), served as copies on the CPU."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self.source = source
        self.folder = None
        self._tensors = _tensor_dict(tensors, source)

    def keys(self) -> Sequence[str]:
        return tuple(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise self._missing(name)
        return TensorMeta(tuple(tensor.shape), tensor.dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        tensor = self._tensors.get(name)
        if tensor is None:
            raise self._missing(name)
        # A copy, so callers can modify it without touching the caller's model or file pages.
        return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._tensors = {}


class TorchFile(StateDictCheckpoint):
    """A PyTorch `.bin/.pt/.pth` file, memory-mapped and loaded with weights_only=True."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import torch

        source = str(path)
        # Legacy (pre-zip) files cannot be memory-mapped; they are small enough to load whole.
        mmap = zipfile.is_zipfile(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            if str(exc).startswith("Weights only load failed"):
                raise MergeError(
                    f"{source} contains non-tensor Python objects that nanmerge will not "
                    "unpickle for safety (unpickling can run arbitrary code). If you trust the "
                    "file, convert it once to safetensors: load it with torch.load(path, "
                    "weights_only=False), then safetensors.torch.save_file(state_dict, "
                    "'model.safetensors')"
                ) from None
            raise self._corrupt(source, exc) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise self._corrupt(source, exc) from None
        super().__init__(_tensor_dict(obj, source), source)

    @staticmethod
    def _corrupt(source: str, exc: BaseException) -> MergeError:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return MergeError(
            f"could not read PyTorch checkpoint {source}: it looks truncated or corrupt "
            f"({reason}); re-download or re-save it"
        )


class ShardedCheckpoint(CheckpointReader):
    """Several shard readers behind one Hugging Face index (`weight_map`: name -> shard file)."""

    def __init__(self, index_path: Path) -> None:
        self.source = str(index_path)
        self.folder = index_path.parent
        weight_map = self._read_weight_map(index_path)
        one_tensor_of = {shard: name for name, shard in weight_map.items()}
        paths = {
            shard: _shard_path(index_path, name, shard) for shard, name in one_tensor_of.items()
        }
        self._shards: dict[str, CheckpointReader] = {}
        try:
            for shard in sorted(paths):
                shard_path = paths[shard]
                if not shard_path.is_file():
                    raise MergeError(
                        f"{index_path} lists shard '{shard}' but {shard_path} does not exist; "
                        "the download looks incomplete, re-download the model"
                    )
                self._shards[shard] = _open_file(shard_path)
            self._owner = {name: self._shards[shard] for name, shard in weight_map.items()}
            for name, shard in weight_map.items():
                if name not in self._shards[shard]:
                    raise MergeError(
                        f"{index_path} maps tensor '{name}' to '{shard}' but that shard has "
                        "no such tensor; the index and shards do not match, re-download the model"
                    )
        except BaseException:
            self.close()
            raise
        # Shard by shard, each in its file order: sequential reads.
        self._order = tuple(
            name
            for shard, reader in self._shards.items()
            for name in reader
            if weight_map.get(name) == shard
        )

    @staticmethod
    def _read_weight_map(index_path: Path) -> dict[str, str]:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise MergeError(
                f"index {index_path} is not valid JSON ({exc}); it looks truncated or corrupt, "
                "re-download it"
            ) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise MergeError(
                f"index {index_path} has no 'weight_map' object mapping tensor names to shard "
                "files; it looks corrupt, re-download it"
            )
        return weight_map

    def keys(self) -> Sequence[str]:
        return self._order

    def meta(self, name: str) -> TensorMeta:
        reader = self._owner.get(name)
        if reader is None:
            raise self._missing(name)
        return reader.meta(name)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def header(self, name: str) -> tuple[tuple[int, ...], str, int]:
        return self._shard_of(name).header(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._shard_of(name)[name]

    def read(self, name: str, memory: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return self._shard_of(name).read(name, memory)

    def _shard_of(self, name: str) -> CheckpointReader:
        reader = self._owner.get(name)
        if reader is None:
            raise self._missing(name)
        return reader

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()


def _shard_path(index_path: Path, name: str, shard: str) -> Path:
    """Where a `weight_map` entry points, refused unless it is a weight file in the index's
    folder: an index is data from the download and must not reach other files (or itself)."""
    folder = index_path.parent
    entry = f"index {index_path} maps tensor '{name}' to '{shard}'"
    relative = Path(shard)
    if relative.is_absolute() or ".." in relative.parts:
        raise MergeError(
            f"{entry}, a path outside the index's folder {folder}; an index may name only "
            "files in its own folder: fix its weight_map or re-download the model"
        )
    if relative.name.endswith(".index.json"):
        raise MergeError(
            f"{entry}, which is an index, not a weight file; fix its weight_map to name the "
            "shard files, or re-download the model"
        )
    path = folder / relative
    if not stays_in_source(path, folder):
        raise MergeError(
            f"{entry}, a link to {path.resolve()} outside {folder}; nanmerge reads only shards "
            "inside the checkpoint's folder (or the Hugging Face cache): put the file itself there"
        )
    return path


def _open_file(path: Path) -> CheckpointReader:
    if path.name.endswith(".index.json"):
        return ShardedCheckpoint(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path)
    raise MergeError(
        f"cannot tell what kind of checkpoint {path} is from its name; nanmerge reads "
        f".safetensors, {'/'.join(TORCH_SUFFIXES)} files, *.index.json shard indexes and "
        "Hugging Face model folders"
    )


def _open_folder(folder: Path) -> CheckpointReader:
    for name in FOLDER_LAYOUTS:
        path = folder / name
        if path.is_file():
            reader = _open_file(path)
            reader.folder = folder
            return reader
    raise MergeError(
        f"{folder} holds no model weights nanmerge can read; looked for "
        f"{', '.join(FOLDER_LAYOUTS)}. Pass the folder that holds the weights, or the weight "
        "file itself"
    )


def open_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    allow_downloads: bool = False,
) -> CheckpointReader:
    """Open a checkpoint for header-only inspection and tensor-by-tensor loading.

    `source` is a `.safetensors` or `.bin/.pt/.pth` file, a shard index, a Hugging Face
    model folder, a Hugging Face repo id (`org/name[@revision]`, from the hub cache; downloaded
    only with `allow_downloads`), an in-memory state dict, or a module (its `state_dict()`).
    """
    if not isinstance(source, str | os.PathLike):  # a path is opened without loading torch
        import torch

        if isinstance(source, torch.nn.Module):
            return StateDictCheckpoint(source.state_dict(), f"<{type(source).__name__} module>")
        if isinstance(source, Mapping):
            return StateDictCheckpoint(source, "<in-memory state dict>")
    path = Path(source).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if path.is_file():
        return _open_file(path)
    repo = parse_repo_id(str(source)) if isinstance(source, str) else None
    if repo is not None:
        reader = open_checkpoint(hub_snapshot(repo, allow_downloads=allow_downloads))
        reader.source = str(repo)
        return reader
    raise MergeError(
        f"checkpoint not found: {source}. Check the path; a Hugging Face repo id is written "
        "ORG/NAME or ORG/NAME@REVISION"
    )

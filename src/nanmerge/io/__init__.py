"""Checkpoint readers (safetensors, PyTorch files, HF folders, state dicts) and the writer."""

from __future__ import annotations

from ._checkpoint import CheckpointReader
from ._readers import ShardedCheckpoint, StateDictCheckpoint, TorchFile, open_checkpoint
from ._safetensors import SafetensorsFile
from ._writer import NON_WEIGHT_FILES, ModelWriter, parse_size

__all__ = [
    "NON_WEIGHT_FILES",
    "CheckpointReader",
    "ModelWriter",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "StateDictCheckpoint",
    "TorchFile",
    "open_checkpoint",
    "parse_size",
]

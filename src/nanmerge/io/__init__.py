"""Checkpoint readers (safetensors, PyTorch files, HF folders, state dicts) and the writer."""

from __future__ import annotations

from ._checkpoint import NON_WEIGHT_FILES, CheckpointReader
from ._hub import HubRepo, hub_cache_dir, hub_snapshot, model_folder, parse_repo_id
from ._inspect import format_inspection, inspect_checkpoint
from ._kept import KEPT_FOLDER, KeptWriter
from ._lora import LoraAdapter, is_lora_adapter, open_model
from ._lora_writer import LoraWriter
from ._output import Protected, output_problems, protected_paths
from ._readers import ShardedCheckpoint, StateDictCheckpoint, TorchFile, open_checkpoint
from ._safetensors import SafetensorsFile
from ._shard import ShardFile
from ._tokenizer import TOKENIZER_FILES, Tokenizer, read_tokenizer, with_added_tokens
from ._writer import ModelWriter, escaping_side_files, parse_size

__all__ = [
    "KEPT_FOLDER",
    "NON_WEIGHT_FILES",
    "TOKENIZER_FILES",
    "CheckpointReader",
    "HubRepo",
    "KeptWriter",
    "LoraAdapter",
    "LoraWriter",
    "ModelWriter",
    "Protected",
    "SafetensorsFile",
    "ShardFile",
    "ShardedCheckpoint",
    "StateDictCheckpoint",
    "Tokenizer",
    "TorchFile",
    "escaping_side_files",
    "format_inspection",
    "hub_cache_dir",
    "hub_snapshot",
    "inspect_checkpoint",
    "is_lora_adapter",
    "model_folder",
    "open_checkpoint",
    "open_model",
    "output_problems",
    "parse_repo_id",
    "parse_size",
    "protected_paths",
    "read_tokenizer",
    "with_added_tokens",
]

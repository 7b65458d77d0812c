"""Counting reads of checkpoint tensors, for tests that pin how many passes a merge makes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nanmerge.io import SafetensorsFile


def count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times each tensor is read from a safetensors file from now on, by name."""
    reads: dict[str, int] = {}
    original = SafetensorsFile.read

    def counting(self: SafetensorsFile, name: str, memory: Any) -> torch.Tensor:
        reads[name] = reads.get(name, 0) + 1
        return original(self, name, memory)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    return reads

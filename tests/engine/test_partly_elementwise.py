"""A whole-stack method that is elementwise on some tensors (`elementwise_on`): the subspace
methods average what they do not SVD, and the engine merges those tensors chunk by chunk."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import nanmerge
from nanmerge.engine import _memory, _stream
from nanmerge.methods import _registry
from tests.conftest import Family, build_family

M = 3
SHAPES = {
    "model.embed_tokens.weight": (60, 40),  # 2400 entries: 10 chunks of 256, one partial
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.input_layernorm.weight": (40,),
    "lm_head.weight": (60, 40),
}
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
SUBSPACE = ("tsv", "iso_c", "iso_cts", "dc_merge")


@pytest.fixture
def family(tmp_path: Path) -> Family:
    return build_family(tmp_path / "family", m=M, shapes=SHAPES)


def _spy(monkeypatch: pytest.MonkeyPatch, method: str) -> list[tuple[str, tuple[int, ...]]]:
    """Each call of the method's function during a merge: (tensor name, stack shape)."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    spec = _registry._METHODS[method]

    def fn(tensors: torch.Tensor, coef: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append((kwargs["context"].name, tuple(tensors.shape)))
        return spec.fn(tensors, coef, **kwargs)

    monkeypatch.setitem(_registry._METHODS, method, dataclasses.replace(spec, fn=fn))
    for module in (_stream, _memory):  # _memory keeps the chunk size it imported for the bound
        monkeypatch.setattr(module, "CHUNK", 256)
    return calls


@pytest.mark.parametrize("method", SUBSPACE)
def test_vocabulary_and_non_matrix_tensors_are_merged_in_chunks_as_the_task_vectors_mean(
    family: Family, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    calls = _spy(monkeypatch, method)
    merged = nanmerge.merge(
        {"base": str(family.base), "models": [str(p) for p in family.models], "method": method}
    )
    assert isinstance(merged, dict)
    for name in VOCAB:
        shapes = [shape for called, shape in calls if called == name]
        assert shapes == [(M, 256)] * 9 + [(M, 2400 - 9 * 256)]  # never the (M, 60, 40) stack
    assert [s for n, s in calls if n.endswith("layernorm.weight")] == [(M, 40)]
    assert [s for n, s in calls if n.endswith("q_proj.weight")] == [(M, 16, 16)]  # SVD, whole
    for name in (*VOCAB, "model.layers.0.input_layernorm.weight"):
        base = family.base_tensors[name]
        mean = sum(ft[name] - base for ft in family.model_tensors) / M
        torch.testing.assert_close(merged[name], base + mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", SUBSPACE)
def test_included_vocabulary_matrices_are_merged_whole(
    family: Family, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    calls = _spy(monkeypatch, method)
    nanmerge.merge(
        {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": method,
            "parameters": {"include_vocab": True},
        }
    )
    for name in VOCAB:
        assert [shape for called, shape in calls if called == name] == [(M, 60, 40)]


def test_memory_bound_takes_the_larger_of_the_whole_and_the_chunked_working_sets(
    family: Family, tmp_path: Path
) -> None:
    report = nanmerge.merge(
        {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": "iso_c",
            "output": str(tmp_path / "out"),
        }
    )
    memory = report["memory"]
    assert memory["largest_tensor"] == "model.layers.0.self_attn.q_proj.weight"
    assert memory["largest_chunked_tensor"] in VOCAB
    whole = (7 * M + 4) * 4 * 16 * 16  # the whole stack's (7M + 4) L
    chunked = (M + 4) * 4 * 2400 + (6 * M + 4) * 4 * 2400  # (M + 4) V + (6M + 4) C, C <= V
    assert memory["bound_bytes"] == max(whole, chunked) == chunked

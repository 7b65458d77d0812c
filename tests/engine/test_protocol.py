"""The method protocol: tensor context and whole-model statistics reach the methods that
declare them, through the engine's one pass before the merge."""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import nanmerge
from nanmerge._types import Collect, TensorContext
from nanmerge.io import SafetensorsFile
from tests.read_counts import count_reads

SHAPES = {
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.1.mlp.down_proj.weight": (700, 1000),  # more than one chunk
    "model.norm.weight": (4,),
}


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(0)
    folders = [tmp_path / n for n in ("base", "ft0", "ft1")]
    for folder in folders:
        folder.mkdir()
        tensors = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    return folders[0], folders[1:]


def _recipe(base: Path, models: list[Path], method: str, **fields: Any) -> dict[str, Any]:
    return {"base": str(base), "models": [str(m) for m in models], "method": method, **fields}


@pytest.mark.parametrize("elementwise", [False, True])
def test_a_method_that_declares_context_gets_each_tensors_context(
    checkpoints: tuple[Path, list[Path]], temporary: Any, elementwise: bool
) -> None:
    seen: dict[str, TensorContext] = {}

    @temporary(needs_base=True, elementwise=elementwise)
    def context_probe(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        context: TensorContext,
    ) -> torch.Tensor:
        seen[context.name] = context
        return tensors[0]

    base, models = checkpoints
    nanmerge.merge(_recipe(base, models, "context_probe"))
    assert {n: (c.layer, c.num_layers, c.role) for n, c in seen.items()} == {
        "model.embed_tokens.weight": (None, None, "embedding"),
        "model.layers.0.self_attn.q_proj.weight": (0, 4, "attention"),  # 4: config.json
        "model.layers.1.mlp.down_proj.weight": (1, 4, "mlp"),
        "model.norm.weight": (None, None, "norm"),
    }


def test_a_collected_statistic_covers_the_whole_model_chunk_by_chunk(
    checkpoints: tuple[Path, list[Path]], temporary: Any
) -> None:
    """A toy method dividing the summed task vectors by their global L1 norm: the total must
    be the hand-computed one over every tensor, and every tensor must see the same total."""
    totals: list[float] = []

    def partial(context: TensorContext, stack: torch.Tensor, base: torch.Tensor | None) -> float:
        assert base is not None
        return float((stack - base).abs().sum(dtype=torch.float64))

    @temporary(needs_base=True, elementwise=True, collect=Collect(partial, operator.add))
    def global_l1(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        collected: float,
    ) -> torch.Tensor:
        assert base is not None
        totals.append(collected)
        return base + (tensors - base).sum(dim=0) / collected

    base, models = checkpoints
    read = [SafetensorsFile(p / "model.safetensors") for p in [base, *models]]
    tensors = [{n: r[n] for n in SHAPES} for r in read]
    for r in read:
        r.close()
    l1 = sum(
        float((m[n] - tensors[0][n]).abs().sum(dtype=torch.float64))
        for m in tensors[1:]
        for n in SHAPES
    )
    merged = nanmerge.merge(_recipe(base, models, "global_l1"))
    assert isinstance(merged, dict)
    assert len(set(totals)) == 1 and totals[0] == pytest.approx(l1, rel=1e-12)
    for name in SHAPES:
        expected = tensors[0][name] + sum(m[name] - tensors[0][name] for m in tensors[1:]) / l1
        torch.testing.assert_close(merged[name], expected)


def test_model_statistics_and_a_collect_share_one_pass_before_the_merge(
    checkpoints: tuple[Path, list[Path]], temporary: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = count_reads(monkeypatch)

    @temporary(needs_base=True, elementwise=True, collect=Collect(lambda c, s, b: 1, operator.add))
    def counting_collect(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        collected: int,
    ) -> torch.Tensor:
        return tensors.mean(dim=0)

    base, models = checkpoints
    report = nanmerge.merge(
        _recipe(base, models, "counting_collect", coefficients="nan", output=str(base.parent / "o"))
    )
    assert isinstance(report, dict) and report["collect_pass"] is True
    # each tensor read once per input in the pass before the merge, once more in the merge
    assert reads == {name: 2 * 3 for name in SHAPES}

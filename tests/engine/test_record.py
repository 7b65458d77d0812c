"""The record: what a method notes lands in the merge report, what it keeps is written
beside the merged checkpoint (in the same temporary folder, so a failed merge leaves
nothing), and a merge without output says it dropped the kept tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanmerge
from nanmerge._types import MergeError, Record
from nanmerge.io import open_checkpoint

SHAPES = {
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.mlp.down_proj.weight": (700, 1000),  # more than one chunk
    "model.norm.weight": (4,),
}


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    folders = [tmp_path / n for n in ("base", "ft0", "ft1")]
    tensors = []
    for folder in folders:
        folder.mkdir()
        state = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        save_file(state, folder / "model.safetensors")
        tensors.append(state)
    return folders[0], folders[1:], tensors


def _recipe(base: Path, models: list[Path], method: str, **fields: Any) -> dict[str, Any]:
    return {"base": str(base), "models": [str(m) for m in models], "method": method, **fields}


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("elementwise", [False, True])
def test_notes_reach_the_report_and_kept_tensors_the_kept_folder(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]],
    temporary: Any,
    tmp_path: Path,
    elementwise: bool,
    threads: int,
) -> None:
    """A toy method keeps the first model's entries and notes how many it saw: chunked, the
    pieces join into the whole flattened tensor and the counts add up to its size."""

    @temporary(needs_base=True, elementwise=elementwise)
    def recording(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.note("entries", tensors[0].numel())
        record.note("kind", "probe")
        record.keep("first", tensors[0].reshape(1, -1).clone())
        return tensors.mean(dim=0)

    base, models, tensors = checkpoints
    out = tmp_path / "merged"
    report = nanmerge.merge(_recipe(base, models, "recording", output=str(out), threads=threads))
    assert isinstance(report, dict)
    expected_notes = {
        n: {"entries": torch.Size(s).numel(), "kind": "probe"} for n, s in SHAPES.items()
    }
    assert report["method_notes"] == expected_notes
    on_disk = json.loads((out / "merge_report.json").read_text())
    assert on_disk["method_notes"] == expected_notes
    kept = open_checkpoint(out / "modulators")
    assert sorted(kept.keys()) == sorted(f"first/{n}" for n in SHAPES)
    for name in SHAPES:
        torch.testing.assert_close(kept[f"first/{name}"], tensors[1][name].reshape(1, -1))
    kept.close()
    assert report["output"]["kept"]["bytes"] == sum(
        4 * torch.Size(s).numel() for s in SHAPES.values()
    )
    # the fine-tuned models, two of them, in float32
    assert (
        report["output"]["kept"]["fine_tuned_models_bytes"] == 2 * report["output"]["kept"]["bytes"]
    )


def test_kept_tensors_are_sharded_with_an_index_like_the_model(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]],
    temporary: Any,
    tmp_path: Path,
) -> None:
    @temporary(needs_base=True)
    def keeper(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.keep("twice", 2 * tensors[1])
        return tensors[0]

    base, models, tensors = checkpoints
    out = tmp_path / "merged"
    nanmerge.merge(_recipe(base, models, "keeper", output=str(out), max_shard_size="1MB"))
    index = json.loads((out / "modulators" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 3  # the 2.8 MB tensor alone, the two small ones before and after it
    for name in SHAPES:
        stored = load_file(out / "modulators" / index["weight_map"][f"twice/{name}"])
        torch.testing.assert_close(stored[f"twice/{name}"], 2 * tensors[2][name])
    assert not list((out / "modulators").glob(".*"))  # no spool or unnamed shard is left


def test_a_method_that_only_notes_leaves_no_kept_folder(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]],
    temporary: Any,
    tmp_path: Path,
) -> None:
    @temporary(needs_base=True)
    def noting(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.note("error", 0.25)
        return tensors[0]

    base, models, _ = checkpoints
    out = tmp_path / "merged"
    report = nanmerge.merge(_recipe(base, models, "noting", output=str(out)))
    assert isinstance(report, dict)
    assert report["method_notes"] == {n: {"error": 0.25} for n in SHAPES}
    assert report["output"]["kept"] is None and not (out / "modulators").exists()


def test_a_failed_merge_leaves_neither_model_nor_kept_files(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]],
    temporary: Any,
    tmp_path: Path,
) -> None:
    @temporary(needs_base=True)
    def failing(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.keep("mask", tensors[0] > 0)
        if tensors.shape[1:] == (4,):  # the last tensor, after the others were kept
            raise MergeError("boom")
        return tensors[0]

    base, models, _ = checkpoints
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="boom"):
        nanmerge.merge(_recipe(base, models, "failing", output=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1"]


def test_without_output_kept_tensors_are_dropped_with_a_warning(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]], temporary: Any
) -> None:
    @temporary(needs_base=True, elementwise=True)
    def dropped(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.keep("copy", tensors[0].clone())
        return tensors[1]

    base, models, tensors = checkpoints
    with pytest.warns(UserWarning, match="kept 3 tensor"):
        state = nanmerge.merge(_recipe(base, models, "dropped"))
    assert set(state) == set(SHAPES)
    torch.testing.assert_close(state["model.norm.weight"], tensors[2]["model.norm.weight"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("a/b", 1, "record key 'a/b'"), ("", 1, "record key ''"), ("x", [1], "a note is a number")],
)
def test_a_bad_note_or_key_is_a_clear_error(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]],
    temporary: Any,
    key: str,
    value: Any,
    message: str,
) -> None:
    @temporary(needs_base=True)
    def bad_note(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.note(key, value)
        return tensors[0]

    base, models, _ = checkpoints
    with pytest.raises(MergeError, match=message):
        nanmerge.merge(_recipe(base, models, "bad_note"))


def test_a_whole_tensor_method_keeps_a_key_once(
    checkpoints: tuple[Path, list[Path], list[dict[str, torch.Tensor]]],
    temporary: Any,
    tmp_path: Path,
) -> None:
    @temporary(needs_base=True)
    def keeps_twice(
        tensors: torch.Tensor,
        coef: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        assert record is not None
        record.keep("k", tensors[0])
        record.keep("k", tensors[1])
        return tensors[0]

    base, models, _ = checkpoints
    with pytest.raises(MergeError, match="kept 'k' twice"):
        nanmerge.merge(_recipe(base, models, "keeps_twice", output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()

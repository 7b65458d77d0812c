"""`nanmerge inspect`: names, shapes, dtypes, L2 norms and totals of any model input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from nanmerge.cli import main
from nanmerge.io import inspect_checkpoint
from tests.hub_cache import add_to_hub_cache, use_hub_cache

TENSORS = {
    "encoder.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5,
    "encoder.bias": torch.tensor([3.0, -4.0], dtype=torch.float16),
    "head.weight": torch.linspace(-1, 1, 6, dtype=torch.bfloat16).reshape(2, 3),
    "position_ids": torch.arange(5, dtype=torch.int64),
}


def _truth(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Expected rows, computed independently with numpy in float64."""
    return {
        name: {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "norm": float(np.linalg.norm(t.float().numpy().astype(np.float64).ravel())),
            "bytes": t.numel() * t.element_size(),
        }
        for name, t in tensors.items()
    }


def _write(kind: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Write TENSORS as one input kind and return what the user would pass."""
    root.mkdir(parents=True)
    if kind == "safetensors file":
        save_file(TENSORS, root / "w.safetensors")
        return str(root / "w.safetensors")
    if kind == "torch file":
        torch.save(TENSORS, root / "w.pt")
        return str(root / "w.pt")
    if kind == "folder":
        save_file(TENSORS, root / "model.safetensors")
        return str(root)
    if kind == "sharded folder":
        names = list(TENSORS)
        shards = {
            "model-00001-of-00002.safetensors": names[:2],
            "model-00002-of-00002.safetensors": names[2:],
        }
        weight_map = {}
        for shard, keys in shards.items():
            save_file({k: TENSORS[k] for k in keys}, root / shard)
            weight_map.update(dict.fromkeys(keys, shard))
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return str(root)
    assert kind == "repo id"
    save_file(TENSORS, root / "model.safetensors")
    cache = use_hub_cache(monkeypatch, root / "hub")
    add_to_hub_cache(cache, "org/toy", {"model.safetensors": root / "model.safetensors"})
    return "org/toy@main"


KINDS = ["safetensors file", "torch file", "folder", "sharded folder", "repo id"]


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_reports_every_tensor_of_every_input_kind(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write(kind, tmp_path / "in", monkeypatch)
    info = inspect_checkpoint(source)
    truth = _truth(TENSORS)
    rows = {r["name"]: r for r in info["tensors"]}
    assert set(rows) == set(truth)
    for name, expected in truth.items():
        row = rows[name]
        assert row["shape"] == expected["shape"] and row["dtype"] == expected["dtype"], name
        assert row["bytes"] == expected["bytes"], name
        assert row["norm"] == pytest.approx(expected["norm"], rel=1e-12), name
    assert info["tensor_count"] == 4
    assert info["parameters"] == 12 + 2 + 6 + 5
    assert info["bytes"] == 12 * 4 + 2 * 2 + 6 * 2 + 5 * 8
    if kind == "repo id":
        assert info["source"] == "org/toy@main"


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_headers_only_gives_every_row_but_the_norm(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write(kind, tmp_path / "in", monkeypatch)
    info = inspect_checkpoint(source, norms=False)
    expected = {
        name: {
            "name": name,
            "shape": row["shape"],
            "dtype": row["dtype"],
            "numel": TENSORS[name].numel(),
            "bytes": row["bytes"],
        }
        for name, row in _truth(TENSORS).items()
    }
    assert {r["name"]: r for r in info["tensors"]} == expected
    assert (info["tensor_count"], info["parameters"], info["bytes"]) == (4, 25, 104)


def test_inspect_takes_an_in_memory_state_dict() -> None:
    info = inspect_checkpoint({"w": torch.full((2, 2), 2.0)})
    assert info["tensors"][0]["norm"] == pytest.approx(4.0)
    assert info["folder"] is None


@pytest.mark.parametrize(
    ("flag", "norm_columns"),
    [
        ("--quiet", [f"{_truth(TENSORS)['encoder.weight']['norm']:.6g}"]),
        ("--headers-only", []),
    ],
)
def test_cli_inspect_prints_a_table_with_totals(
    flag: str, norm_columns: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write("folder", tmp_path / "in", monkeypatch)
    result = CliRunner().invoke(main, ["inspect", source, flag])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    norm_header = ["L2", "norm"] if norm_columns else []
    assert lines[1].split() == ["tensor", "shape", "dtype", *norm_header]
    row = next(line for line in lines if "encoder.weight" in line).split()
    assert row[1:] == ["(3,", "4)", "float32", *norm_columns]
    assert lines[-1] == "4 tensors, 25 parameters, 104 B (104 bytes)"


def test_cli_inspect_json_matches_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write("repo id", tmp_path / "in", monkeypatch)
    result = CliRunner().invoke(main, ["inspect", source, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == inspect_checkpoint(source)


def test_cli_inspect_errors_name_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub_cache(monkeypatch, tmp_path / "hub")
    missing = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output
    uncached = CliRunner().invoke(main, ["inspect", "org/absent"])
    assert uncached.exit_code == 2
    assert "'org/absent' is not in the local cache" in uncached.output
    assert "--allow-downloads" in uncached.output


def test_inspect_layers_prints_each_blocks_roles_and_what_lies_outside(tmp_path: Path) -> None:
    names = [
        "model.embed_tokens.weight",
        *(
            f"model.layers.{i}.{part}"
            for i in range(2)
            for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight")
        ),
        "lm_head.weight",
    ]
    save_file({n: torch.zeros(2) for n in names}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 3}')
    text = CliRunner().invoke(main, ["inspect", str(tmp_path), "--layers"])
    assert text.exit_code == 0, text.output
    assert "config.json says 3" in text.output
    assert "layer 1 of 3: 2 tensors (attention 1, mlp 1)" in text.output
    assert "outside the blocks (2)" in text.output and "lm_head.weight (head)" in text.output
    data = json.loads(
        CliRunner().invoke(main, ["inspect", str(tmp_path), "--layers", "--json"]).output
    )
    assert data["tensors"]["model.layers.1.mlp.up_proj.weight"] == {
        "layer": 1,
        "num_layers": 3,
        "role": "mlp",
    }

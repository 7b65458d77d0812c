"""Hugging Face repo ids as inputs: parsed by shape, read from a hub cache the tests build."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nanmerge import MergeError, merge
from nanmerge.cli import main
from nanmerge.io import HubRepo, model_folder, open_checkpoint, parse_repo_id
from tests.conftest import build_family
from tests.hub_cache import add_to_hub_cache, use_hub_cache

CONFIG = json.dumps({"model_type": "toy", "hidden_size": 4}).encode()


def _weights(tmp_path: Path, name: str, value: float) -> Path:
    path = tmp_path / "src" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 3), value), "b": torch.arange(3.0) * value}, path)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", HubRepo("org/name")),
        (
            "sentence-transformers/all-MiniLM-L6-v2",
            HubRepo("sentence-transformers/all-MiniLM-L6-v2"),
        ),
        ("Org_1/model.v2@main", HubRepo("Org_1/model.v2", "main")),
        ("org/name@refs/pr/3", HubRepo("org/name", "refs/pr/3")),
        ("org/name@" + "a" * 40, HubRepo("org/name", "a" * 40)),
    ],
)
def test_repo_id_shapes_are_recognised(text: str, expected: HubRepo) -> None:
    assert parse_repo_id(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "name",
        "a/b/c",
        "./org/name",
        "/abs/org",
        "~/org/name",
        "org/name.safetensors",
        "org/pytorch_model.bin",
        "org/model.safetensors.index.json",
        "-org/name",
        "org/name-",
        "org/na--me",
        "org/na..me",
        "org/name@",
        "org/name@a b",
        "org name/x",
    ],
)
def test_non_repo_strings_are_not_repo_ids(text: str) -> None:
    assert parse_repo_id(text) is None


def test_repo_id_reads_the_cached_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    weights = _weights(tmp_path, "main", 1.5)
    snapshot = add_to_hub_cache(
        cache, "org/toy", {"model.safetensors": weights, "config.json": CONFIG}
    )
    with open_checkpoint("org/toy") as reader:
        assert reader.source == "org/toy"
        assert reader.folder == snapshot
        assert sorted(reader.keys()) == ["b", "w"]
        torch.testing.assert_close(reader["w"], torch.full((2, 3), 1.5))


def test_revision_picks_the_branch_or_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    add_to_hub_cache(cache, "org/toy", {"model.safetensors": _weights(tmp_path, "main", 1.0)})
    commit = "c" * 40
    add_to_hub_cache(
        cache,
        "org/toy",
        {"model.safetensors": _weights(tmp_path, "v2", 2.0)},
        revision="v2",
        commit=commit,
    )
    for text, value in [("org/toy", 1.0), ("org/toy@v2", 2.0), (f"org/toy@{commit}", 2.0)]:
        with open_checkpoint(text) as reader:
            assert reader.source == text
            assert float(reader["w"][0, 0]) == value, text


def test_sharded_repo_reads_through_its_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"a": torch.ones(2)}, shards / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, shards / "model-00002-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    add_to_hub_cache(
        cache,
        "org/sharded",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": shards / "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors": shards / "model-00002-of-00002.safetensors",
        },
    )
    with open_checkpoint("org/sharded") as reader:
        assert reader.source == "org/sharded"
        assert set(reader.keys()) == {"a", "b"}


def test_existing_local_path_wins_over_a_repo_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    add_to_hub_cache(cache, "org/toy", {"model.safetensors": _weights(tmp_path, "hub", 9.0)})
    local = tmp_path / "work" / "org" / "toy"
    local.mkdir(parents=True)
    save_file({"w": torch.zeros(2, 3)}, local / "model.safetensors")
    monkeypatch.chdir(tmp_path / "work")
    with open_checkpoint("org/toy") as reader:
        assert float(reader["w"].abs().sum()) == 0.0
        assert reader.source.endswith("model.safetensors")


def test_uncached_repo_error_names_repo_cache_and_fetch_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(MergeError) as info:
        open_checkpoint("org/absent@v3")
    message = str(info.value)
    assert "'org/absent' at revision 'v3' is not in the local cache" in message
    assert str(cache) in message
    assert "hf download org/absent --revision v3" in message
    assert "--allow-downloads" in message


def _record_downloads(
    monkeypatch: pytest.MonkeyPatch, cache: Path, weights: Path
) -> list[dict[str, Any]]:
    """Stand in for the network: a download writes the repo into the cache as the Hub would."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls: list[dict[str, Any]] = []

    def fake(repo_id: str, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            return str(real(repo_id, **kwargs))
        calls.append({"repo_id": repo_id, **kwargs})
        files = {"model.safetensors": weights, "config.json": CONFIG}
        return str(add_to_hub_cache(Path(kwargs["cache_dir"]), repo_id, files))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_download_happens_only_when_allowed_and_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    calls = _record_downloads(monkeypatch, cache, _weights(tmp_path, "dl", 3.0))
    with pytest.raises(MergeError, match="pass --allow-downloads"):
        open_checkpoint("org/remote")
    with pytest.raises(MergeError, match="HF_HUB_OFFLINE"):
        open_checkpoint("org/remote", allow_downloads=True)
    assert calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with open_checkpoint("org/remote", allow_downloads=True) as reader:
        assert float(reader["w"][0, 0]) == 3.0
    (call,) = calls
    assert call["repo_id"] == "org/remote" and Path(call["cache_dir"]) == cache
    patterns = call["allow_patterns"]
    assert "model.safetensors" in patterns and "config.json" in patterns
    assert not any(p.endswith(".bin") for p in patterns), "safetensors first, .bin only as fallback"
    # Now cached: no second download.
    with open_checkpoint("org/remote", allow_downloads=True):
        pass
    assert len(calls) == 1


def test_copy_files_from_accepts_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    snapshot = add_to_hub_cache(cache, "org/cfg", {"config.json": CONFIG})
    assert model_folder("org/cfg") == snapshot
    with pytest.raises(MergeError, match="not a folder"):
        model_folder(str(tmp_path / "missing.json"))


def _cache_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    family = build_family(tmp_path / "inputs", m=2)
    add_to_hub_cache(
        cache,
        "org/base",
        {"model.safetensors": family.base, "config.json": CONFIG, "vocab.txt": b"[PAD]\n"},
        revision="v1",
    )
    for i, path in enumerate(family.models):
        add_to_hub_cache(cache, f"org/ft{i}", {"model.safetensors": path})
    return family


def test_cli_merges_repo_ids_and_card_names_the_base_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = _cache_family(tmp_path, monkeypatch)
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": "org/base@v1",
                "models": ["org/ft0", "org/ft1"],
                "method": "task_arithmetic",
                "coefficients": "nan",
                "copy_files_from": "org/base@v1",
                "output": str(out),
            }
        )
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    # The values are those of the same merge from the local files.
    local = merge(
        {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": "task_arithmetic",
            "coefficients": "nan",
        }
    )
    merged = load_file(out / "model.safetensors")
    assert isinstance(local, dict)
    for name, tensor in local.items():
        torch.testing.assert_close(merged[name], tensor)
    assert json.loads((out / "config.json").read_text()) == json.loads(CONFIG)
    assert (out / "vocab.txt").read_text() == "[PAD]\n"
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "org/base"
    assert meta["library_name"] == "transformers" and meta["tags"] == ["merge", "nanmerge"]
    recipe_yaml = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(recipe_yaml)
    assert shown["base"] == "org/base@v1"
    assert [m["path"] for m in shown["models"]] == ["org/ft0", "org/ft1"]
    assert shown["method"] == "task_arithmetic"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"] == {"base": "org/base@v1", "models": ["org/ft0", "org/ft1"]}


def test_cli_merge_flags_report_uncached_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_hub_cache(monkeypatch, tmp_path / "hub")
    args = ["merge", "--model", "org/a", "--model", "org/b", "--method", "weight_average"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'org/a' is not in the local cache" in result.output
    assert "'org/b' is not in the local cache" in result.output
    assert "--allow-downloads" in result.output
    assert not (tmp_path / "o").exists()
    help_text = CliRunner().invoke(main, ["merge", "--help"]).output
    assert "--allow-downloads" in help_text


def test_local_merges_never_import_huggingface_hub(tmp_path: Path) -> None:
    family = build_family(tmp_path / "inputs", m=2)
    recipe = {
        "base": str(family.base),
        "models": [str(p) for p in family.models],
        "method": "ties",
        "coefficients": "nan",
        "output": str(tmp_path / "out"),
    }
    code = (
        "import json, sys, nanmerge\n"
        f"nanmerge.merge(json.loads({json.dumps(json.dumps(recipe))}))\n"
        "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_partial_snapshot_with_weights_is_used_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hf download --include '*.safetensors'` leaves a snapshot the Hub calls incomplete."""
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError

    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    partial = add_to_hub_cache(
        cache, "org/partial", {"model.safetensors": _weights(tmp_path, "p", 4.0)}
    )
    calls: list[bool] = []

    def fake(repo_id: str, **kwargs: Any) -> str:
        calls.append(bool(kwargs.get("local_files_only")))
        raise IncompleteSnapshotError("pytorch_model.bin is missing", str(partial))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with open_checkpoint("org/partial", allow_downloads=True) as reader:
        assert float(reader["w"][0, 0]) == 4.0
    assert calls == [True], "weights were there: no download"


def test_run_allow_downloads_flag_reaches_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = _record_downloads(monkeypatch, cache, _weights(tmp_path, "dl", 3.0))
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "out"
    recipe.write_text(
        yaml.safe_dump({"models": ["org/remote"], "method": "weight_average", "output": str(out)})
    )
    refused = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert refused.exit_code == 2 and "--allow-downloads" in refused.output
    assert calls == []
    result = CliRunner().invoke(main, ["run", str(recipe), "--quiet", "--allow-downloads"])
    assert result.exit_code == 0, result.output
    assert [c["repo_id"] for c in calls] == ["org/remote"]
    torch.testing.assert_close(load_file(out / "model.safetensors")["w"], torch.full((2, 3), 3.0))
    assert json.loads((out / "config.json").read_text()) == json.loads(CONFIG)


def _sharded_repo(cache: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A sharded repo with a tokenizer in the cache, one tensor per shard; its snapshot."""
    from safetensors.torch import save

    files: dict[str, Path | bytes] = {"tokenizer.json": b'{"version": "1.0"}'}
    weight_map = {}
    for i, (name, tensor) in enumerate(tensors.items(), start=1):
        shard = f"model-{i:05d}-of-{len(tensors):05d}.safetensors"
        files[shard] = save({name: tensor})
        weight_map[name] = shard
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    return add_to_hub_cache(cache, "org/sharded", files)


def test_snapshot_links_into_blobs_are_read_and_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanmerge.io import NON_WEIGHT_FILES, ModelWriter

    # The cache itself reached through a link, as when ~/.cache/huggingface sits on another disk.
    (tmp_path / "disk" / "hub").mkdir(parents=True)
    (tmp_path / "hub").symlink_to(tmp_path / "disk" / "hub")
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    snapshot = _sharded_repo(cache, tensors)
    shard = snapshot / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and shard.resolve().parent.name == "blobs"
    for source in ("org/sharded", str(snapshot)):
        with open_checkpoint(source) as reader:
            assert set(reader.keys()) == set(tensors)
            for name, tensor in tensors.items():
                assert torch.equal(reader[name], tensor), (source, name)
    with ModelWriter(tmp_path / "out", [], max_shard_size=10) as writer:
        assert writer.copy_files(snapshot, NON_WEIGHT_FILES) == ["tokenizer.json"]
        assert (writer.temp_dir / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'


def _link_out_of_cache(tmp_path: Path, snapshot: Path, name: str) -> Path:
    """Replace the blob behind `snapshot/name` by a link to a copy outside the cache."""
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    outside.write_bytes((snapshot / name).read_bytes())
    blob = (snapshot / name).resolve()
    blob.unlink()
    blob.symlink_to(outside)
    return outside


def test_snapshot_shard_linked_outside_the_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    snapshot = _sharded_repo(cache, {"a": torch.arange(4.0), "b": torch.ones(2, 2)})
    shard = "model-00002-of-00002.safetensors"
    outside = _link_out_of_cache(tmp_path, snapshot, shard)
    with pytest.raises(
        MergeError, match=rf"'b' to '{shard}', a link to {re.escape(str(outside))} outside"
    ):
        open_checkpoint("org/sharded")


def test_snapshot_side_file_linked_outside_the_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanmerge.io import NON_WEIGHT_FILES, ModelWriter

    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    snapshot = _sharded_repo(cache, {"a": torch.arange(4.0)})
    outside = _link_out_of_cache(tmp_path, snapshot, "tokenizer.json")
    with (
        ModelWriter(tmp_path / "out", [], max_shard_size=10) as writer,
        pytest.raises(
            MergeError, match=rf"tokenizer\.json is a link to {re.escape(str(outside))}, outside"
        ),
    ):
        writer.copy_files(snapshot, NON_WEIGHT_FILES)

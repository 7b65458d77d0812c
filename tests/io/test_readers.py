"""open_checkpoint over every input kind: files, Hugging Face folders, state dicts, modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanmerge._types import MergeError, TensorMeta
from nanmerge.io import ShardedCheckpoint, StateDictCheckpoint, TorchFile, open_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(6, 4, generator=gen),
        "layer.0.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "layer.0.bias": torch.randn(4, generator=gen).to(torch.float16),
        "step_ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(reader: object, expected: dict[str, torch.Tensor]) -> None:
    from nanmerge.io import CheckpointReader

    assert isinstance(reader, CheckpointReader)
    assert set(reader.keys()) == set(expected)
    for name, tensor in expected.items():
        assert reader.meta(name) == TensorMeta(tuple(tensor.shape), tensor.dtype)
        got = reader[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def _write_sharded_safetensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, folder / shard)
        weight_map.update(dict.fromkeys(members, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_hf_folder_reads_every_tensor(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded_safetensors(tmp_path, tensors)
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as reader:
        assert isinstance(reader, ShardedCheckpoint)
        assert reader.folder == tmp_path
        _assert_same(reader, tensors)
        # Shard by shard, in file order within each shard.
        first = load_file(tmp_path / "model-00001-of-00002.safetensors")
        assert set(reader.keys()[:2]) == set(first)


def test_index_file_can_be_passed_directly(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded_safetensors(tmp_path, tensors)
    with open_checkpoint(tmp_path / "model.safetensors.index.json") as reader:
        _assert_same(reader, tensors)


@pytest.mark.slow
def test_transformers_sharded_save_is_read_back(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path, max_shard_size="2KB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    with open_checkpoint(tmp_path) as reader:
        assert set(reader.keys()) == set(index["weight_map"])
        for name in reader:
            assert torch.equal(reader[name], state[name]), name


def test_index_listing_missing_shard_raises(tmp_path: Path) -> None:
    _write_sharded_safetensors(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergeError, match=r"model-00002-of-00002\.safetensors.*re-download"):
        open_checkpoint(tmp_path)


def test_index_naming_tensor_absent_from_shard_raises(tmp_path: Path) -> None:
    _write_sharded_safetensors(tmp_path, _tensors())
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MergeError, match=r"'ghost\.weight'.*no such tensor"):
        open_checkpoint(tmp_path)


def test_corrupt_index_raises(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(MergeError, match="not valid JSON"):
        open_checkpoint(tmp_path)


def test_single_file_hf_folder_sets_folder(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as reader:
        assert reader.folder == tmp_path
        _assert_same(reader, tensors)


def test_pytorch_bin_folder_single_and_sharded(tmp_path: Path) -> None:
    tensors = _tensors()
    single = tmp_path / "single"
    single.mkdir()
    torch.save(tensors, single / "pytorch_model.bin")
    with open_checkpoint(single) as reader:
        assert isinstance(reader, TorchFile)
        assert reader.folder == single
        _assert_same(reader, tensors)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(tensors)
    weight_map = {}
    for i, members in enumerate([names[:3], names[3:]], start=1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: tensors[n] for n in members}, sharded / shard)
        weight_map.update(dict.fromkeys(members, shard))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(sharded) as reader:
        assert reader.folder == sharded
        _assert_same(reader, tensors)


def test_safetensors_preferred_over_bin_in_folder(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as reader:
        assert torch.equal(reader["w"], torch.ones(2))


def test_folder_without_weights_lists_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MergeError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
        assert name in message
    assert str(tmp_path) in message


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_file_round_trip(tmp_path: Path, suffix: str) -> None:
    tensors = _tensors()
    path = tmp_path / f"weights{suffix}"
    torch.save(tensors, path)
    with open_checkpoint(path) as reader:
        assert reader.folder is None
        assert list(reader.keys()) == list(tensors)  # insertion order is file order
        _assert_same(reader, tensors)


def test_torch_file_with_state_dict_key_and_legacy_format(tmp_path: Path) -> None:
    tensors = _tensors()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": tensors}, wrapped)
    with open_checkpoint(wrapped) as reader:
        _assert_same(reader, tensors)
    legacy = tmp_path / "legacy.pt"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    with open_checkpoint(legacy) as reader:
        _assert_same(reader, tensors)


def test_torch_tensors_are_fresh_copies(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(3)}, path)
    with open_checkpoint(path) as reader:
        reader["w"].zero_()
        assert torch.equal(reader["w"], torch.ones(3))


class CustomPayload:
    """A class weights_only unpickling must refuse."""

    def __init__(self) -> None:
        self.value = 1


def test_pickle_with_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(2), "extra": CustomPayload()}, path)
    with pytest.raises(MergeError, match="non-tensor Python objects") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    assert "safetensors" in str(info.value)


def test_non_tensor_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(MergeError, match=r"entry 'epoch'.*int, not a tensor"):
        open_checkpoint(path)


def test_truncated_torch_file_raises_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(256)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MergeError, match="truncated or corrupt") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_path_says_not_found_with_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(MergeError, match=f"checkpoint not found: {missing}") as info:
        open_checkpoint(missing)
    assert "ORG/NAME" in str(info.value)
    # A repo-id-shaped name is looked up in the hub cache (tests/io/test_hub.py has the rest).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MergeError, match="'org/model' is not in the local cache"):
        open_checkpoint("org/model")


def test_unknown_file_type_raises(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(MergeError, match="cannot tell what kind of checkpoint"):
        open_checkpoint(path)


def test_in_memory_state_dict_and_module(tmp_path: Path) -> None:
    tensors = _tensors()
    with open_checkpoint(tensors) as reader:
        assert isinstance(reader, StateDictCheckpoint)
        assert reader.folder is None
        _assert_same(reader, tensors)
        reader["embed.weight"].zero_()
    assert tensors["embed.weight"].abs().sum() > 0  # the caller's tensor was not touched

    module = torch.nn.Linear(3, 2)
    with open_checkpoint(module) as reader:
        assert list(reader.keys()) == ["weight", "bias"]
        assert "Linear" in reader.source
        got = reader["weight"]
        assert not got.requires_grad
        assert torch.equal(got, module.weight.detach())


def test_in_memory_non_tensor_value_is_named() -> None:
    with pytest.raises(MergeError, match="entry 'lr'"):
        open_checkpoint({"w": torch.ones(1), "lr": 0.1})  # type: ignore[dict-item]


# Each kind of index with its shard suffix; the tensor 'b' is mapped to the entry under test.
INDEX_KINDS = [
    ("model.safetensors.index.json", ".safetensors"),
    ("pytorch_model.bin.index.json", ".bin"),
]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)


def _escaping_entry(case: str, model: Path, index: str, suffix: str) -> str:
    """The weight_map entry for `case`; a real file with tensor 'b' waits outside `model`."""
    outside = model.parent / "outside" / f"x{suffix}"
    outside.parent.mkdir()
    _save({"b": torch.ones(3)}, outside)
    if case == "parent":
        return f"../outside/x{suffix}"
    if case == "absolute":
        return str(outside)
    if case == "link":
        (model / f"x{suffix}").symlink_to(outside)
        return f"x{suffix}"
    if case == "itself":
        return index
    other = f"other{suffix}.index.json"  # a valid index of the outside file
    (model / other).write_text(json.dumps({"weight_map": {"b": str(outside)}}))
    return other


@pytest.mark.parametrize(("index", "suffix"), INDEX_KINDS, ids=["safetensors", "bin"])
@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("parent", "a path outside the index's folder .*fix its weight_map"),
        ("absolute", "a path outside the index's folder .*fix its weight_map"),
        ("link", "a link to .*outside .*put the file itself there"),
        ("itself", "which is an index, not a weight file; fix its weight_map"),
        ("other index", "which is an index, not a weight file; fix its weight_map"),
    ],
)
def test_index_entry_outside_its_folder_is_refused_before_any_shard_is_read(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    index: str,
    suffix: str,
    case: str,
    problem: str,
) -> None:
    from nanmerge.io import _readers

    model = tmp_path / "model"
    model.mkdir()
    _save({"a": torch.zeros(2)}, model / f"shard{suffix}")
    entry = _escaping_entry(case, model, index, suffix)
    (model / index).write_text(json.dumps({"weight_map": {"a": f"shard{suffix}", "b": entry}}))

    def never(path: Path) -> None:
        raise AssertionError(f"opened {path} before checking every entry")

    monkeypatch.setattr(_readers, "_open_file", never)
    with pytest.raises(MergeError, match=problem) as info:
        ShardedCheckpoint(model / index)
    assert f"index {model / index} maps tensor 'b' to '{entry}'" in str(info.value)


def test_index_entry_in_a_subfolder_or_linked_within_the_folder_is_read(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int64)}
    (tmp_path / "shards").mkdir()
    save_file({"a": tensors["a"]}, tmp_path / "shards" / "one.safetensors")
    save_file({"b": tensors["b"]}, tmp_path / "real-two.safetensors")
    (tmp_path / "two.safetensors").symlink_to("real-two.safetensors")
    weight_map = {"a": "shards/one.safetensors", "b": "two.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as reader:
        _assert_same(reader, tensors)

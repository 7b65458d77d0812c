"""mergekit's tokenizer_source, tokenizer: {source} and chat_template on tiny model folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from nanmerge import MergeError
from nanmerge.recipes import from_mergekit
from tests.engine.test_vocab import CORPUS_A, EMBED, bpe, model
from tests.recipes._helpers import hf_model, merge_yaml, run

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def tokenizer_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "tokenizer_config.json").read_text())
    return data


def ties(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(tmp_path / "b"),
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in "xy"],
        **fields,
    }


def run_ok(tmp_path: Path, data: dict[str, Any]) -> Path:
    result = run(["run", str(merge_yaml(tmp_path, data)), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    hf_model(tmp_path / "b", 0, vocab="base")
    hf_model(tmp_path / "x", 1, vocab="x", template="X-TEMPLATE {{ messages }}")
    hf_model(tmp_path / "y", 2, vocab="y", template="Y-TEMPLATE {{ messages }}")
    return tmp_path


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tokenizer_source": "union"}, {"source": "union"}),
        ({"tokenizer_source": "base"}, {"source": "base"}),
        ({"tokenizer_source": "org/y"}, {"source": "org/y"}),
        ({"tokenizer": {}}, {"source": "union"}),  # mergekit's default source
        (
            {"tokenizer": {"source": "base", "pad_to_multiple_of": 64}},
            {"source": "base", "pad_to_multiple_of": 64},
        ),
    ],
)
def test_tokenizer_source_becomes_nanmerges_tokenizer_field(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    assert from_mergekit({**data, **fields})["tokenizer"] == expected
    assert "tokenizer" not in from_mergekit(data)  # no source: the base's files are copied


def test_mergekit_union_recipe_writes_the_union_vocabulary(tmp_path: Path) -> None:
    base = bpe(CORPUS_A, ["[UNK]", "<s>", "</s>"])
    tuned = Tokenizer.from_str(base.to_str())
    tuned.add_special_tokens(["<tool>"])
    rows = {"b": model(tmp_path / "b", base, 0), "x": model(tmp_path / "x", tuned, 1)}
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "b"),
        "models": [{"model": str(tmp_path / "x"), "parameters": {"weight": 1.0}}],
        "tokenizer_source": "union",
    }
    out = run_ok(tmp_path, data)
    tool = base.get_vocab_size()  # the first id after the base's
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<tool>") == tool
    merged = load_file(out / "model.safetensors")[EMBED]
    assert merged.shape[0] == tool + 1
    torch.testing.assert_close(merged, rows["x"][EMBED])  # weight 1 on one model: the model


def test_literal_chat_template_lands_in_tokenizer_config(folders: Path) -> None:
    out = run_ok(folders, ties(folders, chat_template=TEMPLATE))
    config = tokenizer_of(out)
    assert config["chat_template"] == TEMPLATE
    assert config["vocab"] == "base"  # the rest of the copied file is kept


def test_named_chatml_template_is_written_out(folders: Path) -> None:
    out = run_ok(folders, ties(folders, chat_template="chatml"))
    template = tokenizer_of(out)["chat_template"]
    assert "<|im_start|>" in template and "<|im_end|>" in template
    assert "add_generation_prompt" in template


def test_auto_chat_template_takes_the_most_common_among_the_inputs(folders: Path) -> None:
    hf_model(folders / "z", 3, template="Y-TEMPLATE {{ messages }}")
    data = ties(folders, chat_template="auto")
    data["models"].append({"model": str(folders / "z"), "parameters": {"weight": 1.0}})
    out = run_ok(folders, data)
    assert tokenizer_of(out)["chat_template"] == "Y-TEMPLATE {{ messages }}"


def test_chat_template_without_a_tokenizer_to_hold_it_fails_before_writing(
    folders: Path,
) -> None:
    (folders / "b" / "tokenizer_config.json").unlink()
    result = run(
        [
            "run",
            str(merge_yaml(folders, ties(folders, chat_template=TEMPLATE))),
            str(folders / "out"),
        ]
    )
    assert result.exit_code == 2
    assert "chat_template" in result.output and "no tokenizer_config.json" in result.output
    assert not (folders / "out").exists()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "x"}}}}, "tokenizer tokens"),
        ({"tokenizer_source": 3}, "tokenizer source 3"),
        ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "both `tokenizer_source`"),
        ({"chat_template": "alpaca"}, "chat_template 'alpaca'"),
        ({"chat_template": 3}, "chat_template 3"),
    ],
)
def test_tokenizer_features_nanmerge_lacks_are_one_clear_error(
    fields: dict[str, Any], says: str
) -> None:
    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    with pytest.raises(MergeError) as info:
        from_mergekit({**data, **fields})
    message = str(info.value)
    assert "1 feature(s)" in message and says in message

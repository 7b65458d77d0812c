"""Tokenizer files read and written as JSON: a fast tokenizer's `tokenizer.json` holds the
whole vocabulary (the model's tokens and the added ones, each with its id), so nanmerge
aligns vocabularies without the `tokenizers` or `transformers` packages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanmerge._types import MergeError

TOKENIZER_JSON = "tokenizer.json"
# a tokenizer's own files: written together from one tokenizer, never mixed from two
TOKENIZER_FILES: tuple[str, ...] = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "sentencepiece.bpe.model",
    "spiece.model",
)


@dataclass(frozen=True)
class Tokenizer:
    """One folder's tokenizer.json: `vocab` maps every token to its id (the model's own
    tokens, then the added ones); `added` holds the added tokens' entries by content."""

    folder: Path
    data: Mapping[str, Any]
    vocab: Mapping[str, int]
    added: Mapping[str, Mapping[str, Any]]

    @property
    def family(self) -> dict[str, Any]:
        """What gives a token string its meaning: the model type (BPE, WordPiece, Unigram,
        WordLevel), the normalizer and the pre-tokenizer. Two tokenizers of one family
        agree on what a token string stands for, so their rows can be matched by string."""
        model = self.data.get("model") or {}
        return {
            "model": model.get("type"),
            "normalizer": self.data.get("normalizer"),
            "pre_tokenizer": self.data.get("pre_tokenizer"),
        }

    @property
    def size(self) -> int:
        """Rows an embedding needs for this tokenizer: its largest id plus one."""
        return max(self.vocab.values(), default=-1) + 1

    def ids_to_tokens(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}


def _model_vocab(model: Mapping[str, Any], path: Path) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, Mapping):
        return {str(t): int(i) for t, i in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [token, score] pairs, the id is the position
        return {str(entry[0]): i for i, entry in enumerate(vocab)}
    raise MergeError(f"{path}: its `model` has no vocabulary nanmerge can read")


def read_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer.json, or a MergeError saying how to produce one."""
    path = Path(folder) / TOKENIZER_JSON
    if not path.is_file():
        raise MergeError(
            f"{folder} has no {TOKENIZER_JSON}: nanmerge aligns vocabularies from a fast "
            "tokenizer's file; write it with transformers (AutoTokenizer.from_pretrained"
            "(folder).save_pretrained(folder)) or leave `tokenizer` out of the recipe"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = _model_vocab(data["model"], path)
        added = {str(a["content"]): a for a in data.get("added_tokens") or []}
        for content, entry in added.items():
            vocab[content] = int(entry["id"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise MergeError(f"{path} is not a tokenizer.json nanmerge can read: {exc!r}") from None
    return Tokenizer(Path(folder), data, vocab, added)


def with_added_tokens(tokenizer: Tokenizer, entries: list[dict[str, Any]]) -> str:
    """The text of `tokenizer`'s tokenizer.json with `entries` (each with its new id)
    appended to its added tokens."""
    data = dict(tokenizer.data)
    data["added_tokens"] = [*(data.get("added_tokens") or []), *entries]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

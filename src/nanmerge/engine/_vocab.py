"""Vocabulary alignment: a recipe's `tokenizer` (mergekit's `tokenizer_source`) names the
output's vocabulary, and every input's embedding and output-head rows are moved to it as
they are loaded, then merged by the recipe's method as usual.

What follows mergekit 0.1.5 (`tokenizer/build.py`, `tokenizer/embed.py`):
- `base` is the base's tokenizer (the first model's without a base); a model is that
  model's; `union` is the base's tokenizer with, appended in input order (the base first),
  every other input's own tokens it lacks, then their added tokens it lacks (each added
  token with the settings of the first input that adds it).
- A row an input lacks is filled, the same for every input lacking it: with the row of the
  one input that has the token; else the base's row when the base has it; else the mean of
  the rows of the inputs that have it; a token no input has gets zeros. (Merged by a
  task-vector method, a token the base lacks is thus the mean of the models that add it.)
- The output has one row per token id, rounded up to `pad_to_multiple_of`; rows past the
  tokenizer (an input's padding) are dropped, and padding rows get each input's mean row.
  config.json's `vocab_size` says the new count.

Where nanmerge differs: tokenizers are read from tokenizer.json (no transformers); the
fine-tunes are taken in recipe order and each one's tokens in id order, so new ids are
fixed (mergekit walks a set of models and each fast tokenizer's dict, whose orders are not
fixed); an input whose tokenizer has more ids than its embedding rows is refused (mergekit
drops the extra tokens with a warning); inputs whose tokenizers differ in kind (model type,
normalizer, pre-tokenizer) are refused (mergekit matches their strings anyway); rows are
filled in float32 and stored in the input's dtype; a token the union's base tokenizer
already has keeps the base's settings. The re-aligned tensors are the ones named like an
embedding or output head (`embed_tokens`, `word_embeddings`, `wte`, `tok_embeddings`,
`embed_out`, `lm_head`, `shared`): an embedding role alone would also take position
embeddings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanmerge._types import Checkpoint, MergeError, TensorMeta
from nanmerge.config import Recipe
from nanmerge.io import (
    TOKENIZER_FILES,
    Tokenizer,
    escaping_side_files,
    model_folder,
    read_tokenizer,
    with_added_tokens,
)

VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|word_embeddings|wte|tok_embeddings|embed_out|lm_head|shared)\.weight$"
)
CONFIGS = ("config.json", "generation_config.json")
_PLAIN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


@dataclass(frozen=True)
class Vocab:
    """The output vocabulary and, per input (the base first), the row of each output token
    there (-1 where it lacks the token): computed once by the plan, applied at each load."""

    source: str
    folder: Path  # where the output's tokenizer files are copied from
    tokens: int
    rows: int
    names: frozenset[str]
    index: tuple[torch.Tensor, ...]
    has_base: bool
    files: dict[str, str] = field(default_factory=dict)  # written over the copied files
    summary: dict[str, Any] = field(default_factory=dict)

    def meta(self, meta: TensorMeta) -> TensorMeta:
        return TensorMeta((self.rows, *meta.shape[1:]), meta.dtype)

    def align(
        self, base: torch.Tensor | None, models: list[torch.Tensor], lacking: list[int]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The inputs' tensors with rows in output order; a model that lacks the tensor (and
        was given the base's) is read with the base's rows."""
        maps = list(self.index if base is not None or not self.has_base else self.index[1:])
        if base is not None and self.has_base:
            for i in lacking:
                maps[1 + i] = self.index[0]
        tensors = [base, *models] if base is not None else models
        out = aligned(tensors, maps, 0 if base is not None else None, self.tokens, self.rows)
        return (out[0], out[1:]) if base is not None else (None, out)


def fill_weights(have: torch.Tensor, base: int | None) -> torch.Tensor:
    """mergekit's fill rule as weights: for each token (columns of `have`, (n inputs, F)
    booleans: who has it) the (n,) weights whose sum of rows fills it in the inputs that
    lack it: the base alone when it has the token, else the mean of those that have it
    (one input: its row; none: zeros)."""
    present = have.T.to(torch.float32)
    weights = present / present.sum(1, keepdim=True).clamp(min=1)
    if base is not None:
        by_base = have[base]
        weights[by_base] = 0.0
        weights[by_base, base] = 1.0
    return weights


def aligned(
    tensors: list[torch.Tensor],
    maps: list[torch.Tensor],
    base: int | None,
    tokens: int,
    rows: int,
) -> list[torch.Tensor]:
    """Each tensor's rows moved to output order by its map, lacking rows filled by
    `fill_weights`, rows past `tokens` set to that tensor's mean token row."""
    device = tensors[0].device
    index = torch.stack(maps).to(device)
    have = index >= 0
    lack = (~have).any(0).nonzero().squeeze(1)
    rest = tuple(tensors[0].shape[1:])
    fill = torch.zeros((lack.numel(), *rest), dtype=torch.float32, device=device)
    if lack.numel():
        weights = fill_weights(have[:, lack], base)
        for j, x in enumerate(tensors):
            w = weights[:, j]
            if bool(w.any()):
                picked = x[index[j, lack].clamp(min=0)].to(torch.float32)
                fill += w.view(-1, *[1] * len(rest)) * picked
    out = []
    arange = torch.arange(tokens, device=device)
    for j, x in enumerate(tensors):
        if x.shape[0] == rows == tokens and bool((index[j] == arange).all()):
            out.append(x)
            continue
        y = x.new_empty((rows, *rest))
        own = have[j].nonzero().squeeze(1)
        y[own] = x[index[j, own]]
        missing = ~have[j, lack]
        y[lack[missing]] = fill[missing].to(x.dtype)
        if rows > tokens:
            y[tokens:] = y[:tokens].to(torch.float32).mean(0).to(x.dtype)
        out.append(y)
    return out


def _union(
    first: Tokenizer, others: list[Tokenizer]
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """mergekit's union: `first`'s vocabulary, then the others' own tokens it lacks, then
    their added tokens it lacks; returns token -> id and the new added-token entries."""
    own: dict[str, None] = {}
    added: dict[str, Mapping[str, Any]] = {}
    for tok in [first, *others]:
        for token, _ in sorted(tok.vocab.items(), key=lambda item: item[1]):
            if token in tok.added:
                added.setdefault(token, tok.added[token])
            else:
                own.setdefault(token, None)
    vocab = dict(first.vocab)
    entries: list[dict[str, Any]] = []
    new = [(t, {"content": t, **_PLAIN, "special": False}) for t in own if t not in added]
    for token, entry in [*new, *added.items()]:
        if token not in vocab:
            vocab[token] = first.size + len(entries)
            entries.append({**entry, "id": vocab[token]})
    return vocab, entries


def _labels(base: Checkpoint | None, models: list[Checkpoint]) -> list[str]:
    named = [] if base is None else [f"base ({base.source})"]
    return named + [f"models[{i}] ({m.source})" for i, m in enumerate(models)]


def _read(folder: Path | None, label: str, problems: list[str]) -> Tokenizer | None:
    if folder is None:
        problems.append(
            f"tokenizer: {label} has no tokenizer files (an in-memory model or a bare weights "
            "file); give its model folder, or leave `tokenizer` out"
        )
        return None
    try:
        return read_tokenizer(folder)
    except MergeError as exc:
        problems.append(f"tokenizer: {label}: {exc}")
        return None


def _output_configs(
    folder: Path | None, vocab: Mapping[str, int], rows: int, where: str, problems: list[str]
) -> dict[str, str]:
    """The config files copied from `folder` with `vocab_size` set to the output's rows
    and every `*_token_id` moved to its token's output id; a special token the output
    vocabulary lacks would make that id name another token, so it is refused."""
    if folder is None:
        return {}
    try:
        ids = read_tokenizer(folder).ids_to_tokens()
    except MergeError:
        ids = None  # no tokenizer beside the config: its ids are taken as the output's
    files = {}
    for name in CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # copied as it is; its reader reports it
        if not isinstance(data, dict):
            continue

        def moved(key: str, value: Any, path: Path = path) -> Any:
            if isinstance(value, list):
                return [moved(key, v) for v in value]
            if ids is None or not isinstance(value, int) or isinstance(value, bool):
                return value
            token = ids.get(value)
            if token is None:
                return value
            if token not in vocab:
                problems.append(
                    f"tokenizer: {path} gives {key} {value} ('{token}'), a token the output "
                    f"vocabulary ({where}) lacks: that id would name another token; choose a "
                    "source that has it, or copy_files_from a model of that vocabulary"
                )
            return vocab.get(token, value)

        new = {k: moved(k, v) if k.endswith("_token_id") else v for k, v in data.items()}
        if name == "config.json":
            new["vocab_size"] = rows
        if new != data:
            files[name] = json.dumps(new, indent=2) + "\n"
    return files


def plan_vocab(
    recipe: Recipe,
    base: Checkpoint | None,
    models: list[Checkpoint],
    copy_from: Path | None,
    problems: list[str],
    *,
    for_output: bool = True,
) -> Vocab | None:
    """The recipe's output vocabulary and each input's row map, or None without `tokenizer`;
    what cannot be aligned goes to `problems`, before any tensor is read."""
    spec = recipe.tokenizer
    if spec is None:
        return None
    if recipe.slices is not None or recipe.output_format == "lora":
        problems.append(
            "tokenizer: re-aligning embedding rows works on a `models:` recipe written as a "
            "full model, not with slices or output_format: lora; leave `tokenizer` out"
        )
        return None
    inputs = [base, *models] if base is not None else list(models)
    labels = _labels(base, models)
    read = [
        _read(getattr(c, "folder", None), lbl, problems)
        for c, lbl in zip(inputs, labels, strict=True)
    ]
    tokenizers = [t for t in read if t is not None]
    if len(tokenizers) < len(read):
        return None
    entries: list[dict[str, Any]] = []
    if spec.source == "union":
        vocab, entries = _union(tokenizers[0], tokenizers[1:])
        out, folder = tokenizers[0], tokenizers[0].folder
    elif spec.source == "base":
        out = tokenizers[0]
        vocab, folder = dict(out.vocab), out.folder
    else:
        try:
            folder = model_folder(spec.source, allow_downloads=recipe.allow_downloads)
        except MergeError as exc:
            problems.append(f"tokenizer: source: {exc}")
            return None
        found = _read(folder, f"source {spec.source}", problems)
        if found is None:
            return None
        out, vocab = found, dict(found.vocab)
    unlike = [
        f"{lbl}: {tok.family}"
        for tok, lbl in zip(tokenizers, labels, strict=True)
        if dict(tok.vocab) != vocab and tok.family != out.family
    ]
    if unlike:
        problems.append(
            f"tokenizer: the vocabularies cannot be aligned: the output's tokenizer "
            f"({spec.source}, {out.folder}) is {out.family}, but "
            + "; ".join(unlike)
            + ". Tokens of different tokenizer kinds (model type, normalizer, pre-tokenizer) "
            "mean different text, so their rows cannot be matched; merge models of one family"
        )
    tokens = max(vocab.values(), default=-1) + 1
    multiple = spec.pad_to_multiple_of or 1
    rows = -(-tokens // multiple) * multiple
    layout = inputs[0]
    names = frozenset(
        n for c in inputs for n in c if VOCAB_TENSOR.search(n) and len(c.meta(n).shape) == 2
    )
    if not names:
        problems.append(
            f"tokenizer: no embedding or output-head tensor in {layout.source} (names ending "
            "in embed_tokens, word_embeddings, wte, tok_embeddings, embed_out, lm_head or "
            "shared .weight) to re-align; leave `tokenizer` out"
        )
    for ckpt, tok, lbl in zip(inputs, tokenizers, labels, strict=True):
        for name in sorted(n for n in names if n in ckpt):
            have = ckpt.meta(name).shape[0]
            if have < tok.size:
                problems.append(
                    f"tokenizer: {lbl}: '{name}' has {have} rows but its tokenizer has "
                    f"{tok.size} token ids: the added tokens have no rows; resize the "
                    "embeddings (resize_token_embeddings) or fix its tokenizer"
                )
    if for_output:
        problems += [f"tokenizer: {p}" for p in escaping_side_files(folder, TOKENIZER_FILES)]
    files = _output_configs(copy_from, vocab, rows, spec.source, problems) if for_output else {}
    if entries:
        files["tokenizer.json"] = with_added_tokens(out, entries)
    index = tuple(_row_map(vocab, tok, tokens) for tok in tokenizers)
    dropped = [sum(t not in vocab for t in tok.vocab) for tok in tokenizers]
    return Vocab(
        source=spec.source,
        folder=folder,
        tokens=tokens,
        rows=rows,
        names=names,
        index=index,
        has_base=base is not None,
        files=files,
        summary=_summary(
            spec.source, folder, tokens, rows, len(entries), index, labels, base, dropped
        ),
    )


def _row_map(vocab: Mapping[str, int], tok: Tokenizer, tokens: int) -> torch.Tensor:
    index = torch.full((tokens,), -1, dtype=torch.int64)
    for token, i in vocab.items():
        own = tok.vocab.get(token)
        if own is not None:
            index[i] = own
    return index


def _summary(
    source: str,
    folder: Path,
    tokens: int,
    rows: int,
    added: int,
    index: tuple[torch.Tensor, ...],
    labels: list[str],
    base: Checkpoint | None,
    dropped: list[int],
) -> dict[str, Any]:
    """What the merge report says: the output vocabulary, and per input how many tokens
    it lacked and by which of mergekit's rules their rows were filled, and how many of its
    tokens the output does not have (their rows are not merged)."""
    have = torch.stack(index) >= 0
    count = have.sum(0)
    by_base = have[0] if base is not None else torch.zeros_like(count, dtype=torch.bool)
    kinds = {
        "one_input_row": count == 1,
        "base_row": (count >= 2) & by_base,
        "mean_of_inputs": (count >= 2) & ~by_base,
        "zeros": count == 0,
    }
    per_input = []
    for j, label in enumerate(labels):
        lacks = ~have[j]
        filled = {k: int((lacks & m).sum()) for k, m in kinds.items()}
        per_input.append(
            {"input": label, "tokens_lacked": int(lacks.sum()), "filled": filled}
            | {"tokens_dropped": dropped[j]}
        )
    return {
        "source": source,
        "tokenizer_files_from": str(folder),
        "vocab_size": tokens,
        "rows": rows,
        "padding_rows": rows - tokens,
        "tokens_added_by_union": added,
        "fill_rule": (
            "mergekit's: a token an input lacks gets the row of the one input that has it, "
            "else the base's, else the mean of the inputs that have it (zeros if none); "
            "padding rows get each input's mean row"
        ),
        "inputs": per_input,
    }

"""What a mergekit recipe says about its output besides the tensors: dtypes, tokenizer,
chat template and output folder, as nanmerge fields plus notes on what differs.

mergekit's meanings (mergekit `config.py`, `merge.py`, `tokenizer/config.py`, 0.1.5):
`dtype` is the dtype it computes in and `out_dtype` the one it writes (default `dtype`);
`tokenizer_source` (or `tokenizer: {source}`) names whose tokenizer the output gets: `base`,
a model, or `union` (a merged vocabulary), with the embedding and output-head rows
re-aligned to it; without either, the base's tokenizer is copied; `chat_template` is
`auto`, a named template of its own, or the Jinja text itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nanmerge.recipes._mergekit_values import model_path

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
# mergekit's named templates that nanmerge writes out too (ChatML, as its spec gives it)
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
FIELDS = {"dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "out_path"}
SPEC = {"source", "pad_to_multiple_of"}  # mergekit's `tokenizer:` keys nanmerge reads


def _dtype(data: Mapping[str, Any], problems: list[str], notes: list[str]) -> dict[str, Any]:
    named: dict[str, str | None] = {}
    wrong = []
    for key in ("out_dtype", "dtype"):
        value = data.get(key)
        named[key] = DTYPES.get(value) if isinstance(value, str) else None
        if value is not None and named[key] is None:
            wrong.append(f"{key} '{value}' (nanmerge writes {', '.join(sorted(DTYPES))})")
    if wrong:
        problems += wrong
        return {}
    compute = named["dtype"]
    written = named["out_dtype"] or compute
    if compute is not None and compute != "float32":
        notes.append(
            f"dtype {compute}: mergekit computes in {compute}; nanmerge computes in float32 "
            f"and rounds once, when it writes {written}, so the last bits may differ"
        )
    return {} if written is None else {"dtype": written}


def _tokenizer(data: Mapping[str, Any], base: Any, problems: list[str]) -> dict[str, Any]:
    """mergekit's `tokenizer_source` / `tokenizer: {source, pad_to_multiple_of}` as nanmerge's
    `tokenizer` (the same union, row map and fill rule: engine/_vocab.py). Without either,
    both tools copy the base's tokenizer and keep the rows as they are."""
    source = data.get("tokenizer_source")
    config = data.get("tokenizer")
    pad = None
    if config is not None:
        if source is not None:
            problems.append("both `tokenizer_source` and `tokenizer` (mergekit takes one)")
        if not isinstance(config, Mapping):
            problems.append(f"tokenizer {config!r} (mergekit's form is {{source: ...}})")
            return {}
        extra = sorted(k for k, v in config.items() if k not in SPEC and v is not None)
        if extra:
            problems.append(
                f"tokenizer {', '.join(extra)} (per-token embedding sources; nanmerge fills "
                "the rows of tokens an input lacks by mergekit's default rule only)"
            )
        source = config.get("source", "union")  # mergekit's default for a `tokenizer:` block
        pad = config.get("pad_to_multiple_of")
    if source is None:
        return {}
    if not isinstance(source, str):
        problems.append(f"tokenizer source {source!r} (base, union or a model path)")
        return {}
    if source not in ("base", "union"):
        source = model_path(source, base, problems)
    spec: dict[str, Any] = {"source": source}
    if pad is not None:
        spec["pad_to_multiple_of"] = pad
    return {"tokenizer": spec}


def _chat_template(value: Any, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, str):
        problems.append(f"chat_template {value!r} (a template name or its Jinja text)")
    elif value == "auto" or ("{" in value and len(value) >= 20):
        return {"chat_template": value}  # mergekit's test for Jinja text
    elif value in CHAT_TEMPLATES:
        return {"chat_template": CHAT_TEMPLATES[value]}
    else:
        problems.append(
            f"chat_template '{value}' (nanmerge knows auto, {', '.join(CHAT_TEMPLATES)}; "
            "give the Jinja text of other templates)"
        )
    return {}


def output_fields(
    data: Mapping[str, Any], base: Any, problems: list[str], notes: list[str]
) -> dict[str, Any]:
    """The nanmerge fields for mergekit's output settings; what differs goes to `notes`."""
    fields = _dtype(data, problems, notes)
    fields |= _tokenizer(data, base, problems)
    fields |= _chat_template(data.get("chat_template"), problems)
    out_path = data.get("out_path")
    if out_path is not None:
        if data.get("output") is not None:
            problems.append("both `out_path` (mergekit-mega) and `output` (write one)")
        fields["output"] = out_path
    return fields
